"""Prompt vectors: directions between the activations of harmful and safe prompts (docs/method.md, steps 1 and 3).

A method takes recorded activations and returns one vector per layer; `vectors.VECTOR_METHODS` names them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..errors import SafeSteerError

if TYPE_CHECKING:
    from ..vectors import ExtractionSettings

VectorMethod = Callable[[torch.Tensor, torch.Tensor, "ExtractionSettings"], torch.Tensor]
"""(harmful `[n, L, d]`, safe `[m, L, d]`, settings) -> vectors `[L, d]`."""


def mean_difference(harmful: torch.Tensor, safe: torch.Tensor, settings: ExtractionSettings) -> torch.Tensor:
    """Unsupervised: safe centroid minus harmful centroid, per layer."""
    return safe.mean(0) - harmful.mean(0)


def pruned_mean_difference(harmful: torch.Tensor, safe: torch.Tensor, settings: ExtractionSettings) -> torch.Tensor:
    """Keep, per layer, the harmful examples lying furthest along the harmful direction, then recompute.

    Examples that barely differ from safe ones add noise to the centroid; dropping them gives
    a direction that carries the category signal more purely (docs/method.md, step 3).
    """
    direction = mean_difference(harmful, safe, settings)  # [L, d]
    unit = direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    safe_centroid = safe.mean(0)
    scores = -((harmful - safe_centroid) * unit).sum(-1)  # [n, L]: larger = more harmful-looking
    keep = max(1, math.ceil(settings.prune_fraction * harmful.shape[0]))
    top = scores.topk(keep, dim=0).indices  # [keep, L]
    kept = harmful.gather(0, top.unsqueeze(-1).expand(-1, -1, harmful.shape[-1]))
    return safe_centroid - kept.mean(0)


def guided_needs_labels(harmful: torch.Tensor, safe: torch.Tensor, settings: ExtractionSettings) -> torch.Tensor:
    raise SafeSteerError(
        "guided vectors need a judge's labels of the model's own responses; choose mean-diff or pruned"
    )


VECTOR_METHODS: dict[str, VectorMethod] = {
    "answers": mean_difference,  # of answer activations (`methods.answers`), not prompt activations
    "mean-diff": mean_difference,
    "pruned": pruned_mean_difference,
    "guided": guided_needs_labels,
}
