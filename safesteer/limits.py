"""The limits every entry point applies to steering settings and user text, in one place.

The CLI, the app, bundles, the store and the deployer API all check settings here, so a value
that one of them refuses cannot come in through another, and the message is the same everywhere.
"""

from __future__ import annotations

import math
import os
from typing import Any

from .architectures import SITES, Site
from .errors import SafeSteerError

MAX_STRENGTH = 32.0
"""Largest saved strength (four times the app's slider). Far past it, a vector only breaks the text."""
DEFAULT_MAX_PROMPT_TOKENS = 1024
"""Prompt tokens a preview or generation accepts (`SAFESTEER_MAX_PROMPT_TOKENS` overrides)."""


def check_strength(value: Any, *, allow_negative: bool = False, what: str = "strength") -> float:
    """A finite strength within ±MAX_STRENGTH; negative only when the caller asks for it explicitly.

    A negative strength pushes toward the harmful side: useful for research, never a safe default.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SafeSteerError(f"the {what} must be a number, not {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise SafeSteerError(f"the {what} must be a finite number, not {number}")
    low = -MAX_STRENGTH if allow_negative else 0.0
    if not low <= number <= MAX_STRENGTH:
        hint = "" if allow_negative or number >= 0 else " (a negative strength must be asked for explicitly)"
        raise SafeSteerError(f"the {what} must be between {low:g} and {MAX_STRENGTH:g}, not {number:g}{hint}")
    return number


def check_layer(value: Any, n_layers: int | None = None) -> int:
    """A whole-number layer index, inside the model when its layer count is known."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise SafeSteerError(f"the layer must be a whole number, not {value!r}")
    if value < 0 or (n_layers is not None and value >= n_layers):
        top = f"0..{n_layers - 1}" if n_layers is not None else "0 or more"
        raise SafeSteerError(f"layer {value} is out of range: use {top}")
    return value


def check_site(value: Any) -> Site:
    if value not in SITES:
        raise SafeSteerError(f"unknown site {value!r}: use one of {', '.join(SITES)}")
    return value


def max_prompt_tokens() -> int:
    """The configured prompt limit in tokens (`SAFESTEER_MAX_PROMPT_TOKENS`, default 1024)."""
    configured = os.environ.get("SAFESTEER_MAX_PROMPT_TOKENS", "").strip()
    if not configured:
        return DEFAULT_MAX_PROMPT_TOKENS
    try:
        limit = int(configured)
    except ValueError as exc:
        raise SafeSteerError(f"SAFESTEER_MAX_PROMPT_TOKENS must be a whole number, not {configured!r}") from exc
    if limit < 1:
        raise SafeSteerError("SAFESTEER_MAX_PROMPT_TOKENS must be at least 1")
    return limit
