"""Guided vectors (the papers' variant): prompts whose answers a judge or a reviewer found unsafe against safe ones."""

from __future__ import annotations

from dataclasses import asdict

from ..activations import record_activations
from ..errors import SafeSteerError
from ..models import LoadedModel
from ..progress import ProgressCallback
from ..vectors import MIN_PROMPTS_PER_SIDE, CategoryVectors, ExtractionSettings, vectors_from_activations
from .prompt import mean_difference


def guided_vectors(
    lm: LoadedModel,
    prompts: list[str],
    unsafe: list[bool],
    settings: ExtractionSettings,
    category: str = "category",
    progress: ProgressCallback | None = None,
) -> CategoryVectors:
    """The papers' guided vectors: activations behind responses judged unsafe vs those judged safe.

    Labels may come from any judge (a guard model or the author's blind review); the direction
    points from what the model does wrong toward what it does right.
    """

    bad = [p for p, u in zip(prompts, unsafe, strict=True) if u]
    good = [p for p, u in zip(prompts, unsafe, strict=True) if not u]
    if len(bad) < MIN_PROMPTS_PER_SIDE or len(good) < MIN_PROMPTS_PER_SIDE:
        raise SafeSteerError(
            f"guided vectors need at least {MIN_PROMPTS_PER_SIDE} responses judged unsafe and "
            f"{MIN_PROMPTS_PER_SIDE} judged safe; got {len(bad)} and {len(good)}"
        )
    bad_acts = record_activations(
        lm, bad, progress=progress, site=settings.site, token=settings.token, batch_size=settings.batch_size
    )
    good_acts = record_activations(lm, good, site=settings.site, token=settings.token, batch_size=settings.batch_size)
    guided = ExtractionSettings(**{**asdict(settings), "method": "guided", "gate": False})  # keep the category's gate
    return vectors_from_activations(bad_acts, good_acts, guided, lm.identity, category, method=mean_difference)
