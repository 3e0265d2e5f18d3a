"""Attention for one new token on a CPU: three small float32 ops instead of the flash kernel.

While decoding, each step attends one query token per row to the cached keys. PyTorch's CPU
flash-attention kernel spends most of that call on set-up, and grows with the batch: for the
embedded model's 30 layers it cost about 2.4 ms per step for one row and 3.8 ms for two (the
naive + steered preview). Plain `softmax(q k^T) v` in float32 takes about half of that and is
more precise. Prompts (several query tokens) still go through transformers' SDPA path.

The function is registered with transformers as the attention implementation "safesteer_cpu",
so transformers' own forward pass and SafeSteer's decode loop (`decoding`) compute attention
identically, and their tokens can be compared one for one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .architectures import family

NAME = "safesteer_cpu"


def single_query_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Attention of one query token per row, [rows, heads * dim]; query heads share key heads in groups.

    `query` is [rows, heads, 1, dim]; `keys` and `values` [rows, kv_heads, length, dim]; `mask`
    is None, a boolean [rows, 1, 1, length] (True = visible) or an additive float mask.
    """
    rows, heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim).float()
    scores = torch.matmul(grouped, keys.float().transpose(-1, -2)) * scaling  # [rows, kv_heads, group, length]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = torch.matmul(scores.softmax(dim=-1), values.float())
    return out.to(query.dtype).reshape(rows, heads * dim)


def cpu_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function protocol: output [rows, queries, heads, dim] and no weights."""
    if query.shape[2] != 1 or dropout or any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux")):
        from transformers.integrations.sdpa_attention import (
            sdpa_attention_forward,  # heavy: deferred so `import safesteer` stays quick
        )

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = single_query_attention(query, key, value, attention_mask, scale)
    return out.reshape(query.shape[0], 1, query.shape[1], query.shape[-1]), None


def register() -> None:
    """Make "safesteer_cpu" a transformers attention implementation (with SDPA's masks)."""
    from transformers import (  # heavy: deferred so `import safesteer` stays quick
        AttentionInterface,
        AttentionMaskInterface,
    )
    from transformers.masking_utils import sdpa_mask  # heavy: deferred so `import safesteer` stays quick

    AttentionInterface.register(NAME, cpu_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_cpu_attention(model: Any) -> bool:
    """Switch a CPU model of a known family that uses SDPA to this attention; True when switched."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    spec = family(getattr(config, "model_type", None))
    if spec is None or not spec.plain_attention:
        return False
    register()
    model.set_attn_implementation(NAME)
    return getattr(model.config, "_attn_implementation", None) == NAME
