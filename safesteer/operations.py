"""How a category vector is applied: where, how much, over how many layers, and the one operation that does it.

The papers add `strength * v` to every position at one layer. That buys safety with fluency: a
generated token that already reads safe is pushed as hard as one that does not, and the push
compounds over the answer. The options here are the ways peers keep text fluent:

- **where**: `all` positions (the papers), the `prompt` only (the prompt pass; answer tokens are
  left alone), or the `generated` positions only: the last prompt position (whose state writes
  the first answer token) and every answer token.
- **how**: `add` (the papers); `norm`: add, then rescale each state to its original length, so
  the push turns the state instead of inflating it; `clamp`: move only the component along the
  category direction and only up to a target on the safe side, so a state already there is left
  alone and the push adapts per token. The target at strength s is the harmful centroid's
  projection plus `s * |v|` (strength 1 reaches the safe centroid), and no state moves more than
  `s * |v|`.
- **spread**: the strength shared evenly by `spread` adjacent layers around the chosen one, each
  with its own layer's vector.

Strength 0 leaves every state exactly as it was, under every option. The hooks (prompt passes,
transformers' generate) and the lean decode loop (`decoding`) both apply `apply_steering`, so
each operation is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import torch

from .errors import SafeSteerError

Where = Literal["all", "prompt", "generated"]
How = Literal["add", "norm", "clamp"]
WHERE: tuple[Where, ...] = ("all", "prompt", "generated")
HOW: tuple[How, ...] = ("add", "norm", "clamp")
MAX_SPREAD = 7


@dataclass(frozen=True)
class SteeringOptions:
    """Where, how and over how many layers a category's vector is applied; stored with the category."""

    where: Where = "all"
    how: How = "add"
    spread: int = 1

    def __post_init__(self) -> None:
        if self.where not in WHERE:
            raise SafeSteerError(f"unknown steering position '{self.where}': use one of {', '.join(WHERE)}")
        if self.how not in HOW:
            raise SafeSteerError(f"unknown steering operation '{self.how}': use one of {', '.join(HOW)}")
        if isinstance(self.spread, bool) or not isinstance(self.spread, int) or not 1 <= self.spread <= MAX_SPREAD:
            raise SafeSteerError(f"spread must be a whole number of layers from 1 to {MAX_SPREAD}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> SteeringOptions:
        """Options as stored; None (a category saved before options existed) is the papers' way, as it was."""
        if data is None:
            return LEGACY
        if not isinstance(data, dict) or set(data) - {"where", "how", "spread"}:
            raise SafeSteerError("steering options must be a mapping of where, how and spread")
        return cls(
            where=cast(Where, data.get("where", "all")),
            how=cast(How, data.get("how", "add")),
            spread=data.get("spread", 1),
        )

    def label(self) -> str:
        """A short name for tables and plots, e.g. `clamp · generated · 3 layers`."""
        layers = "1 layer" if self.spread == 1 else f"{self.spread} layers"
        return f"{self.how} · {self.where} · {layers}"

    def span(self, layer: int, n_layers: int) -> range:
        """The adjacent layers sharing the strength: centred on `layer`, moved inward at the model's ends."""
        if self.spread > n_layers:
            raise SafeSteerError(f"cannot spread over {self.spread} layers: the model has {n_layers}")
        first = min(max(0, layer - (self.spread - 1) // 2), n_layers - self.spread)
        return range(first, first + self.spread)


LEGACY = SteeringOptions()
"""The papers' operation: add at every position of one layer. Categories saved without options use it."""

DEFAULT = SteeringOptions(where="prompt", how="add", spread=1)
"""What new categories with prompt vectors use: the option with the best trade-off measured on the embedded model.

Steering only the prompt's positions lets the model read a request as safer and then answer in
its own words: on held-out StrongREJECT prompts it cut unsafe attempts as far as adding at every
position did, with far fewer looping or off-topic answers (docs/steering-quality.md).
"""


ANSWER_DEFAULT = SteeringOptions(where="all", how="add", spread=1)
"""What new categories with answer vectors use: an answer vector describes the answer, so it is added
where the answer is written too; added at the prompt or the answer alone it does little
(docs/steering-quality.md)."""

SUGGESTED = SteeringOptions()
"""A placeholder meaning "the options suggested for these vectors" (`policy.suggested_point`); compared by identity."""


COMPARED = (
    SteeringOptions("all", "add"),
    SteeringOptions("generated", "add"),
    SteeringOptions("prompt", "add"),
    SteeringOptions("all", "norm"),
    SteeringOptions("generated", "norm"),
    SteeringOptions("all", "clamp"),
    SteeringOptions("generated", "clamp"),
    SteeringOptions("all", "add", spread=3),
    SteeringOptions("generated", "clamp", spread=3),
)
"""The options a sweep offers to compare (the app's checkboxes, `eval --options all`)."""


def options_by_label(labels: Sequence[str]) -> tuple[SteeringOptions, ...]:
    """Options from their labels (`SteeringOptions.label`), as the app's checkboxes give them."""
    known = {o.label(): o for o in (*COMPARED, DEFAULT)}
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise SafeSteerError(f"unknown steering option {unknown[0]!r}: choose from {', '.join(known)}")
    return tuple(known[label] for label in dict.fromkeys(labels))


def parse_options(text: str) -> SteeringOptions:
    """`how:where[:spread]` as typed on the command line, e.g. `clamp:generated` or `add:all:3`."""
    parts = text.strip().split(":")
    if not 2 <= len(parts) <= 3:
        raise SafeSteerError(f"steering option {text!r}: write how:where[:spread], e.g. clamp:generated or add:all:3")
    try:
        spread = int(parts[2]) if len(parts) == 3 else 1
    except ValueError as exc:
        raise SafeSteerError(f"steering option {text!r}: the spread is a whole number of layers") from exc
    return SteeringOptions(where=cast(Where, parts[1]), how=cast(How, parts[0]), spread=spread)


def check_clamp(safe_projection: Sequence[float] | None, layers: int, strengths: Sequence[float]) -> None:
    """Clamping needs where the safe side lies at every steered layer, and moves toward it only."""
    if safe_projection is None or len(safe_projection) != layers:
        raise SafeSteerError(
            "clamped steering needs the safe side's projection at each steered layer; extract the vectors again"
        )
    if any(s < 0 for s in strengths):
        raise SafeSteerError("clamped steering moves toward the safe side only: use a strength of 0 or more")


@dataclass(frozen=True)
class Shift:
    """One vector's operation on one layer's output, prepared for states of a given dtype, device and rank.

    `shift` is `strength * vector` ([hidden] for one strength, [rows, 1.., hidden] per row); `clamp`
    also keeps the unit direction, the per-row target projection and the per-row largest move.
    """

    how: How
    where: Where
    shift: torch.Tensor
    unit: torch.Tensor | None = None
    target: torch.Tensor | None = None
    cap: torch.Tensor | None = None

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.how == "add":
            return hidden + self.shift
        if self.how == "norm":
            steered = hidden + self.shift
            ratio = hidden.float().norm(dim=-1, keepdim=True) / steered.float().norm(dim=-1, keepdim=True).clamp_min(
                1e-12
            )
            return (steered.float() * ratio).to(hidden.dtype)
        assert self.unit is not None and self.target is not None and self.cap is not None
        projection = (hidden.float() * self.unit).sum(-1, keepdim=True)
        move = torch.minimum((self.target - projection).clamp_min(0.0), self.cap)
        return hidden + (move * self.unit).to(hidden.dtype)


def prepare_shift(
    vector: torch.Tensor,
    strengths: tuple[float, ...],
    dtype: torch.dtype,
    device: torch.device,
    ndim: int,
    how: How = "add",
    where: Where = "all",
    safe_projection: float | None = None,
) -> Shift:
    """A vector's operation for [rows, ..., hidden] states of `ndim` dims; one strength or one per row.

    The hooks and the decode loop both prepare their operations here, so they apply the very same numbers.
    """
    direction = vector.detach().float().cpu().to(device, dtype)
    rows = torch.tensor(strengths, dtype=torch.float32).to(device, dtype)
    per_row = [-1, *([1] * (ndim - 1))]
    shift = rows[0] * direction if rows.numel() == 1 else rows.view(per_row) * direction
    if how != "clamp":
        return Shift(how, where, shift)
    check_clamp(None if safe_projection is None else (safe_projection,), 1, strengths)
    assert safe_projection is not None
    unit32 = vector.detach().float().cpu()
    length = float(unit32.norm())
    unit = (unit32 / max(length, 1e-12)).to(device)
    scale = torch.tensor(strengths, dtype=torch.float32, device=device)
    scale = scale.view(per_row) if scale.numel() > 1 else scale[0]
    cap = scale * length
    target = (safe_projection - length) + cap  # the harmful centroid's projection, moved s * |v| safe-ward
    return Shift(how, where, shift, unit=unit, target=target, cap=cap)


def apply_steering(hidden: torch.Tensor, shifts: Sequence[Shift], *, prompt_pass: bool) -> torch.Tensor:
    """The steering operation itself: a layer's output [rows, (seq,) hidden] with the shifts applied.

    `prompt_pass`: the states are the prompt's positions ([rows, seq, hidden] with seq > 1), not a
    decode step's one new position. `prompt` shifts act on prompt passes only; `generated` shifts
    act on decode steps and on the last prompt position, whose state writes the first new token.
    """
    for shift in shifts:
        if shift.where == "prompt" and not prompt_pass:
            continue
        if shift.where == "generated" and prompt_pass:
            hidden = torch.cat([hidden[:, :-1], shift.apply(hidden[:, -1:])], dim=1)
            continue
        hidden = shift.apply(hidden)
    return hidden
