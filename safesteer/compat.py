"""One place for what moved between transformers releases, so the rest of the code names it once.

transformers 5.24 renamed the key/value cache argument and output field from `past_key_values`
to `cache` (the old name warns and goes in 5.40). Hooks and direct forward calls must follow the
name the installed release uses: a pre-hook that only looks for the old name mistakes every
decoding step for a new prompt. The cache itself is made here too (`key_value_cache`), one way for
every caller.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch
from torch import nn

OLD_NAME = "past_key_values"
NEW_NAME = "cache"


@cache
def _keyword_for(forward: Any) -> str:
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return OLD_NAME
    return NEW_NAME if NEW_NAME in parameters else OLD_NAME


def cache_keyword(module: nn.Module) -> str:
    """The keyword `module.forward` takes its key/value cache by: `cache`, or `past_key_values` before 5.24."""
    return _keyword_for(type(module).forward)


def cache_kwargs(module: nn.Module, value: Any) -> dict[str, Any]:
    """`{keyword: value}` for passing a cache to `module` under the name its release expects."""
    return {cache_keyword(module): value}


def passed_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a forward call was given, whichever name the caller used (a forward pre-hook's view)."""
    given = kwargs.get(NEW_NAME)
    return given if given is not None else kwargs.get(OLD_NAME)


def returned_cache(output: Any) -> Any:
    """The cache a forward call returned, under either field name."""
    given = getattr(output, NEW_NAME, None)
    return given if given is not None else getattr(output, OLD_NAME, None)


def key_value_cache(
    config: Any, keys: Sequence[torch.Tensor] = (), values: Sequence[torch.Tensor] = (), rows: int = 1
) -> Any:
    """A key/value cache for a forward call, holding `keys` and `values` (each layer's [1, kv_heads, n,
    head_dim]) for every one of `rows` rows: positions all rows share, read once (or empty)."""
    from transformers import DynamicCache  # heavy: deferred so `import safesteer` stays quick

    cache = DynamicCache(config=config)
    for layer, (layer_keys, layer_values) in enumerate(zip(keys, values, strict=True)):
        cache.update(layer_keys.expand(rows, -1, -1, -1), layer_values.expand(rows, -1, -1, -1), layer)
    return cache
