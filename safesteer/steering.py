"""Applying steering vectors at inference time, without leaks between requests.

`steer(lm, specs)` adds `strength * vector` to a layer's output (residual stream or attention
block) at every position while the block is active. Two properties matter for a shared model:

- Hooks never outlive the block: they are removed in `finally`, exceptions included.
- Hooks only act for the code that installed them: each block registers a token in a
  `ContextVar`, and a hook whose token is not active in the calling thread does nothing.
  So one user's steered generation and another's plain one can run at the same time on the
  same model object and each gets exactly what it would get alone.

A strength can be one number or one number per batch row, so naive and steered outputs (or a
range of strengths) come out of a single `generate` call.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import cast

import torch

from .architectures import Site
from .errors import SafeSteerError
from .limits import check_layer, check_site, check_strength
from .models import LoadedModel

_ACTIVE_BLOCKS: ContextVar[frozenset[int]] = ContextVar("safesteer_active_blocks", default=frozenset())


@dataclass(frozen=True)
class SteeringSpec:
    """One vector added at one layer and site, with a strength per batch row or for all rows."""

    vector: torch.Tensor  # [hidden]
    layer: int
    strength: float | Sequence[float] = 1.0
    site: Site = "residual"

    def __post_init__(self) -> None:
        check_layer(self.layer)
        check_site(self.site)
        given = (self.strength,) if isinstance(self.strength, (int, float)) else tuple(self.strength)
        for strength in given:  # any sign: research may push either way; never NaN, inf or huge
            check_strength(strength, allow_negative=True)

    def strengths(self) -> tuple[float, ...]:
        if isinstance(self.strength, (int, float)):
            return (float(self.strength),)
        return tuple(float(s) for s in self.strength)

    def is_noop(self) -> bool:
        return all(s == 0.0 for s in self.strengths())


def shift_tensor(
    vector: torch.Tensor, strengths: tuple[float, ...], dtype: torch.dtype, device: torch.device, ndim: int
) -> torch.Tensor:
    """`strength * vector`, in the hidden states' dtype, shaped to add to [rows, ..., hidden] states of `ndim` dims.

    One strength gives [hidden]; one per row gives [rows, 1, ..., hidden]. The hooks and the
    decode loop (`decoding`) both build their shifts here, so they add the very same numbers.
    """
    direction = vector.detach().float().cpu().to(device, dtype)
    rows = torch.tensor(strengths, dtype=torch.float32).to(device, dtype)
    if rows.numel() == 1:
        return rows[0] * direction
    return rows.view(-1, *([1] * (ndim - 1))) * direction


def apply_shifts(hidden: torch.Tensor, shifts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The steering operation itself: a layer's output with the vectors' shifts added.

    The hooks (prompt passes, transformers' generate) and the lean decode loop (`decoding`)
    both steer through this function, so a new way of applying a vector is written once, here.
    """
    for shift in shifts:
        hidden = hidden + shift
    return hidden


def _shift_hook(block: int, vector: torch.Tensor, strengths: tuple[float, ...]):
    cache: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: object, output: object) -> object:
        if block not in _ACTIVE_BLOCKS.get():
            return None  # another caller's forward pass: leave it untouched
        hidden = cast(torch.Tensor, output[0] if isinstance(output, tuple) else output)
        if len(strengths) not in (1, hidden.shape[0]):
            raise SafeSteerError(f"{len(strengths)} strengths given for a batch of {hidden.shape[0]} rows")
        key = (hidden.dtype, hidden.device, hidden.dim())
        if key not in cache:
            cache[key] = shift_tensor(vector, strengths, hidden.dtype, hidden.device, hidden.dim())
        shifted = apply_shifts(hidden, (cache[key],))
        return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

    return hook


@contextmanager
def steer(lm: LoadedModel, specs: Sequence[SteeringSpec]) -> Iterator[None]:
    """Apply the specs to `lm` inside the block, for the calling thread only; always clean up."""
    hidden = lm.identity.hidden_size
    for spec in specs:
        if tuple(spec.vector.shape) != (hidden,):
            raise SafeSteerError(
                f"a steering vector of shape {tuple(spec.vector.shape)} does not fit this model (hidden size {hidden})"
            )
        lm.architecture.module(spec.layer, spec.site)  # validates layer and site before anything is installed
    token = object()
    block = id(token)
    with ExitStack() as stack:
        for spec in specs:
            if spec.is_noop():
                continue  # strength 0 everywhere: no hook, so output is exactly the unsteered one
            module = lm.architecture.module(spec.layer, spec.site)
            handle = module.register_forward_hook(_shift_hook(block, spec.vector, spec.strengths()))
            stack.callback(handle.remove)
        reset = _ACTIVE_BLOCKS.set(_ACTIVE_BLOCKS.get() | {block})
        try:
            yield
        finally:
            _ACTIVE_BLOCKS.reset(reset)
