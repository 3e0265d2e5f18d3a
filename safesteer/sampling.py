"""How the next token is chosen, row by row: greedy, or sampled with the row's own settings and seed.

Greedy answers are the default everywhere (previews, evaluations): reproducible and auditable.
A server's clients may ask for sampling (`temperature`, `top_p`, `seed`); each row then draws from
its own random stream, so its tokens depend on its seed and logits, not on its neighbours in the
batch, and a seed gives the same answer again. Steering changes the logits; sampling reads them
after, so it applies the same way with or without a policy.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import SafeSteerError


@dataclass(frozen=True)
class Sampling:
    """One row's choice rule: `temperature` 0 is greedy; `top_p` keeps the smallest likeliest set of that mass."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0):
            raise SafeSteerError(f"temperature must be between 0 and 2, got {self.temperature!r}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise SafeSteerError(f"top_p must be above 0 and at most 1, got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


class TokenChooser:
    """Chooses each row's next token from its logits `[rows, vocab]` by that row's `Sampling`."""

    def __init__(self, rows: Sequence[Sampling | None]) -> None:
        self.rows = [row or GREEDY for row in rows]
        self.generators = [
            None
            if row.greedy
            else torch.Generator().manual_seed(row.seed if row.seed is not None else secrets.randbits(63))
            for row in self.rows
        ]

    @property
    def greedy(self) -> bool:
        return all(row.greedy for row in self.rows)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        for r, (row, generator) in enumerate(zip(self.rows, self.generators, strict=True)):
            if generator is None:
                continue
            probs = torch.softmax(logits[r].float().cpu() / row.temperature, dim=-1)
            if row.top_p < 1.0:
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(0) - ordered >= row.top_p  # mass before a token already reaches top_p
                probs = probs.scatter(0, order, ordered.masked_fill(outside, 0.0))
            tokens[r] = int(torch.multinomial(probs, 1, generator=generator))
        return tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """transformers' logits-processor protocol: every token but the chosen one is ruled out."""
        chosen = self.choose(scores)
        masked = torch.full_like(scores, float("-inf"))
        return masked.scatter(1, chosen.unsqueeze(1), 0.0)
