"""Prompt passes that read only what they must: the chat template's start once, several lengths at once.

Every chat prompt begins with the same tokens: the embedded model's template opens with a system
prompt of 23 tokens, more than half of a typical short request. `TemplateStart` keeps that start's
keys and values, so a prompt pass reads only the rest: a short request costs about half the compute.
And requests that arrive together share one pass (`prompt_pass`), right-padded to the longest, which
pays the pass's fixed cost (30 layers of Python and small products) once instead of once per length;
its MLPs skip the padding (`packed_mlps`).

Neither may change a single number: answers are compared token for token between the server, the
preview and `generate`. `cpu_attention.block_attention` sums every query in an order fixed by key
position, and an int4 model's prompt products (`int4.PromptWeight`, checked row by row) and head
compute each row on its own, so a split or padded pass equals a whole one of each prompt alone.
That is checked once per model on this machine (`TemplateStart.exact`) with requests of many
lengths; where any number differs (float32 GEMMs pick other kernels for a few rows), both stand
aside and every prompt gets a whole pass of its own length.

The start's keys and values depend on the steering applied to its positions, so entries are kept
per steering: unsteered, and one per (category vector, strength) a prompt pass applies.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .architectures import Site
from .compat import cache_kwargs, key_value_cache
from .errors import SafeSteerError
from .int4 import computed_alone_here, drop_prompt_weights
from .models import LoadedModel
from .steering import KnownStart, SteeringSpec, gate_states, steer

log = logging.getLogger(__name__)

SHORTEST = 8
"""A start shorter than this is not worth a cache entry."""
ENTRIES = 16
"""Steerings kept at once (unsteered, and each category and strength in use); the least recent goes."""
PACK_MIN_ROWS = 24
"""Padding rows a pass must hold before its MLPs skip them: below about 20, packing costs what it saves
(`make bench-prompts`: 21 of 120 rows, 127 against 129 ms; 51 of 208, 194 against 175 ms)."""
_CHECK_TEXTS = ("Hi", "ok then", "What is 2 + 2?", "one two three four", "Name three colours of the rainbow.")
"""Requests whose rests (after the start) run from 8 to 15 tokens: few rows are where GEMMs switch kernels."""


@dataclass(frozen=True)
class CachedStart:
    """The template start's keys and values at every layer, [1, kv_heads, length, head_dim] each."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]


def _fingerprint(spec: SteeringSpec, strength: float) -> tuple[Any, ...]:
    """What makes a spec's shift at prompt positions: its vector, layers, site, operation and strength."""
    digest = hashlib.blake2b(spec.vector.detach().cpu().float().numpy().tobytes(), digest_size=16).hexdigest()
    return (digest, spec.layers(), spec.site, spec.how, spec.where, spec.safe_projection, strength)


def prompt_pass(lm: LoadedModel, ids: torch.Tensor, lengths: Sequence[int], start: int, cache: Any) -> torch.Tensor:
    """The model's own pass over `ids` [rows, n] (right-padded) at positions start..start+n-1, after `start`
    cached positions; returns each row's logits at its last real token, [rows, vocab].

    `lengths` are the rows' whole lengths, cached start included. Run through the decoder, then the
    head on each row's last state: the same products as the model's forward with `logits_to_keep=1`.
    """
    model = lm.model
    rows, fed = ids.shape
    width = start + fed
    mask = (torch.arange(width, device=ids.device)[None, :] < torch.tensor(lengths, device=ids.device)[:, None]).to(
        ids.dtype
    )
    decoder = lm.architecture.decoder
    with packed_mlps(lm, mask[:, start:].bool()):
        hidden = decoder(
            input_ids=ids,
            attention_mask=mask,
            position_ids=torch.arange(start, width, device=ids.device).expand(rows, fed),
            use_cache=True,
            **cache_kwargs(decoder, cache),
        ).last_hidden_state
    last = torch.tensor(lengths, device=hidden.device) - 1 - start
    return model.get_output_embeddings()(hidden[torch.arange(rows, device=hidden.device), last].unsqueeze(1))[:, -1]


def _mlps(lm: LoadedModel) -> list[nn.Module]:
    """Each layer's MLP, where it is one this project knows computes every position on its own."""
    spec = lm.architecture.spec
    mlps = [getattr(layer, "mlp", None) for layer in lm.architecture.layers]
    if spec.lean_mlp is None or any(type(mlp).__name__ != spec.lean_mlp for mlp in mlps):
        return []  # an MLP that may mix positions (experts with a capacity, say): nothing is packed
    return [mlp for mlp in mlps if isinstance(mlp, nn.Module)]


@contextmanager
def packed_mlps(lm: LoadedModel, real: torch.Tensor) -> Iterator[None]:
    """Within the block, this thread's MLPs read only the real positions (`real`, [rows, n]) of a pass.

    A padded pass of prompts of several lengths computes its padding too: for short requests up to
    a quarter of its rows. Each MLP (three quarters of a layer's products) gets the real rows
    packed together and gives back the padded layout, zeros where padding was: eight such requests
    take 10% less time. Rows are computed alone (`TemplateStart.exact`), so no number changes;
    attention, which needs the padded layout, keeps it. Other threads pass through.
    """
    packed_rows = int(real.sum())
    if real.numel() - packed_rows < PACK_MIN_ROWS:
        yield
        return
    modules = _mlps(lm)
    owner = threading.get_ident()

    def pack(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if threading.get_ident() != owner or args[0].shape[:2] != real.shape:
            return None
        return (args[0][real].unsqueeze(0), *args[1:])

    def unpack(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if threading.get_ident() != owner or output.shape[:2] != (1, packed_rows):
            return None
        full = output.new_zeros(*real.shape, *output.shape[2:])
        full[real] = output[0]
        return full

    with ExitStack() as stack:
        for module in modules:
            stack.callback(module.register_forward_pre_hook(pack).remove)
            stack.callback(module.register_forward_hook(unpack, prepend=True).remove)
        yield


def right_padded(rows: Sequence[torch.Tensor], pad: int = 0) -> torch.Tensor:
    """Token rows of several lengths as one [rows, longest] tensor, padded at the end."""
    width = max(int(row.shape[0]) for row in rows)
    out = rows[0].new_full((len(rows), width), pad)
    for index, row in enumerate(rows):
        out[index, : row.shape[0]] = row
    return out


def new_cache(lm: LoadedModel) -> Any:
    """An empty key/value cache for one prompt pass of `lm`."""
    return key_value_cache(lm.model.config)


def _layers(cache: Any) -> list[Any]:
    return list(cache.layers)


def _same_keys(one: Any, other: Any, lengths: Sequence[int], row: int = 0) -> bool:
    """Whether `other`'s row `row` holds exactly `one`'s only row's keys and values, over its real length."""
    n = lengths[row]
    return all(
        torch.equal(a.keys[0, :, :n], b.keys[row, :, :n]) and torch.equal(a.values[0, :, :n], b.values[row, :, :n])
        for a, b in zip(_layers(one), _layers(other), strict=True)
    )


class TemplateStart:
    """One model's template start: its token ids, whether a split pass is exact here, and the cached keys."""

    def __init__(self, lm: LoadedModel) -> None:
        # Weakly: `_STARTS` keys on the model, and a strong reference here would keep it alive for ever.
        self._lm = weakref.ref(lm)
        self.ids = _template_start_ids(lm)
        self._exact: bool | None = None
        self._entries: OrderedDict[tuple[Any, ...], CachedStart] = OrderedDict()
        self._gate_starts: dict[frozenset[tuple[int, Site]], KnownStart] = {}
        self._lock = threading.Lock()

    @property
    def lm(self) -> LoadedModel:
        lm = self._lm()
        if lm is None:
            raise SafeSteerError("the model of this template start was unloaded")
        return lm

    @property
    def length(self) -> int:
        return 0 if self.ids is None else int(self.ids.shape[0])

    def usable_for(self, input_ids: torch.Tensor) -> bool:
        """Whether every row of unpadded `input_ids` [rows, n] begins with the start and has 2 tokens past it."""
        if self.ids is None or self.length < SHORTEST or input_ids.shape[1] < self.length + 2:
            return False
        ids = self.ids.to(input_ids.device)
        return bool((input_ids[:, : self.length] == ids).all()) and self.exact()

    def exact(self) -> bool:
        """Whether split and padded passes give exactly the numbers of a whole pass of each prompt (checked once)."""
        with self._lock:
            if self._exact is None:
                self._exact = self._checked()
                if not self._exact and drop_prompt_weights(self.lm.model):
                    # this thread's GEMM does not compute rows alone: prompts go back to the 4-bit kernel,
                    # which does, so that no prompt's numbers depend on its neighbours
                    log.warning(
                        "prompt passes differ with their neighbours here; reading prompts with the 4-bit kernel"
                    )
                    self._exact = self._checked()
            return self._exact

    def _checked(self) -> bool:
        try:
            return self._check()
        except Exception:  # a model this check cannot run on: every pass reads the whole prompt
            log.warning("could not check split prompt passes; reading whole prompts", exc_info=True)
            return False

    @torch.inference_mode()
    def _check(self) -> bool:
        """Each check request whole, split after the start, and all of them in one padded pass: same numbers."""
        if not computed_alone_here(self.lm.model):  # this thread's GEMMs, at every row count a step may have
            return False
        prompts = [self.lm.encode([text])["input_ids"][0] for text in (*_CHECK_TEXTS, " ".join(["word"] * 40))]
        wholes = []
        for ids in prompts:
            whole_cache = new_cache(self.lm)
            whole = prompt_pass(self.lm, ids[None], [ids.shape[0]], 0, whole_cache)
            wholes.append((whole, whole_cache))
            if self.ids is None:
                continue
            if ids.shape[0] < self.length + 2 or not bool((ids[: self.length] == self.ids.to(ids.device)).all()):
                return False  # the start does not tokenize apart from what follows it
            split_cache = new_cache(self.lm)
            prompt_pass(self.lm, ids[None, : self.length], [self.length], 0, split_cache)
            split = prompt_pass(self.lm, ids[None, self.length :], [ids.shape[0]], self.length, split_cache)
            if not (torch.equal(whole, split) and _same_keys(whole_cache, split_cache, [ids.shape[0]])):
                return False
        lengths = [int(ids.shape[0]) for ids in prompts]
        padded_cache = new_cache(self.lm)
        padded = prompt_pass(self.lm, right_padded(prompts), lengths, 0, padded_cache)
        for row, (whole, whole_cache) in enumerate(wholes):
            if not (torch.equal(padded[row : row + 1], whole) and _same_keys(whole_cache, padded_cache, lengths, row)):
                return False
        return True

    def keys_values(self, steering: Sequence[tuple[SteeringSpec, float]]) -> CachedStart:
        """The start's keys and values under `steering` (each spec with the strength a row gets; may be empty)."""
        key = tuple(sorted(_fingerprint(spec, s) for spec, s in steering if s != 0.0 and spec.where != "generated"))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        # `generated` shifts touch only a prompt's last position, never the start
        specs = [replace(spec, gate=None, strength=s) for spec, s in steering if s != 0.0 and spec.where != "generated"]
        cache = new_cache(self.lm)
        assert self.ids is not None
        ids = self.ids.to(self.lm.device).unsqueeze(0)
        with torch.inference_mode(), steer(self.lm, specs):
            prompt_pass(self.lm, ids, [self.length], 0, cache)
        entry = CachedStart(
            tuple(layer.keys.clone() for layer in _layers(cache)),
            tuple(layer.values.clone() for layer in _layers(cache)),
        )
        with self._lock:
            self._entries[key] = entry
            while len(self._entries) > ENTRIES:
                self._entries.popitem(last=False)
        return entry

    def for_gates(self, wanted: set[tuple[int, Site]]) -> KnownStart:
        """The start as gates read it: unsteered keys and values, and its states at each wanted (layer, site).

        A gate pass then reads only the rest of each prompt (`steering.read_gate_features`); for the
        embedded model's policy gate (layer 13, averaged over the prompt) that pass was about 40%
        of a gated request's prompt work, more than half of it spent on the start.
        """
        key = frozenset(wanted)
        with self._lock:
            found = self._gate_starts.get(key)
        if found is not None:
            return found
        entry = self.keys_values([])
        assert self.ids is not None
        ids = self.ids.to(self.lm.device).unsqueeze(0)
        states = gate_states(self.lm, ids, torch.ones_like(ids), set(wanted))
        found = KnownStart(self.length, entry.keys, entry.values, {k: v.clone() for k, v in states.items()})
        with self._lock:
            self._gate_starts[key] = found
        return found


def _template_start_ids(lm: LoadedModel) -> torch.Tensor | None:
    """The tokens every one-message chat prompt starts with (less one, lest it merge with the message)."""
    if not getattr(lm.tokenizer, "chat_template", None):
        return None
    samples = ["a", "Hello there", "1. list", " spaced", "\nnew line", "Ünïcode?"]
    rows = [lm.tokenizer(lm.chat_text(text), add_special_tokens=False)["input_ids"] for text in samples]
    length = min(len(row) for row in rows)
    for row in rows[1:]:
        length = next((i for i in range(length) if row[i] != rows[0][i]), length)
    length -= 1
    if length < SHORTEST:
        return None
    return torch.tensor(rows[0][:length], dtype=torch.long)


_STARTS: weakref.WeakKeyDictionary[Any, TemplateStart] = weakref.WeakKeyDictionary()
_STARTS_LOCK = threading.Lock()


def template_start(lm: LoadedModel) -> TemplateStart:
    """The model's shared `TemplateStart` (one per loaded model, for every thread that runs it)."""
    with _STARTS_LOCK:
        found = _STARTS.get(lm.model)
        if found is None or found._lm() is not lm:
            found = _STARTS[lm.model] = TemplateStart(lm)
        return found
