"""Applying steering vectors at inference time, without leaks between requests.

`steer(lm, specs)` applies each spec's vector to its layers' output (residual stream or attention
block) while the block is active, by the spec's operation (`operations`: add, norm-preserving
or clamped; at every position, the prompt's or the answer's). Two properties matter for a shared model:

- Hooks never outlive the block: they are removed in `finally`, exceptions included.
- Hooks only act for the code that installed them: each block registers a token in a
  `ContextVar`, and a hook whose token is not active in the calling thread does nothing.
  So one user's steered generation and another's plain one can run at the same time on the
  same model object and each gets exactly what it would get alone.

A strength can be one number or one number per batch row, so naive and steered outputs (or a
range of strengths) come out of a single `generate` call.

A spec may carry a `Gate` (`gates`): then, before each prompt pass, the block reads every gate
from an unsteered pass over the prompt, stopped at the deepest gate layer, and the spec steers
only the rows whose gate fired; the other rows get strength 0, which leaves them exactly
unsteered. Reading first means the gate's layer may lie before or after the steering layer, and
a fired row is steered exactly as the `always` mode would steer it, prompt included.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

import torch

from .architectures import Site
from .compat import cache_kwargs, key_value_cache, passed_cache
from .errors import SafeSteerError
from .gates import Gate, GateReading
from .limits import check_layer, check_site, check_strength
from .models import LoadedModel
from .operations import How, Shift, SteeringOptions, Where, apply_steering, check_clamp, prepare_shift

_ACTIVE_BLOCKS: ContextVar[frozenset[int]] = ContextVar("safesteer_active_blocks", default=frozenset())
_READING_GATES: ContextVar[int | None] = ContextVar("safesteer_reading_gates", default=None)
"""Set while this context runs a gate pass: steering hooks stand aside, the pass's own hooks record."""


@dataclass(frozen=True)
class SteeringSpec:
    """One category's vector applied at a layer and site, with a strength per batch row or for all rows.

    `vector` is [hidden] for one layer, or [k, hidden] for k adjacent layers from `layer` on that
    share the strength evenly (`operations.SteeringOptions.spread`). `where` and `how` say which
    positions are steered and by which operation (`operations`); `safe_projection` (one per layer)
    is where the safe side begins along each vector, which `clamp` needs.
    """

    vector: torch.Tensor  # [hidden] or [layers, hidden]
    layer: int
    strength: float | Sequence[float] = 1.0
    site: Site = "residual"
    gate: Gate | None = None  # with a gate in mode "gated", only rows whose gate fires are steered
    where: Where = "all"
    how: How = "add"
    safe_projection: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_layer(self.layer)
        check_site(self.site)
        SteeringOptions(where=self.where, how=self.how)  # validates both names
        given = (self.strength,) if isinstance(self.strength, (int, float)) else tuple(self.strength)
        for strength in given:  # any sign: research may push either way; never NaN, inf or huge
            check_strength(strength, allow_negative=True)
        if self.vector.dim() not in (1, 2) or self.vector.shape[0] == 0:
            raise SafeSteerError("a steering vector must be [hidden] or [layers, hidden]")
        if self.how == "clamp":
            check_clamp(self.safe_projection, len(self.layers()), given)

    def strengths(self) -> tuple[float, ...]:
        if isinstance(self.strength, (int, float)):
            return (float(self.strength),)
        return tuple(float(s) for s in self.strength)

    def is_noop(self) -> bool:
        return all(s == 0.0 for s in self.strengths())

    @property
    def gated(self) -> bool:
        return self.gate is not None and self.gate.mode == "gated"

    @property
    def hidden_size(self) -> int:
        return int(self.vector.shape[-1])

    def layers(self) -> tuple[int, ...]:
        """The layers this spec steers: one, or `k` adjacent ones from `layer` on."""
        k = 1 if self.vector.dim() == 1 else int(self.vector.shape[0])
        return tuple(range(self.layer, self.layer + k))

    def prepare(
        self, part: int, strengths: tuple[float, ...], dtype: torch.dtype, device: torch.device, ndim: int
    ) -> Shift:
        """The operation at the spec's `part`-th layer, its share of the strengths prepared for those states."""
        layers = self.layers()
        vector = self.vector if self.vector.dim() == 1 else self.vector[part]
        share = strengths if len(layers) == 1 else tuple(s / len(layers) for s in strengths)
        projection = None if self.safe_projection is None else self.safe_projection[part]
        return prepare_shift(vector, share, dtype, device, ndim, self.how, self.where, projection)


@dataclass(frozen=True)
class KnownStart:
    """The first `length` positions of every row, read before without steering (the chat template's start).

    `keys` and `values` are every layer's [1, kv_heads, length, head_dim]; `states` the hidden states
    [1, length, hidden] where gates read, by (layer, site). A gate pass then reads only what follows,
    and puts the start's states back in front: the same tensor a whole pass gives, where split
    passes are exact (`prompt_passes.TemplateStart.exact`), so the same features bit for bit.
    """

    length: int
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    states: dict[tuple[int, Site], torch.Tensor]


class _StopPass(Exception):
    """Ends a gate pass once the deepest gate layer has been read: later layers are not needed."""


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token, for left or right padding."""
    width = mask.shape[1]
    return width - 1 - mask.long().flip(1).argmax(1)


def read_gate_features(
    lm: LoadedModel,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    gates: Sequence[Gate],
    inputs_embeds: torch.Tensor | None = None,
    start: KnownStart | None = None,
) -> list[torch.Tensor]:
    """Each gate's features `[rows, hidden]` from one unsteered pass over the prompt, stopped early.

    The pass runs the decoder without its LM head up to the deepest gate layer only, with
    steering hooks of this context standing aside, so gates see what they were trained on. With
    `start` (every row begins with it), the pass reads only what follows it.
    """
    source = input_ids if input_ids is not None else inputs_embeds
    if source is None:
        raise SafeSteerError("a gate needs the prompt's input ids or embeddings")
    rows, width = source.shape[0], source.shape[1]
    device = source.device
    mask = attention_mask if attention_mask is not None else torch.ones(rows, width, dtype=torch.long, device=device)
    mask = mask.to(device)
    if input_ids is not None and rows > 1:  # the same prompt twice (naive and steered rows) is read once
        unique, inverse = torch.unique(
            torch.cat([input_ids, mask.to(input_ids.dtype)], dim=1), dim=0, return_inverse=True
        )
        if unique.shape[0] < rows:
            once = read_gate_features(lm, unique[:, :width], unique[:, width:], gates, start=start)
            return [features[inverse] for features in once]
    wanted = {(g.layer, g.site) for g in gates}
    captured = gate_states(lm, input_ids, mask, wanted, inputs_embeds if input_ids is None else None, start)
    last = _last_index(mask)
    features = []
    for gate in gates:
        hidden = captured[(gate.layer, gate.site)].float()
        if gate.token == "last":
            features.append(hidden[torch.arange(rows, device=hidden.device), last.to(hidden.device)])
        else:
            weights = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
            features.append((hidden * weights).sum(1) / weights.sum(1).clamp(min=1))
    return features


def gate_states(
    lm: LoadedModel,
    input_ids: torch.Tensor | None,
    mask: torch.Tensor,
    wanted: set[tuple[int, Site]],
    inputs_embeds: torch.Tensor | None = None,
    start: KnownStart | None = None,
) -> dict[tuple[int, Site], torch.Tensor]:
    """The hidden states [rows, n, hidden] at each wanted (layer, site), from one unsteered pass stopped
    at the deepest; with `start`, the pass reads the positions after it and the start's states lead."""
    captured: dict[tuple[int, Site], torch.Tensor] = {}
    rows = mask.shape[0]
    skip = 0
    pass_kwargs: dict[str, Any] = {"use_cache": False}
    if start is not None and input_ids is not None:
        skip = start.length
        cache = key_value_cache(lm.model.config, start.keys, start.values, rows)
        pass_kwargs = {"use_cache": True, **cache_kwargs(lm.architecture.decoder, cache)}
    token = object()

    def capture(key: tuple[int, Site]):
        def hook(module: torch.nn.Module, args: object, output: object) -> None:
            if _READING_GATES.get() != id(token):
                return  # another caller's pass
            hidden = cast(torch.Tensor, output[0] if isinstance(output, tuple) else output)
            captured[key] = hidden
            if len(captured) == len(wanted):
                raise _StopPass

        return hook

    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with ExitStack() as stack, torch.inference_mode():
        for key in wanted:
            handle = lm.architecture.module(key[0], cast(Site, key[1])).register_forward_hook(capture(key))
            stack.callback(handle.remove)
        reset = _READING_GATES.set(id(token))
        try:
            lm.architecture.decoder(
                input_ids=None if input_ids is None else input_ids[:, skip:],
                inputs_embeds=inputs_embeds if input_ids is None else None,
                attention_mask=mask,
                position_ids=positions[:, skip:],
                **pass_kwargs,
            )
        except _StopPass:
            pass
        finally:
            _READING_GATES.reset(reset)
    if start is not None and skip:
        return {
            key: torch.cat([start.states[key].expand(rows, -1, -1), found], dim=1) for key, found in captured.items()
        }
    return captured


def decide_rows(
    gates: Sequence[Gate], features: Sequence[torch.Tensor], active: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each gate's scores `[rows, k]` and whether it steers each row, routing included.

    A gate fires where its score reaches its threshold. Policy gates (`Gate.routed`) that fire on
    the same row compete: only the one whose router claims the prompt most strongly steers it (by
    the closest centroid where a competing gate predates routers), so a request is steered by one
    category of a policy, not all. `active` (`[rows, k]`, default all) says which gates may steer
    which rows at all (in a shared batch, a request's own policy only).
    """
    scores = torch.stack([gate.score(f).cpu() for gate, f in zip(gates, features, strict=True)], dim=1)
    fired = torch.stack([gate.fires(scores[:, k]) for k, gate in enumerate(gates)], dim=1)
    routed = [k for k, gate in enumerate(gates) if gate.routed]
    if len(routed) < 2:
        return scores, fired
    allowed = fired[:, routed] if active is None else fired[:, routed] & active[:, routed]
    preference = torch.stack([gates[k].closeness(features[k]).cpu() for k in routed], dim=1)
    has_router = torch.tensor([gates[k].route is not None for k in routed])
    if has_router.any():
        logits = torch.stack(
            [
                gates[k].route_logit(features[k]).cpu() if gates[k].route is not None else preference[:, j]
                for j, k in enumerate(routed)
            ],
            dim=1,
        )
        by_router = ~(allowed & ~has_router).any(dim=1)  # rows whose every competitor has a router
        preference = torch.where(by_router[:, None], logits, preference)
    chosen = preference.masked_fill(~allowed, float("-inf")).argmax(dim=1)
    keep = torch.zeros_like(allowed)
    keep[torch.arange(keep.shape[0]), chosen] = allowed.any(dim=1)
    fired = fired.clone()
    fired[:, routed] = keep
    return scores, fired


def read_gates(lm: LoadedModel, prompts: Sequence[str], gates: Sequence[Gate], batch_size: int = 16) -> GateReading:
    """What the gates say about each chat prompt, routing included, without generating (evaluations, batch previews)."""
    scores: list[list[float]] = []
    fired: list[list[bool]] = []
    for start in range(0, len(prompts), batch_size):
        batch = lm.encode(list(prompts[start : start + batch_size]))
        features = read_gate_features(lm, batch["input_ids"], batch["attention_mask"], gates)
        rows, decisions = decide_rows(gates, features)
        scores += rows.tolist()
        fired += decisions.tolist()
    return GateReading(scores=scores, fired=fired)


class SteeringState:
    """One `steer` block: which rows each gated spec steers, as decided at the latest prompt pass."""

    def __init__(
        self,
        specs: Sequence[SteeringSpec],
        readings: list[GateReading] | None = None,
        gated: Sequence[int] | None = None,
    ) -> None:
        self.specs = tuple(specs)
        # Which specs' gates are read: by default those that steer some row. A caller that splits one
        # batch into parts passes the whole batch's list, so every part's reading has the same columns.
        self.gated = (
            list(gated)
            if gated is not None
            else [i for i, spec in enumerate(self.specs) if spec.gated and not spec.is_noop()]
        )
        self.fired: list[list[bool]] | None = None  # [rows][k] for the k-th gated spec
        self.readings: list[GateReading] = readings if readings is not None else []  # appended as passes run
        self.generation = 0  # bumped at every decision, so cached shifts are rebuilt

    def decide(
        self,
        lm: LoadedModel,
        input_ids: Any,
        attention_mask: Any,
        inputs_embeds: Any = None,
        start: KnownStart | None = None,
    ) -> None:
        gates = [cast(Gate, self.specs[i].gate) for i in self.gated]
        features = read_gate_features(lm, input_ids, attention_mask, gates, inputs_embeds, start)
        rows = features[0].shape[0]
        active = torch.tensor(
            [[s != 0.0 for s in self._given(i, rows)] for i in self.gated], dtype=torch.bool
        ).T  # [rows, k]: which specs steer which rows at all
        scores, fired = decide_rows(gates, features, active)
        self.fired = fired.tolist()
        self.readings.append(GateReading(scores=scores.tolist(), fired=self.fired))
        self.generation += 1

    def _given(self, index: int, rows: int) -> tuple[float, ...]:
        """Spec `index`'s strength for each of `rows` rows, before its gate decides."""
        given = self.specs[index].strengths()
        return given * rows if len(given) == 1 else given

    def strengths(self, index: int, rows: int) -> tuple[float, ...]:
        """Spec `index`'s strength per row (or one for all), zero for rows its gate did not fire on."""
        if index not in self.gated:
            return self.specs[index].strengths()
        if self.fired is None or len(self.fired) != rows:
            raise SafeSteerError("a gated steering vector was applied before its gate was read for this batch")
        k = self.gated.index(index)
        return tuple(s if fired[k] else 0.0 for s, fired in zip(self._given(index, rows), self.fired, strict=True))


def _shift_hook(block: int, index: int, part: int, state: SteeringState):
    cache: dict[tuple[torch.dtype, torch.device, int, int], Shift | None] = {}
    spec = state.specs[index]

    def hook(module: torch.nn.Module, args: object, output: object) -> object:
        if block not in _ACTIVE_BLOCKS.get() or _READING_GATES.get() is not None:
            return None  # another caller's forward pass, or a gate pass: leave it untouched
        hidden = cast(torch.Tensor, output[0] if isinstance(output, tuple) else output)
        if len(spec.strengths()) not in (1, hidden.shape[0]):
            raise SafeSteerError(f"{len(spec.strengths())} strengths given for a batch of {hidden.shape[0]} rows")
        key = (hidden.dtype, hidden.device, hidden.dim(), state.generation)
        if key not in cache:
            cache.clear()
            strengths = state.strengths(index, hidden.shape[0])
            none = all(s == 0.0 for s in strengths)
            cache[key] = None if none else spec.prepare(part, strengths, hidden.dtype, hidden.device, hidden.dim())
        shift = cache[key]
        if shift is None:
            return None  # no row of this batch is steered by this spec
        prompt_pass = hidden.dim() == 3 and hidden.shape[1] > 1
        shifted = apply_steering(hidden, (shift,), prompt_pass=prompt_pass)
        return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

    return hook


def _gate_hook(block: int, lm: LoadedModel, state: SteeringState):
    """Before each prompt pass of the model (not decode steps), read the gates for its rows."""

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if block not in _ACTIVE_BLOCKS.get() or _READING_GATES.get() is not None:
            return None
        past = passed_cache(kwargs)
        if past is not None and past.get_seq_length() > 0:
            return None  # a decode step: the decision made at the prompt pass holds
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        state.decide(lm, input_ids, kwargs.get("attention_mask"), kwargs.get("inputs_embeds"))
        return None

    return hook


@contextmanager
def steer(
    lm: LoadedModel,
    specs: Sequence[SteeringSpec],
    gate_readings: list[GateReading] | None = None,
    *,
    gated: Sequence[int] | None = None,
    decided: SteeringState | None = None,
) -> Iterator[SteeringState]:
    """Apply the specs to `lm` inside the block, for the calling thread only; always clean up.

    The block yields its `SteeringState`; the gates' reading of every prompt pass inside it is
    appended to `gate_readings` (when given) as soon as it is made, so a stream can show it early.
    `gated` names the specs whose gates are read (default: the gated specs that steer some row).
    `decided`: a state whose gates were already read for the coming pass (`SteeringState.decide`);
    the block applies its decisions and reads no gate again.
    """
    hidden = lm.identity.hidden_size
    for spec in specs:
        if spec.hidden_size != hidden:
            raise SafeSteerError(
                f"a steering vector of shape {tuple(spec.vector.shape)} does not fit this model (hidden size {hidden})"
            )
        for layer in spec.layers():
            lm.architecture.module(layer, spec.site)  # validates layers and site before anything is installed
        if spec.gate is not None:
            if spec.gate.hidden_size != hidden:
                raise SafeSteerError(
                    f"a gate of hidden size {spec.gate.hidden_size} does not fit this model ({hidden})"
                )
            lm.architecture.module(spec.gate.layer, spec.gate.site)
    state = decided if decided is not None else SteeringState(specs, gate_readings, gated)
    if decided is not None and (
        len(decided.specs) != len(specs)
        or any(a is not b for a, b in zip(decided.specs, specs, strict=False))
        or (decided.gated and decided.fired is None)
    ):
        raise SafeSteerError("a steering state was given for other specs, or before its gates were read")
    token = object()
    block = id(token)
    with ExitStack() as stack:
        if state.gated and decided is None:
            handle = lm.model.register_forward_pre_hook(_gate_hook(block, lm, state), with_kwargs=True)
            stack.callback(handle.remove)
        for index, spec in enumerate(specs):
            if spec.is_noop():
                continue  # strength 0 everywhere: no hook, so output is exactly the unsteered one
            for part, layer in enumerate(spec.layers()):
                module = lm.architecture.module(layer, spec.site)
                handle = module.register_forward_hook(_shift_hook(block, index, part, state))
                stack.callback(handle.remove)
        reset = _ACTIVE_BLOCKS.set(_ACTIVE_BLOCKS.get() | {block})
        try:
            yield state
        finally:
            _ACTIVE_BLOCKS.reset(reset)
