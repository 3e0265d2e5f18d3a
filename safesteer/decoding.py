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
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_attention
from .architectures import ARCHITECTURES, family
from .compat import key_value_cache
from .errors import SafeSteerError
from .gates import GateReading
from .int4 import Int4Linear, Int8Linear
from .models import LoadedModel
from .operations import Shift, apply_steering
from .prompt_passes import TemplateStart, new_cache, prompt_pass, right_padded, template_start
from .sampling import Sampling, TokenChooser
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
    state: SteeringState, rows: int, dtype: torch.dtype, device: torch.device, keep: Sequence[int] | None = None
) -> dict[tuple[int, str], list[Shift]]:
    """Per (layer, site), each decode step's operations on [rows, hidden] states, exactly as the hooks apply them.

    `keep` (indices among the `rows` the state decided for) prepares them for those rows only.
    """
    shifts: dict[tuple[int, str], list[Shift]] = {}
    for index, spec in enumerate(state.specs):
        strengths = state.strengths(index, rows)
        if keep is not None and len(strengths) > 1:
            strengths = tuple(strengths[r] for r in keep)
        if all(s == 0.0 for s in strengths) or spec.where == "prompt":
            continue  # nothing to do at decode steps
        for part, layer in enumerate(spec.layers()):
            shifts.setdefault((layer, spec.site), []).append(spec.prepare(part, strengths, dtype, device, ndim=2))
    return shifts


def _sdpa_attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: None, scaling: float
) -> torch.Tensor:
    """One query token's attention, [rows, heads * dim], computed the way transformers' sdpa path does.

    Rows are never padded here (`_Cohort`), so there is no mask; `mask` keeps `single_query_attention`'s
    signature. Grouped-query attention runs natively.
    """
    rows, heads, _, dim = query.shape
    out = F.scaled_dot_product_attention(query, keys, values, scale=scaling, enable_gqa=keys.shape[1] != heads)
    return out.reshape(rows, heads * dim)


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


@dataclass
class _Cohort:
    """Rows that joined together with unpadded prompts of one length: their caches line up.

    A cohort attends as one block with no mask, and every other operation of a decode step computes
    each row on its own (the 4-bit and int8 kernels, norms, element-wise arithmetic), so a row's
    numbers never depend on the other cohorts in the batch, nor on padding, of which there is none.
    """

    owners: list[Any]
    keys: list[torch.Tensor]  # per layer [rows, kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    length: int  # cache positions filled
    state: SteeringState
    decided: int  # how many rows the state's gates decided for
    kept: list[int]  # which of those rows are still here
    left: list[int]  # tokens each row may still make
    choosers: list[TokenChooser | None]  # None: greedy
    logits: torch.Tensor | None  # [rows, vocab]: each row's scores for its next token, until it is chosen
    tokens: torch.Tensor | None = None  # [rows]: each row's chosen token, not yet fed through the model
    shifts: dict[tuple[int, str], list[Shift]] = field(default_factory=dict)

    def near_end(self, within: int) -> bool:
        """Whether every row finishes within `within` more tokens (a cohort's rows share a budget)."""
        return max(self.left) <= within

    def keep_rows(self, keep: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
        """Only rows `keep` (positions in this cohort) go on; their caches and steering follow them."""
        if len(keep) == len(self.owners):
            return
        index = torch.tensor(list(keep), dtype=torch.long, device=device)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        if self.logits is not None:
            self.logits = self.logits.index_select(0, index)
        if self.tokens is not None:
            self.tokens = self.tokens.index_select(0, index)
        self.owners = [self.owners[r] for r in keep]
        self.left = [self.left[r] for r in keep]
        self.choosers = [self.choosers[r] for r in keep]
        self.kept = [self.kept[r] for r in keep]
        self.shifts = _shifts(self.state, self.decided, dtype, device, keep=self.kept)


@dataclass(frozen=True)
class SharedPrefix:
    """The keys and values of a token prefix every row of a batch starts with, from one unsteered pass."""

    ids: torch.Tensor  # [length]
    keys: list[torch.Tensor]  # per layer [1, kv_heads, length, head_dim]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


class RunningBatch:
    """Rows decoded together; rows join between steps, after their own prompt pass, and leave when done.

    This is iteration-level scheduling: a server adds a new request at the next decoding step rather
    than after the batch in flight, and a request whose client went away leaves at the next step.
    Each group of rows admitted together is a `_Cohort`; cohorts share every step's products.
    """

    def __init__(self, lm: LoadedModel, *, eos_token_ids: Sequence[int], suppress_eos: bool = False) -> None:
        model = lm.model
        self.lm = lm
        self.base = model.model
        layers = lm.architecture.layers
        uses_cpu_attention = model.config._attn_implementation == cpu_attention.NAME
        self.attend = cpu_attention.single_query_attention if uses_cpu_attention else _sdpa_attend
        # cpu_attention computes in float32 anyway: a float32 cache is not converted again at every step
        self.cache_dtype = torch.float32 if uses_cpu_attention else None
        self.plans = [_LayerPlan.of(layer) for layer in layers]
        self.final_norm, self.head = _norm(self.base.norm), _linear(model.lm_head)
        self.dtype = self.base.embed_tokens.weight.dtype
        self.device = self.base.embed_tokens.weight.device
        self.eos = set(int(i) for i in eos_token_ids)
        self.eos_ids = torch.tensor(sorted(self.eos), dtype=torch.long, device=self.device)
        self.suppress_eos = suppress_eos
        attention: Any = layers[0].self_attn
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.heads = model.config.num_attention_heads
        self.cohorts: list[_Cohort] = []

    def __len__(self) -> int:
        return sum(len(cohort.owners) for cohort in self.cohorts)

    @torch.inference_mode()
    def shared_prefix(self, rows: Sequence[torch.Tensor], shortest: int = 8) -> SharedPrefix | None:
        """The longest prefix all these unpadded prompts share (each keeps a token of its own), read once.

        Unsteered rows only: steering would change the prefix's keys and values. None when the prefix
        is shorter than `shortest` tokens (not worth a pass of its own).
        """
        first = rows[0]
        length = min(int(row.shape[0]) for row in rows) - 1
        for row in rows[1:]:
            same = (row[:length] == first[:length]).long()
            length = int(same.cumprod(0).sum())
        if length < shortest:
            return None
        cache = new_cache(self.lm)
        prompt_pass(self.lm, first[:length].unsqueeze(0), [length], 0, cache)
        layers: list[Any] = [cache.layers[i] for i in range(len(self.plans))]
        return SharedPrefix(first[:length], [layer.keys for layer in layers], [layer.values for layer in layers])

    @property
    def owners(self) -> list[Any]:
        return [owner for cohort in self.cohorts for owner in cohort.owners]

    @torch.inference_mode()
    def admit(
        self,
        input_ids: torch.Tensor | Sequence[torch.Tensor],
        specs: Sequence[SteeringSpec],
        *,
        owners: Sequence[Any],
        max_new_tokens: Sequence[int],
        sampling: Sequence[Sampling | None] | None = None,
        gated: Sequence[int] | None = None,
        prefix: SharedPrefix | None = None,
    ) -> GateReading | None:
        """Run the prompt pass of unpadded prompts and add their rows; returns the gates' reading of them.

        `input_ids` is [rows, length] for prompts of one length, or one 1-D tensor per row. Prompts of
        several lengths share one right-padded pass where this machine computes it exactly like a pass
        of each alone (`prompt_passes.TemplateStart.exact`); elsewhere each length gets its own pass.
        Each row's pass reads the chat template's start from the cache where it can.
        `specs` carry one strength or one per row; gated specs read their gates here (`gated`:
        which specs' gates to read, see `steer`).
        With `prefix` (unsteered rows only), `input_ids` are what follows it, and the pass reads only those.
        """
        rows_ids = list(input_ids)
        rows = len(rows_ids)
        lengths = [int(row.shape[0]) for row in rows_ids]
        if gated is None:
            gated = [i for i, spec in enumerate(specs) if spec.gated and not spec.is_noop()]
        opening = template_start(self.lm)
        shared_pass = len(set(lengths)) == 1 or (
            prefix is None and not any(spec.where == "generated" for spec in specs) and opening.exact()
        )
        if not shared_pass:  # one pass per length
            return self._admit_by_length(rows_ids, specs, owners, max_new_tokens, sampling, gated, prefix)
        readings: list[GateReading] = []
        state = SteeringState(specs, readings, gated)
        ids = right_padded(rows_ids)
        start = 0
        if prefix is not None:
            if any(not spec.is_noop() for spec in specs):
                raise SafeSteerError("a shared prefix is read unsteered: it cannot serve steered rows")
            start = prefix.length
            cache = key_value_cache(self.lm.model.config, prefix.keys, prefix.values, rows)
            if state.gated:
                raise SafeSteerError("gates read the whole prompt: a shared prefix cannot serve gated rows")
        else:
            cache = new_cache(self.lm)
            mask = (
                torch.arange(ids.shape[1], device=ids.device)[None, :]
                < torch.tensor(lengths, device=ids.device)[:, None]
            )
            mask = mask.to(ids.dtype)
            usable = all(opening.usable_for(row[None]) for row in rows_ids)
            if state.gated:
                wanted = {(spec.gate.layer, spec.gate.site) for spec in (specs[i] for i in state.gated) if spec.gate}
                state.decide(self.lm, ids, mask, start=opening.for_gates(wanted) if usable else None)
            if usable:
                self._fill_start(opening, state, specs, rows, cache)
                start = opening.length
                ids = ids[:, start:]
                lengths = [n - start for n in lengths]
        whole = [start + n for n in lengths]
        with steer(self.lm, specs, decided=state):  # the model's own pass, steered as the gates decided
            logits = prompt_pass(self.lm, ids, whole, start, cache)
        self._add_cohorts(cache, whole, state, owners, max_new_tokens, sampling, logits)
        return readings[0] if readings else None

    def _admit_by_length(
        self,
        rows_ids: Sequence[torch.Tensor],
        specs: Sequence[SteeringSpec],
        owners: Sequence[Any],
        max_new_tokens: Sequence[int],
        sampling: Sequence[Sampling | None] | None,
        gated: Sequence[int],
        prefix: SharedPrefix | None,
    ) -> GateReading | None:
        """`admit` one length at a time; the readings are put back together in the rows' order."""
        groups: dict[int, list[int]] = {}
        for row, ids in enumerate(rows_ids):
            groups.setdefault(int(ids.shape[0]), []).append(row)
        scores: list[list[float]] = [[] for _ in rows_ids]
        fired: list[list[bool]] = [[] for _ in rows_ids]
        any_reading = False
        for members in groups.values():
            reading = self.admit(
                torch.stack([rows_ids[r] for r in members]),
                [_rows(spec, members) for spec in specs],
                owners=[owners[r] for r in members],
                max_new_tokens=[max_new_tokens[r] for r in members],
                sampling=None if sampling is None else [sampling[r] for r in members],
                gated=gated,
                prefix=prefix,
            )
            if reading is not None:
                any_reading = True
                for j, row in enumerate(members):
                    scores[row], fired[row] = reading.scores[j], reading.fired[j]
        return GateReading(scores=scores, fired=fired) if any_reading else None

    def _fill_start(
        self, opening: TemplateStart, state: SteeringState, specs: Sequence[SteeringSpec], rows: int, cache: Any
    ) -> None:
        """Fill `cache` with each row's template start, under the steering the gates gave that row."""
        strengths = [state.strengths(index, rows) for index in range(len(specs))]
        each = [tuple(s[row] if len(s) > 1 else s[0] for s in strengths) for row in range(rows)]
        found = {given: opening.keys_values(list(zip(specs, given, strict=True))) for given in set(each)}
        entries = [found[given] for given in each]  # rows steered alike share one entry, looked up once
        for index in range(len(self.plans)):
            keys = [entry.keys[index] for entry in entries]
            values = [entry.values[index] for entry in entries]
            cache.update(
                keys[0].expand(rows, -1, -1, -1) if all(k is keys[0] for k in keys) else torch.cat(keys),
                values[0].expand(rows, -1, -1, -1) if all(v is values[0] for v in values) else torch.cat(values),
                index,
            )

    def _add_cohorts(
        self,
        cache: Any,
        lengths: Sequence[int],
        state: SteeringState,
        owners: Sequence[Any],
        max_new_tokens: Sequence[int],
        sampling: Sequence[Sampling | None] | None,
        logits: torch.Tensor,
    ) -> None:
        """The prompt pass's rows join the batch: one cohort per (prompt length, token budget).

        Rows of one length have caches that line up; rows of one budget near their end together, so
        `step(within=)` can step a cohort about to finish on its own.
        """
        rows = len(lengths)
        given = list(sampling) if sampling is not None else [None] * rows
        choosers = [None if s is None or s.greedy else TokenChooser([s]) for s in given]
        groups: dict[tuple[int, int], list[int]] = {}
        for row, key in enumerate(zip(lengths, max_new_tokens, strict=True)):
            groups.setdefault(key, []).append(row)
        layers: list[Any] = [cache.layers[index] for index in range(len(self.plans))]
        for (length, budget), members in groups.items():
            index = torch.tensor(members, dtype=torch.long, device=self.device)
            keys: list[torch.Tensor] = []
            values: list[torch.Tensor] = []
            for layer in layers:
                for source, target in ((layer.keys, keys), (layer.values, values)):
                    kv_heads, head_dim = source.shape[1], source.shape[3]
                    buffer = source.new_empty(len(members), kv_heads, length + budget, head_dim, dtype=self.cache_dtype)
                    buffer[:, :, :length] = source[:, :, :length] if len(members) == rows else source[index, :, :length]
                    target.append(buffer)
            cohort = _Cohort(
                owners=[owners[r] for r in members],
                keys=keys,
                values=values,
                length=length,
                state=state,
                decided=rows,
                kept=list(members),
                left=[max_new_tokens[r] for r in members],
                choosers=[choosers[r] for r in members],
                logits=logits if len(members) == rows else logits.index_select(0, index),
            )
            cohort.shifts = _shifts(
                state, rows, self.dtype, self.device, keep=None if len(members) == rows else members
            )
            self.cohorts.append(cohort)

    def drop(self, owners: set[Any]) -> None:
        """Rows of these owners leave now (their requests were cancelled)."""
        for cohort in self.cohorts:
            cohort.keep_rows([r for r, o in enumerate(cohort.owners) if o not in owners], self.dtype, self.device)
        self.cohorts = [cohort for cohort in self.cohorts if cohort.owners]

    def finishing(self, within: int) -> list[Any]:
        """Owners of rows with at most `within` tokens left: they finish within that many steps."""
        return [owner for cohort in self.cohorts if cohort.near_end(within) for owner in cohort.owners]

    @torch.inference_mode()
    def step(self, within: int | None = None) -> list[tuple[Any, int, bool]]:
        """Feed every row's chosen token through the model, then choose each row's next token.

        Returns (owner, token, finished) per token chosen, in order; a finished row (end of text, or
        its token budget spent) has left the batch. A row's token is returned as soon as it is chosen,
        before the step that feeds it: a row that has just finished never waits for its neighbours'
        next step. Rows fresh from their prompt pass first get the token that pass chose, so they
        return two tokens in their first step. `within` steps only the rows with at most that many
        tokens left (a request about to finish is not held to the pace of a long batch); the others
        wait unchanged. A row's tokens are the same whichever rows share its steps.
        """
        emitted: list[tuple[Any, int, bool]] = []
        going: list[_Cohort] = []
        waiting: list[_Cohort] = []
        for cohort in self.cohorts:
            if within is not None and not cohort.near_end(within):
                waiting.append(cohort)
                continue
            if cohort.tokens is None and not self._choose(cohort, emitted):
                continue  # every row finished on the prompt pass's own token
            going.append(cohort)
        if going:
            self._forward(going)
        kept = [cohort for cohort in going if self._choose(cohort, emitted)]
        self.cohorts = waiting + kept
        return emitted

    def _choose(self, cohort: _Cohort, emitted: list[tuple[Any, int, bool]]) -> bool:
        """Choose the cohort's next tokens from its logits; finished rows leave. Whether any row goes on."""
        logits = cohort.logits
        assert logits is not None
        if self.suppress_eos and self.eos_ids.numel():
            logits[:, self.eos_ids] = float("-inf")
        tokens = logits.argmax(dim=-1)
        for row, chooser in enumerate(cohort.choosers):
            if chooser is not None:
                tokens[row] = chooser.choose(logits[row : row + 1])[0]
        cohort.logits, cohort.tokens = None, tokens
        keep = []
        for row, (owner, token) in enumerate(zip(cohort.owners, tokens.tolist(), strict=True)):
            cohort.left[row] -= 1
            finished = token in self.eos or cohort.left[row] <= 0
            emitted.append((owner, int(token), finished))
            if not finished:
                keep.append(row)
        if keep and len(keep) < len(cohort.owners):
            cohort.keep_rows(keep, self.dtype, self.device)
        return bool(keep)

    def _steered(
        self, states: torch.Tensor, spans: Sequence[tuple[_Cohort, int, int]], key: tuple[int, str]
    ) -> torch.Tensor:
        """`states` [rows, hidden] with each cohort's own steering at (layer, site) applied to its rows."""
        if not any(key in cohort.shifts for cohort, _, _ in spans):
            return states
        if len(spans) == 1:
            return apply_steering(states, spans[0][0].shifts[key], prompt_pass=False)
        return torch.cat(
            [apply_steering(states[a:b], cohort.shifts.get(key, ()), prompt_pass=False) for cohort, a, b in spans]
        )

    def _attend_cohorts(
        self, spans: Sequence[tuple[_Cohort, int, int]], index: int, query_key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """Each cohort's new keys and values written to its cache, then its attention over that cache alone."""
        heads, contexts = self.heads, []
        for cohort, a, b in spans:
            keys, values, slot = cohort.keys[index], cohort.values[index], cohort.length
            keys[:, :, slot] = query_key[a:b, heads:, 0]
            values[:, :, slot] = value[a:b]
            contexts.append(
                self.attend(
                    query_key[a:b, :heads], keys[:, :, : slot + 1], values[:, :, : slot + 1], None, self.scaling
                )
            )
        return contexts[0] if len(contexts) == 1 else torch.cat(contexts)

    def _forward(self, going: Sequence[_Cohort]) -> None:
        """One decoding step: each row's chosen token through every layer; sets each cohort's next logits."""
        base, heads, head_dim = self.base, self.heads, self.head_dim
        spans: list[tuple[_Cohort, int, int]] = []
        start = 0
        chosen: list[torch.Tensor] = []
        for cohort in going:
            assert cohort.tokens is not None
            spans.append((cohort, start, start + len(cohort.owners)))
            chosen.append(cohort.tokens)
            start += len(cohort.owners)
        rows = start
        token = chosen[0] if len(chosen) == 1 else torch.cat(chosen)
        position = torch.cat(
            [torch.full((b - a, 1), cohort.length, dtype=torch.long, device=self.device) for cohort, a, b in spans]
        )
        hidden = base.embed_tokens(token)
        cos, sin = base.rotary_emb(hidden, position)
        cos, sin = cos.view(rows, 1, 1, head_dim), _signed_sin(sin.view(rows, 1, 1, head_dim))
        for index, plan in enumerate(self.plans):
            normed = plan.attention_norm(hidden)
            query_key = torch.cat(
                [plan.q(normed).view(rows, heads, 1, head_dim), plan.k(normed).view(rows, -1, 1, head_dim)], dim=1
            )
            query_key = query_key * cos + query_key.roll(head_dim // 2, dims=-1) * sin
            value = plan.v(normed).view(rows, -1, head_dim)
            context = self._attend_cohorts(spans, index, query_key, value)
            hidden = hidden + self._steered(plan.o(context), spans, (index, "attention"))
            hidden = hidden + plan.mlp(plan.mlp_norm(hidden))
            hidden = self._steered(hidden, spans, (index, "residual"))
        logits = self.head(self.final_norm(hidden))
        for cohort, a, b in spans:
            cohort.length += 1
            cohort.logits, cohort.tokens = logits[a:b], None


def _rows(spec: SteeringSpec, members: Sequence[int]) -> SteeringSpec:
    """`spec` for the batch rows `members` only (one strength for all rows stays as it is)."""
    strengths = spec.strengths()
    return spec if len(strengths) == 1 else replace(spec, strength=tuple(strengths[r] for r in members))


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
    sampling: Sequence[Sampling | None] | None = None,
    share_prefix: bool = False,
) -> torch.Tensor:
    """New token ids [rows, <= max_new_tokens] for a left-padded batch, steered by `specs`.

    Tokens are greedy unless `sampling` (one per row) samples some rows, each from its own stream.
    Padding is stripped and prompts share a pass only where that is exact (`RunningBatch.admit`), so
    every row gets exactly the tokens it gets alone. Rows that finish (emit end-of-text) are padded
    with `pad_token_id` like transformers does; `suppress_eos` forbids end-of-text (fixed length).

    `share_prefix` (unsteered batches whose prompts start alike, such as one long instruction) reads
    the common prefix once. Where split passes are not exact on this machine, its float sums differ
    from a whole prompt pass at the last bits, so a row's tokens are those it gets alone with the same
    prefix, not those of a prompt pass of its own.
    """
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = input_ids.shape[0]
    if streamer is not None:
        streamer.put(input_ids.cpu())
    lengths = [int(n) for n in mask.sum(dim=1).tolist()]
    width = input_ids.shape[1]
    prompts = [input_ids[row, width - n :] for row, n in enumerate(lengths)]  # left padding: prompts end the rows
    running = RunningBatch(lm, eos_token_ids=eos_token_ids, suppress_eos=suppress_eos)
    gated = [i for i, spec in enumerate(specs) if spec.gated and not spec.is_noop()]
    prefix = None
    if share_prefix and all(spec.is_noop() for spec in specs):
        prefix = running.shared_prefix(prompts)
    skip = 0 if prefix is None else prefix.length
    reading = running.admit(
        [prompt[skip:] for prompt in prompts],
        specs,
        owners=list(range(rows)),
        max_new_tokens=[max_new_tokens] * rows,
        sampling=sampling,
        gated=gated,
        prefix=prefix,
    )
    if gated and gate_readings is not None and reading is not None:
        gate_readings.append(reading)
    produced: list[list[int]] = [[] for _ in range(rows)]
    while len(running):
        new: list[list[int]] = [[] for _ in range(rows)]
        for row, token, _ in running.step():
            produced[row].append(token)
            new[row].append(token)
        if streamer is not None:  # one tensor per token position (a row's first step makes two)
            for place in range(max(len(tokens) for tokens in new)):
                step = torch.full((rows,), pad_token_id, dtype=torch.long)
                for row, tokens in enumerate(new):
                    if place < len(tokens):
                        step[row] = tokens[place]
                streamer.put(step)
    if streamer is not None:
        streamer.end()
    longest = max(len(tokens) for tokens in produced)
    out = torch.full((rows, longest), pad_token_id, dtype=torch.long, device=input_ids.device)
    for row, tokens in enumerate(produced):
        out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out
