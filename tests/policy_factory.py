"""Small policy versions for store and bundle tests, computed from synthetic activations."""

from __future__ import annotations

import torch

from safesteer.identity import ModelIdentity
from safesteer.policy import PolicyCategory
from safesteer.vectors import ExtractionSettings, vectors_from_activations

IDENTITY = ModelIdentity("toy/model", "rev1", "fp32", "llama", n_layers=4, hidden_size=64)


def category(
    name: str = "weapons",
    seed: int = 0,
    identity: ModelIdentity = IDENTITY,
    harmful: list[str] | None = None,
    site: str = "residual",
    layer: int = 1,
    strength: float = 2.0,
) -> PolicyCategory:
    g = torch.Generator().manual_seed(seed)
    shape = (8, identity.n_layers, identity.hidden_size)
    acts_h = torch.randn(*shape, generator=g)
    acts_s = torch.randn(*shape, generator=g) + 1.0
    vectors = vectors_from_activations(
        acts_h, acts_s, ExtractionSettings(method="mean-diff", site=site), identity, name
    )  # type: ignore[arg-type]
    return PolicyCategory(
        name=name,
        harmful=harmful if harmful is not None else [f"harmful {name} {i}" for i in range(4)],
        safe=[f"safe request {i}, with a comma" for i in range(4)],
        vectors=vectors,
        layer=layer,
        strength=strength,
        description=f"{name} examples",
    )
