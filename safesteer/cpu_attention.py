"""Attention for one new token on a CPU: three small float32 ops instead of the flash kernel.

While decoding, each step attends one query token per row to the cached keys. PyTorch's CPU
flash-attention kernel spends most of that call on set-up, and grows with the batch: for the
embedded model's 30 layers it cost about 2.4 ms per step for one row and 3.8 ms for two (the
naive + steered preview). Plain `softmax(q k^T) v` in float32 takes about half of that and is
more precise. Prompts (several query tokens) still go through transformers' SDPA path.

The function is registered with transformers as the attention implementation "safesteer_cpu",
so transformers' own forward pass and SafeSteer's decode loop (`decoding`) compute attention
identically, and their tokens can be compared one for one.

Prompts (several query tokens) go through `block_attention`: keys in blocks of `KEY_BLOCK` fixed
positions, combined in order with a running softmax. A query's result then depends only on the keys
it sees, never on how many tokens the pass holds, so a prompt read in two parts (a cached start, then
the rest) gives exactly the numbers of a whole pass. SDPA's sums change with the pass's length.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
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


KEY_BLOCK = 32
"""Keys per block of `block_attention`: blocks start at positions 0, 32, 64, ... in every pass."""
_MIN_QUERY_ROWS = 16
"""Fewer rows than this take other GEMM code paths on some CPUs, which sum in another order (measured)."""
QUERY_CHUNK = 64
"""Queries attended together: a chunk reads only the key blocks its queries can see (causal: half the work)."""


def block_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Causal attention of several query tokens, [rows, queries, heads, dim], in float32, split-invariant.

    `query` is [rows, heads, queries, dim] for the last `queries` of the `length` positions of
    `keys` and `values` [rows, kv_heads, length, dim]. `mask` is None (causal), a boolean
    [rows, 1, queries, length] (True = visible) or an additive float mask. Every block is padded to
    `KEY_BLOCK` keys and every product has at least `_MIN_QUERY_ROWS` rows, so each query's sums run
    in one order whatever the pass: a block it cannot see adds exactly nothing, and is skipped where
    none of a chunk's queries sees it.
    """
    rows, heads, queries, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    blocks = -(-length // KEY_BLOCK)
    padded = blocks * KEY_BLOCK
    keys32 = keys.float().new_zeros(rows, kv_heads, padded, dim)
    keys32[:, :, :length] = keys
    values32 = keys32.new_zeros(rows, kv_heads, padded, dim)
    values32[:, :, :length] = values
    if mask is None:
        seen = (
            torch.arange(padded, device=query.device)[None, :]
            <= torch.arange(length - queries, length, device=query.device)[:, None]
        )  # [queries, padded]
        visible = seen.expand(rows, 1, queries, padded)
        additive = None
    elif mask.dtype == torch.bool:
        visible = F.pad(mask, (0, padded - length), value=False)
        additive = None
    else:
        visible = F.pad(mask > float("-inf"), (0, padded - length), value=False)
        additive = F.pad(mask.float(), (0, padded - length), value=0.0)
    visible = visible.expand(rows, visible.shape[1], queries, padded)
    if additive is not None:
        additive = additive.expand(rows, additive.shape[1], queries, padded)
    first = visible.flatten(1, 2).any(dim=1).int().argmax(dim=1)  # [rows]: each row's first visible key
    if bool(first.any()):  # left padding: blocks start at each row's first real key, as they do unpadded
        where = torch.arange(padded, device=query.device)[None, :] + first[:, None]  # [rows, padded]
        inside = where < padded
        where = where.clamp(max=padded - 1)
        keys32 = keys32.gather(2, where[:, None, :, None].expand(rows, kv_heads, padded, dim))
        values32 = values32.gather(2, where[:, None, :, None].expand(rows, kv_heads, padded, dim))
        spread = where[:, None, None, :].expand(rows, visible.shape[1], queries, padded)
        visible = visible.gather(3, spread) & inside[:, None, None, :]
        if additive is not None:
            additive = additive.gather(3, spread[:, : additive.shape[1]])
    grouped = query.float().reshape(rows, kv_heads, group, queries, dim)
    chunks = []
    for first_query in range(0, queries, QUERY_CHUNK):
        span = slice(first_query, min(queries, first_query + QUERY_CHUNK))
        chunks.append(
            _attend_chunk(
                grouped[:, :, :, span],
                keys32,
                values32,
                visible[:, :, span],
                None if additive is None else additive[:, :, span],
                scaling,
            )
        )
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=3)
    return out.reshape(rows, heads, queries, dim).to(query.dtype).transpose(1, 2).contiguous()


def _attend_chunk(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor,
    additive: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """`block_attention` for some queries [rows, kv_heads, group, n, dim]: key blocks in order, up to the
    last one any of them sees (the rest would add exactly nothing)."""
    rows, kv_heads, group, n, dim = query.shape
    grouped = query.reshape(rows, kv_heads, group * n, dim)  # query heads of one group share rows
    visible = visible.repeat(1, 1, group, 1)
    additive = None if additive is None else additive.repeat(1, 1, group, 1)
    extra = max(0, _MIN_QUERY_ROWS - group * n)
    if extra:
        grouped = torch.cat([grouped, grouped.new_zeros(rows, kv_heads, extra, dim)], dim=2)
        visible = torch.cat([visible, visible.new_ones(rows, visible.shape[1], extra, visible.shape[3])], dim=2)
        if additive is not None:
            additive = torch.cat([additive, additive.new_zeros(rows, additive.shape[1], extra, additive.shape[3])], 2)
    seen = visible.flatten(0, 2).any(dim=0).nonzero()
    blocks = int(seen[-1]) // KEY_BLOCK + 1 if seen.numel() else 0
    hidden = ~visible
    scaled = grouped * scaling
    # The lowest float, not -inf: exp() of a hidden score is still exactly 0, and nothing turns into NaN.
    lowest = torch.finfo(torch.float32).min
    top = grouped.new_full(grouped.shape[:-1], lowest)
    total = grouped.new_zeros(grouped.shape[:-1])
    out = torch.zeros_like(grouped)
    for block in range(blocks):
        span = slice(block * KEY_BLOCK, (block + 1) * KEY_BLOCK)
        scores = torch.matmul(scaled, keys[:, :, span].transpose(-1, -2))
        if additive is not None:
            scores = scores + additive[..., span]
        scores = scores.masked_fill_(hidden[..., span], lowest)
        new_top = torch.maximum(top, scores.amax(dim=-1))
        keep = torch.exp(top - new_top)  # exactly 1 where the block adds nothing
        weights = torch.exp(scores - new_top.unsqueeze(-1))
        total = total * keep + weights.sum(dim=-1)
        out = out * keep.unsqueeze(-1) + torch.matmul(weights, values[:, :, span])
        top = new_top
    out = out / total.unsqueeze(-1)
    return out[:, :, : group * n].reshape(rows, kv_heads, group, n, dim)


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
    if dropout or any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux")):
        from transformers.integrations.sdpa_attention import (
            sdpa_attention_forward,  # heavy: deferred so `import safesteer` stays quick
        )

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.shape[2] != 1:
        return block_attention(query, key, value, attention_mask, scale), None
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
