"""Recording activations at every layer in one batched forward pass.

One forward pass per batch fills a `[n_prompts, n_layers, hidden]` tensor: hooks on every
layer reduce each sequence to one vector as it flows past (last prompt token, or the mean over
the prompt's tokens), so nothing bigger than that is ever kept. Three things make it fast:

- the decoder runs without the LM head, whose vocabulary projection recording never needs;
- the chat template's shared opening (system prompt, role markers) is run once, and its
  key/value cache is reused by every batch, so each prompt only pays for its own tokens;
- prompts are batched by length and right-padded, so little compute goes to padding.

None of this changes results: a prompt's activations are the same alone or in any batch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import ExitStack
from contextvars import ContextVar
from typing import Any, Literal

import torch

from .architectures import Site
from .compat import cache_kwargs, returned_cache
from .models import LoadedModel
from .progress import ProgressCallback, no_progress

_RECORDING: ContextVar[int | None] = ContextVar("safesteer_recording", default=None)
"""The recording or answer reading whose pass this context runs: hooks on a shared model ignore other callers'
passes (a preview while a probe trains, say)."""

Token = Literal["last", "mean"]
TOKENS: tuple[Token, ...] = ("last", "mean")


def primary_tensor(output: object) -> torch.Tensor:
    """The hidden-state tensor in a module's output (decoder layers return a tensor, attention a tuple)."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens all sequences start with, leaving each at least one token of its own."""
    if not sequences:
        return 0
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    length = 0
    while length < limit and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


class _Recorder:
    """Forward hooks that reduce each layer's output to one vector per prompt.

    Reductions stay on the model's device in `batch_result` and reach the CPU once per batch:
    a copy per layer would make the GPU wait for the host at every layer.
    """

    def __init__(self, token: Token) -> None:
        self.token = token
        self.batch_result = torch.zeros(0)  # [rows, n_layers, hidden] on the model's device
        self.last_index = torch.zeros(0, dtype=torch.long)
        self.mask = torch.zeros(0)
        self.prefix_sums: torch.Tensor | None = None  # [n_layers, hidden], when a prefix pass ran
        self.prefix_length = 0
        self.in_prefix = False

    def hook(self, layer: int):
        def capture(module: torch.nn.Module, args: object, output: object) -> None:
            if _RECORDING.get() != id(self):
                return  # another caller's forward pass on the same model (a preview, say)
            hidden = primary_tensor(output)
            if self.in_prefix:
                if self.prefix_sums is not None:
                    self.prefix_sums[layer] = hidden[0].float().sum(0).cpu()
                return
            if self.token == "last":
                rows = torch.arange(hidden.shape[0], device=hidden.device)
                reduced = hidden[rows, self.last_index.to(hidden.device)].float()
            else:
                hidden = hidden.float()
                mask = self.mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
                total = (hidden * mask).sum(1)
                count = mask.sum(1)
                if self.prefix_sums is not None:
                    total = total + self.prefix_sums[layer].to(hidden.device)
                    count = count + self.prefix_length
                reduced = total / count
            self.batch_result[:, layer] = reduced.to(self.batch_result.device)

        return capture


def default_batch_size(lm: LoadedModel) -> int:
    """Prompts per forward pass: 16 on a CPU; 64 on a GPU, where it was 2-4x faster than 16 (docs/gpu.md)."""
    return 16 if lm.device.type == "cpu" else 64


def record_activations(
    lm: LoadedModel,
    prompts: list[str],
    site: Site = "residual",
    token: Token = "last",
    batch_size: int = 0,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """Activations of every prompt at every layer: float32 `[n_prompts, n_layers, hidden]` on the CPU.

    The batch size changes speed, not results (beyond float rounding); 0 picks `default_batch_size`.
    """
    report = progress or no_progress
    batch_size = batch_size or default_batch_size(lm)
    n_layers, hidden = lm.architecture.n_layers, lm.identity.hidden_size
    result = torch.zeros(len(prompts), n_layers, hidden, dtype=torch.float32)
    if not prompts:
        return result
    tokenizer, device, decoder = lm.tokenizer, lm.device, lm.architecture.decoder
    ids = [tokenizer(lm.chat_text(p), add_special_tokens=False)["input_ids"] for p in prompts]
    prefix = shared_prefix_length(ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    recorder = _Recorder(token)

    with ExitStack() as stack, torch.inference_mode():
        for layer in range(n_layers):
            handle = lm.architecture.module(layer, site).register_forward_hook(recorder.hook(layer))
            stack.callback(handle.remove)
        stack.callback(_RECORDING.reset, _RECORDING.set(id(recorder)))
        prefix_cache = None
        if prefix:
            recorder.in_prefix, recorder.prefix_length = True, prefix
            recorder.prefix_sums = torch.zeros(n_layers, hidden) if token == "mean" else None
            prefix_ids = torch.tensor([ids[0][:prefix]], device=device)
            prefix_cache = returned_cache(decoder(input_ids=prefix_ids, use_cache=True))
            recorder.in_prefix = False
        order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            suffixes = [ids[i][prefix:] for i in rows]
            width = max(len(s) for s in suffixes)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, suffix in enumerate(suffixes):
                input_ids[r, : len(suffix)] = torch.tensor(suffix)
                mask[r, : len(suffix)] = 1
            recorder.batch_result = torch.zeros(len(rows), n_layers, hidden, dtype=torch.float32, device=device)
            recorder.mask = mask
            recorder.last_index = mask.sum(1) - 1
            cache = None
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(rows))
            full_mask = torch.cat([torch.ones(len(rows), prefix, dtype=torch.long), mask], dim=1)
            decoder(
                input_ids=input_ids.to(device),
                attention_mask=full_mask.to(device),
                position_ids=(prefix + torch.arange(width)).expand(len(rows), -1).to(device),
                use_cache=cache is not None,
                **cache_kwargs(decoder, cache),
            )
            result[rows] = recorder.batch_result.cpu()
            done = min(start + batch_size, len(order))
            report(done / len(order), f"recorded {done}/{len(order)} prompts")
    return result


class _Enough(Exception):
    """Raised inside the forward pass once the wanted layer's output is captured."""


def answer_activations(
    lm: LoadedModel,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    site: Site = "residual",
    batch_size: int = 16,
    layer: int | None = None,
) -> torch.Tensor:
    """Mean activation over each answer's tokens as the unsteered model reads prompt + answer: `[n, L, d]`, float32.

    What the response probe reads and what answer vectors are made of: the model's state while it is
    *saying* something, not while reading the request. With `layer`, the pass stops after that
    layer and the result is `[n, 1, d]`.
    """
    from .metrics import answer_batch  # metrics imports the embedder's stack; keep `activations` light

    rows: list[torch.Tensor] = []
    layers = range(lm.identity.n_layers) if layer is None else [layer]
    for start in range(0, len(prompts), batch_size):
        batch = answer_batch(lm, prompts[start : start + batch_size], answers[start : start + batch_size])
        captured: list[torch.Tensor] = []

        def hook(
            module: torch.nn.Module, args: object, output: object, batch: Any = batch, captured: list = captured
        ) -> None:
            if _RECORDING.get() != id(captured):
                return  # another caller's pass on the shared model (a preview while the probe trains)
            hidden = primary_tensor(output).float()
            captured.append(
                torch.stack([hidden[row, begin:end].mean(0) for row, (begin, end) in enumerate(batch.spans)])
            )
            if len(captured) == len(layers):
                raise _Enough

        handles = [lm.architecture.module(i, site).register_forward_hook(hook) for i in layers]
        mine = _RECORDING.set(id(captured))
        try:
            with torch.inference_mode():
                lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        except _Enough:
            pass
        finally:
            _RECORDING.reset(mine)
            for handle in handles:
                handle.remove()
        rows.append(torch.stack(captured, dim=1).cpu())  # [b, L, d]
    return torch.cat(rows) if rows else torch.empty(0, len(layers), lm.identity.hidden_size)
