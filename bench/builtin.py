"""The built-in category the quality benchmarks steer with: malicious uses (Do-Not-Answer), 40 prompts held out."""

from __future__ import annotations

from safesteer import datasets, extract_vectors
from safesteer.models import LoadedModel
from safesteer.operations import SteeringOptions
from safesteer.policy import PolicyCategory
from safesteer.vectors import ExtractionSettings

CATEGORY = "malicious-uses"


def examples(n_safe: int = 160) -> tuple[list[str], list[str], list[str]]:
    """(training harmful prompts, the 40 held out, everyday safe examples)."""
    train, heldout = datasets.split_heldout(datasets.harmful_prompts(CATEGORY), 40, seed=5)
    return train, heldout, datasets.benign_prompts(limit=n_safe)


def builtin_category(
    extractor: LoadedModel,
    settings: ExtractionSettings,
    reader: LoadedModel | None = None,
    layer: int = 12,
    strength: float = 2.0,
    options: SteeringOptions | None = None,
) -> PolicyCategory:
    """The category's vectors from `extractor` (answers written and read, and gates read, by `reader`)."""
    train, _, safe = examples()
    vectors = extract_vectors(extractor, train, safe, settings, CATEGORY, gate_lm=reader)
    extra = {"options": options} if options is not None else {}
    return PolicyCategory(CATEGORY, train, safe, vectors, layer, strength, **extra)
