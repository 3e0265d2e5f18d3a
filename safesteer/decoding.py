"""A lean greedy decode loop for Llama-style models: transformers' arithmetic, less Python per token.

With 4-bit weights on a CPU, a decode step of the embedded 30-layer model spends about as much
time in Python as in matrix products: transformers' generate rebuilds masks, position tensors
and a growing (concatenated) KV cache on every step, and runs logits processors over the whole
vocabulary. This loop does the prompt (prefill) with the model's own forward pass, then decodes
with the model's own modules (norms, projections, MLPs, rotary embedding) over a preallocated
KV cache, adding steering vectors directly instead of through hooks.

It covers layers that compute exactly `h + attn(norm(h))` then `h + mlp(norm(h))` with standard
rotary attention (Llama, Mistral without sliding window, Qwen2, SmolLM). `supports(lm)` says
whether a loaded model qualifies; anything else uses transformers' generate. Tests check that
both paths give the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_attention
from .architectures import ARCHITECTURES, family
from .compat import cache_kwargs
from .gates import GateReading
from .int4 import Int4Linear, Int8Linear
from .models import LoadedModel
from .operations import Shift, apply_steering
from .sampling import TokenChooser
from .steering import SteeringSpec, SteeringState, steer

_GREEDY_CHANGERS = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "sequence_bias",
    "encoder_repetition_penalty",
)


LEAN_MLPS = frozenset(spec.lean_mlp for spec in ARCHITECTURES.values() if spec.lean_mlp)

FAST_DEVICES = frozenset({"cpu"})
"""Devices on which `generate` picks this loop by itself (measured: see docs/benchmarks.md)."""


def supports(lm: LoadedModel) -> bool:
    """Whether `generate` should decode `lm` with this loop: a device where it wins, and a layer structure it covers."""
    return lm.device.type in FAST_DEVICES and fits(lm)


def fits(lm: LoadedModel) -> bool:
    """Whether `lm` has exactly the layer structure this loop reproduces, on whatever device."""
    model = lm.model
    if len(set((getattr(model, "hf_device_map", None) or {"": "one"}).values())) > 1:
        return False  # spread over several devices: hooks move shifts to each layer's device, this loop does not
    config = model.config
    generation = getattr(model, "generation_config", None)
    if any(getattr(generation, name, None) not in (None, 0, 1.0) for name in _GREEDY_CHANGERS):
        return False  # the model asks generate for logits processors this loop does not apply
    if getattr(config, "_attn_implementation", None) not in ("sdpa", cpu_attention.NAME):
        return False
    spec = family(getattr(config, "model_type", None))
    if spec is None or spec.lean_layer is None:
        return False
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return False
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "rotary_emb") or not hasattr(base, "norm"):
        return False
    layer = lm.architecture.layers[0]
    attention = getattr(layer, "self_attn", None)
    parts = ("input_layernorm", "post_attention_layernorm", "mlp")
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    return (
        attention is not None
        and all(hasattr(layer, p) for p in parts)
        and all(hasattr(attention, p) for p in projections)
        and not hasattr(attention, "q_norm")
        and type(layer).forward.__qualname__.split(".")[0] == spec.lean_layer
    )


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """`sin` with its first half negated: `roll(x) * signed_sin` equals transformers' `rotate_half(x) * sin`."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _shifts(
    state: SteeringState, rows: int, dtype: torch.dtype, device: torch.device
) -> dict[tuple[int, str], list[Shift]]:
    """Per (layer, site), each decode step's operations on [rows, hidden] states, exactly as the hooks apply them."""
    shifts: dict[tuple[int, str], list[Shift]] = {}
    for index, spec in enumerate(state.specs):
        strengths = state.strengths(index, rows)
        if all(s == 0.0 for s in strengths) or spec.where == "prompt":
            continue  # nothing to do at decode steps
        for part, layer in enumerate(spec.layers()):
            shifts.setdefault((layer, spec.site), []).append(spec.prepare(part, strengths, dtype, device, ndim=2))
    return shifts


def _sdpa_attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """One query token's attention, [rows, heads * dim], computed the way transformers' sdpa path does.

    Without padding there is no mask and grouped-query attention runs natively; with a mask,
    the query heads that share a key/value head are packed as that head's query positions.
    """
    rows, heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    if visible is None or kv_heads == heads:
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=visible, scale=scaling, enable_gqa=kv_heads != heads
        )
    else:
        packed = query.reshape(rows, kv_heads, heads // kv_heads, dim)
        out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=visible, scale=scaling)
    return out.reshape(rows, heads * dim)


class _StaticCache:
    """Keys and values for every layer in buffers sized for the whole generation.

    `dtype` float32 suits `cpu_attention`, which computes in float32 anyway: the cache is then
    not converted again at every step (bfloat16 values convert to float32 exactly).
    """

    def __init__(self, prefill: Any, n_layers: int, total: int, dtype: torch.dtype | None = None) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0
        for index in range(n_layers):
            layer = prefill.layers[index]
            keys, values = layer.keys, layer.values
            batch, heads, length, dim = keys.shape
            key_buffer = keys.new_empty(batch, heads, total, dim, dtype=dtype or keys.dtype)
            value_buffer = values.new_empty(batch, heads, total, dim, dtype=dtype or values.dtype)
            key_buffer[:, :, :length] = keys
            value_buffer[:, :, :length] = values
            self.keys.append(key_buffer)
            self.values.append(value_buffer)
            self.length = length


Linear2d = Callable[[torch.Tensor], torch.Tensor]


def _linear(module: nn.Module) -> Linear2d:
    """A projection of [rows, in] activations; 4-bit and int8 layers skip straight to their kernel."""
    if isinstance(module, (Int4Linear, Int8Linear)) and module.bias is None:
        return module.matmul
    return module


def _norm(module: nn.Module) -> Linear2d:
    """An RMSNorm as one fused op; it normalizes in float32 and rounds once, as transformers' Llama norm does."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not type(module).__name__.endswith("RMSNorm") or weight is None or eps is None:
        return module
    shape = (weight.shape[-1],)
    return lambda x: weight * torch.rms_norm(x, shape, None, eps)


def _mlp(module: nn.Module) -> Linear2d:
    parts: list[Any] = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")]
    if any(part is None for part in parts) or type(module).__name__ not in LEAN_MLPS:
        return module
    gate, up, down = (_linear(p) for p in parts[:3])
    act = parts[3]
    return lambda x: down(act(gate(x)) * up(x))


@dataclass(frozen=True)
class _LayerPlan:
    """One decoder layer as plain functions of [rows, hidden] activations."""

    attention_norm: Linear2d
    q: Linear2d
    k: Linear2d
    v: Linear2d
    o: Linear2d
    mlp_norm: Linear2d
    mlp: Linear2d

    @classmethod
    def of(cls, layer: Any) -> _LayerPlan:
        attn = layer.self_attn
        return cls(
            attention_norm=_norm(layer.input_layernorm),
            q=_linear(attn.q_proj),
            k=_linear(attn.k_proj),
            v=_linear(attn.v_proj),
            o=_linear(attn.o_proj),
            mlp_norm=_norm(layer.post_attention_layernorm),
            mlp=_mlp(layer.mlp),
        )


@torch.inference_mode()
def greedy_decode(
    lm: LoadedModel,
    batch: dict[str, torch.Tensor],
    specs: Sequence[SteeringSpec],
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    suppress_eos: bool = False,
    streamer: Any = None,
    gate_readings: list[GateReading] | None = None,
    chooser: TokenChooser | None = None,
) -> torch.Tensor:
    """New token ids [rows, <= max_new_tokens] for a left-padded batch, steered by `specs`.

    Tokens are greedy unless a `chooser` samples some rows (`sampling`).
    Rows that finish (emit end-of-text) are padded with `pad_token_id` like transformers does;
    decoding stops when every row has finished. `suppress_eos` forbids end-of-text (fixed length).
    """
    from transformers import DynamicCache  # heavy: deferred so `import safesteer` stays quick

    model = lm.model
    base = model.model
    layers = lm.architecture.layers
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, prompt_length = input_ids.shape
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    cache = DynamicCache(config=model.config)
    with steer(lm, specs, gate_readings) as state:  # the prompt goes through the model's own pass, gates and hooks
        logits = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(model, cache),
        ).logits[:, -1]
    uses_cpu_attention = model.config._attn_implementation == cpu_attention.NAME
    attend = cpu_attention.single_query_attention if uses_cpu_attention else _sdpa_attend
    kv = _StaticCache(cache, len(layers), prompt_length + max_new_tokens, torch.float32 if uses_cpu_attention else None)
    dtype = base.embed_tokens.weight.dtype
    device = input_ids.device
    shifts = _shifts(state, rows, dtype, device)
    plans = [_LayerPlan.of(layer) for layer in layers]
    final_norm, head = _norm(base.norm), _linear(model.lm_head)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    key_mask = torch.zeros(rows, 1, 1, prompt_length + max_new_tokens, dtype=torch.bool, device=device)
    key_mask[:, 0, 0, :prompt_length] = mask.bool()
    padded = not bool(mask.bool().all())
    position = positions[:, -1:]
    attention: Any = layers[0].self_attn
    head_dim, scaling = attention.head_dim, attention.scaling
    heads = model.config.num_attention_heads
    produced: list[torch.Tensor] = []

    for step in range(max_new_tokens):
        if suppress_eos and eos.numel():
            logits[:, eos] = float("-inf")
        token = logits.argmax(dim=-1) if chooser is None else chooser.choose(logits)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        produced.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
        finished |= torch.isin(token, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        slot = kv.length
        kv.length += 1
        key_mask[:, 0, 0, slot] = True
        position = position + 1
        hidden = base.embed_tokens(token)
        cos, sin = base.rotary_emb(hidden, position)
        cos, sin = cos.view(rows, 1, 1, head_dim), _signed_sin(sin.view(rows, 1, 1, head_dim))
        visible = key_mask[..., : kv.length] if padded else None
        for index, plan in enumerate(plans):
            normed = plan.attention_norm(hidden)
            query_key = torch.cat(
                [plan.q(normed).view(rows, heads, 1, head_dim), plan.k(normed).view(rows, -1, 1, head_dim)], dim=1
            )
            query_key = query_key * cos + query_key.roll(head_dim // 2, dims=-1) * sin
            keys, values = kv.keys[index], kv.values[index]
            keys[:, :, slot] = query_key[:, heads:, 0]
            values[:, :, slot] = plan.v(normed).view(rows, -1, head_dim)
            context = attend(query_key[:, :heads], keys[:, :, : kv.length], values[:, :, : kv.length], visible, scaling)
            hidden = hidden + apply_steering(plan.o(context), shifts.get((index, "attention"), ()), prompt_pass=False)
            hidden = hidden + plan.mlp(plan.mlp_norm(hidden))
            hidden = apply_steering(hidden, shifts.get((index, "residual"), ()), prompt_pass=False)
        logits = head(final_norm(hidden))
    if streamer is not None:
        streamer.end()
    return torch.stack(produced, dim=1)
