"""User-level operations that both faces call, with one set of defaults.

The app (`studio/`) and the command line (`cli/`) are thin: what "evaluate a category" or
"import a bundle" means lives here once, so the two faces give the same result for the same
policy and settings. A store is anything with the `VersionStore` methods (`db.PolicyStore` is
one); the library never imports the store itself.
"""

from __future__ import annotations

import itertools
import json
import random
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from . import datasets
from .bundles import export_bundle, read_bundle
from .errors import SafeSteerError
from .evaluation import Evaluation
from .extraction import refit_router
from .identity import ModelIdentity, check_made_for
from .llama_cpp import export_llama_cpp
from .llama_cpp import export_warning as llama_cpp_warning
from .models import LoadedModel
from .policy import PolicyCategory, PolicyVersion
from .progress import ProgressCallback, labelled, no_progress, scaled
from .reports import report_markdown, write_plots

DEFAULT_HARMFUL = 10
"""Held-out harmful prompts an evaluation answers, unless the caller gives its own held-out set."""
DEFAULT_BENIGN = 8
"""Everyday prompts an evaluation answers, to see what steering does to ordinary traffic."""
HELDOUT_SEED = 7
BENIGN_SEED = 11


class VersionStore(Protocol):
    """What the workflows need of a policy store."""

    def save_version(
        self,
        policy: str,
        categories: list[PolicyCategory],
        author: str = "",
        note: str = "",
        evaluation: dict[str, Any] | None = None,
        description: str = "",
        create: bool = True,
        restored_from: int | None = None,
        keep_other_categories: bool = False,
        amend: Callable[[list[PolicyCategory]], list[PolicyCategory]] | None = None,
    ) -> int: ...

    def record(self, actor: str, action: str, policy: str, version: int | None = None, **detail: Any) -> None: ...

    def load_version(self, policy: str, number: int | None = None) -> PolicyVersion: ...


def other_categories_prompts(store: VersionStore, policy: str | None, category: str) -> list[str]:
    """Harmful prompts of the policy's other categories (latest version): a new gate learns to leave them alone."""
    if not policy:
        return []
    try:
        latest = store.load_version(policy)
    except SafeSteerError:
        return []  # a new policy, or one without versions yet
    return [p for c in latest.categories if c.name != category for p in c.harmful]


def _routes_here(category: PolicyCategory, gate_lm: LoadedModel) -> bool:
    """Whether `category`'s gate is a policy gate this model reads: one whose router it can teach."""
    gate, made_for, reader = category.gate, category.vectors.model, gate_lm.identity
    return (
        gate is not None
        and gate.routed
        and gate.token == "mean"
        and gate.precision == reader.precision
        and (made_for.model_id, made_for.model_type, made_for.hidden_size)
        == (reader.model_id, reader.model_type, reader.hidden_size)
    )


def routed_together(
    categories: Sequence[PolicyCategory],
    gate_lm: Callable[[], LoadedModel],
    progress: ProgressCallback | None = None,
) -> list[PolicyCategory]:
    """`categories` with every policy gate's router learnt against the other categories saved with it.

    A router decides which of a policy's categories steers a request their gates all admit. It
    learns from the categories beside it, so one extracted while its policy had no others has
    none (and routes by centroid), and one learnt earlier never saw the categories saved since.
    Gates another model reads (an imported bundle's, another precision) are left as they are.
    `gate_lm` is called only when there are at least two gates to route between.
    """
    if sum(c.gate is not None and c.gate.routed for c in categories) < 2:
        return list(categories)
    report = progress or no_progress
    report(0.0, "loading the model that reads the gates")
    lm = gate_lm()
    out, n = [], len(categories)
    for index, category in enumerate(categories):
        if not _routes_here(category, lm):
            out.append(category)
            continue
        others = [p for other in categories if other.name != category.name for p in other.harmful]
        assert category.gate is not None
        part = scaled(labelled(report, f"teaching the gate of {category.name}"), index / n, (index + 1) / n)
        gate = refit_router(
            lm, category.gate, category.harmful, category.safe, others, category.vectors.settings, progress=part
        )
        out.append(replace(category, vectors=category.vectors.with_gate(gate)))
    report(1.0, "every gate knows whom to claim")
    return out


def save_category(
    store: VersionStore,
    policy: str,
    category: PolicyCategory,
    gate_lm: Callable[[], LoadedModel],
    author: str = "",
    note: str = "",
    progress: ProgressCallback | None = None,
) -> int:
    """Save `category` into a new version of `policy` beside its other categories, routers learnt among them all.

    The routers are learnt inside the store's write transaction, on the categories that version
    really holds (another author may have saved one meanwhile). The recordings they read are made
    first, outside it (with `progress`), so the write lock is held for a few logistic fits, not for
    a model's passes.
    """

    def amend(categories: list[PolicyCategory]) -> list[PolicyCategory]:
        return routed_together(categories, gate_lm)

    try:
        latest = store.load_version(policy)
    except SafeSteerError:  # a new policy, or one without versions yet: nothing to route against
        latest = None
    if latest is not None:
        routed_together(latest.with_category(category), gate_lm, progress)  # records what the routers read
    return store.save_version(policy, [category], author=author, note=note, keep_other_categories=True, amend=amend)


def import_bundle(
    store: VersionStore,
    data: bytes,
    target: ModelIdentity | None = None,
    actor: str = "",
    rename: str | None = None,
    allow_other_model: bool = False,
) -> tuple[str, int]:
    """Validate a bundle fully, check it was made for the target model, then save it as a new version.

    Returns (policy name, new version number). A bad bundle raises before the store is touched.
    With `allow_other_model`, a bundle made for another model of the same shape is imported for
    the target model: its vectors are relabelled with the target's identity (so nothing ever
    loads the model the bundle names) and the override is recorded in the note and audit log.
    """
    version = read_bundle(data)
    made_for = version.model
    categories = version.categories
    note = f"imported from bundle ({version.policy} v{version.number})" + (f": {version.note}" if version.note else "")
    override = False
    if target is not None:
        check_made_for(made_for, target, allow_other_model=allow_other_model)
        if (made_for.model_id, made_for.model_type) != (target.model_id, target.model_type):
            override = True
            categories = [replace(c, vectors=replace(c.vectors, model=target)) for c in categories]
            note += f" [made for {made_for.describe()}; imported for {target.model_id} by explicit override]"
    name = rename or version.policy
    number = store.save_version(
        name, categories, author=actor, note=note, evaluation=version.evaluation, description=version.description
    )
    store.record(actor, "import", name, number, bundle_model=made_for.to_dict(), model_override=override)
    return name, number


def default_heldout(seed: int = HELDOUT_SEED) -> list[str]:
    """All Do-Not-Answer prompts, shuffled per risk area and interleaved, so any prefix mixes the areas."""
    areas = [datasets.harmful_prompts(area) for area in datasets.DONOTANSWER_AREAS]
    areas = [random.Random(seed).sample(prompts, len(prompts)) for prompts in areas]
    return [p for group in itertools.zip_longest(*areas) for p in group if p is not None]


def sweep_layers(n_layers: int, around: int, count: int = 5) -> tuple[int, ...]:
    """`count` layers spread over the middle of the model, always including `around`."""
    low, high = max(1, round(0.25 * (n_layers - 1))), round(0.7 * (n_layers - 1))
    spread = {round(low + i * (high - low) / max(1, count - 1)) for i in range(count)}
    return tuple(sorted(spread | {around}))


def evaluation_prompts(
    category: PolicyCategory,
    heldout: Sequence[str] | None = None,
    n_harmful: int | None = DEFAULT_HARMFUL,
    n_benign: int = DEFAULT_BENIGN,
) -> tuple[list[str], list[str]]:
    """(harmful, everyday) prompts for evaluating a category, the same for every face.

    Harmful: the given held-out prompts (else Do-Not-Answer, mixed across areas), never one the
    vectors were made from; the first `n_harmful` (None: all). Everyday: a fixed sample of the
    project's held-out everyday prompts (never offered as examples), minus the category's own safe examples.
    """
    pool = list(heldout) if heldout is not None else default_heldout()
    used = set(category.harmful)
    harmful = [p for p in pool if p not in used]
    if n_harmful is not None:
        harmful = harmful[:n_harmful]
    own = set(category.safe)
    candidates = [p for p in datasets.benign_prompts(part="heldout") if p not in own]
    benign = random.Random(BENIGN_SEED).sample(candidates, min(n_benign, len(candidates)))
    return harmful, benign


@dataclass(frozen=True)
class EvaluationFiles:
    """What an evaluation leaves on disk: a report, its plots, the data, and all of them zipped."""

    report: Path
    plots: list[Path]
    data: Path
    archive: Path


def write_evaluation_files(result: Evaluation, folder: Path) -> EvaluationFiles:
    """Write report.md with its plots, evaluation.json, and report.zip (the report links its plots)."""
    folder.mkdir(parents=True, exist_ok=True)
    plots = write_plots(result, folder)
    report = folder / "report.md"
    report.write_text(report_markdown(result, plots))
    data = folder / "evaluation.json"
    data.write_text(json.dumps(result.to_dict(), indent=2))
    archive = folder / "report.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in (report, *plots):
            bundle.write(path, path.name)
    return EvaluationFiles(report=report, plots=plots, data=data, archive=archive)


@dataclass(frozen=True)
class ExportFormat:
    """A way to hand a policy version to a deployer."""

    key: str  # what the CLI's --format and the app's API take
    label: str  # what the app shows
    suffix: str
    write: Callable[[PolicyVersion, Path, str], Path]
    warning: Callable[[PolicyVersion], str | None] = lambda version: None
    """What the format will do differently from SafeSteer with this version, said before it is used."""


EXPORT_FORMATS: dict[str, ExportFormat] = {
    "bundle": ExportFormat(
        "bundle", "Policy bundle (.zip)", ".zip", lambda version, path, who: export_bundle(version, path, who)
    ),
    "llama-cpp": ExportFormat(
        "llama-cpp",
        "llama.cpp control vector (.gguf)",
        ".gguf",
        lambda version, path, who: export_llama_cpp(version, path),
        llama_cpp_warning,
    ),
}


def export_format(fmt: str) -> ExportFormat:
    if fmt not in EXPORT_FORMATS:
        raise SafeSteerError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    return EXPORT_FORMATS[fmt]


def export_version(version: PolicyVersion, path: str | Path, fmt: str = "bundle", created_by: str = "") -> Path:
    """Write `version` in one of `EXPORT_FORMATS` (the same keys for the CLI and the app)."""
    return export_format(fmt).write(version, Path(path), created_by)


def export_warning(version: PolicyVersion, fmt: str) -> str | None:
    return export_format(fmt).warning(version)


def export_file_name(version: PolicyVersion, fmt: str) -> str:
    """A safe file name for a download: the policy's name, its version and the format's suffix."""
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in version.policy) + f"-v{version.number}"
    return stem + export_format(fmt).suffix
