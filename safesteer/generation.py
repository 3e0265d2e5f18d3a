"""Generating text, plain or steered, with several variants in one batched call.

The preview shows the same prompt answered naive and steered. Generating both rows in one
`generate` call (each row with its own strength) costs little more than one generation, because
a small model's decode step is dominated by per-step overhead, not batch size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch

from . import decoding
from .errors import SafeSteerError
from .gates import GateReading
from .limits import max_prompt_tokens
from .models import LoadedModel, Prompt
from .sampling import Sampling, TokenChooser
from .steering import SteeringSpec, steer

MAX_NEW_TOKENS_LIMIT = 2048
Decoder = Literal["auto", "transformers", "static", "lean"]
DECODERS: tuple[Decoder, ...] = ("auto", "transformers", "static", "lean")


def _eos_ids(lm: LoadedModel) -> list[int]:
    """End-of-text ids as transformers' generate would stop on them."""
    configured = getattr(lm.model.generation_config, "eos_token_id", None)
    if configured is None:
        configured = lm.tokenizer.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return [int(i) for i in ids if i is not None]


def check_prompt_lengths(lengths: Sequence[int]) -> None:
    """Refuse prompts over the token limit, naming which one (a long prompt's cache would take memory for nothing)."""
    limit = max_prompt_tokens()
    for row, length in enumerate(lengths, start=1):
        if length > limit:
            which = f"prompt {row} has" if len(lengths) > 1 else "the prompt has"
            raise SafeSteerError(
                f"{which} {length} tokens (chat template included); the limit is {limit} (SAFESTEER_MAX_PROMPT_TOKENS)"
            )


def generate_ids(
    lm: LoadedModel,
    prompts: Sequence[Prompt],
    specs: Sequence[SteeringSpec] = (),
    *,
    max_new_tokens: int = 64,
    fixed_length: bool = False,
    streamer: Any = None,
    decoder: Decoder = "auto",
    gate_readings: list[GateReading] | None = None,
    sampling: Sequence[Sampling | None] | None = None,
    prefill: Sequence[str] | None = None,
    share_prefix: bool = False,
) -> torch.Tensor:
    """New token ids [rows, <= max_new_tokens] of chat completions, steered by `specs`; greedy by default.

    `decoder` picks how: "auto" uses the lean loop in `decoding` where the model and device
    qualify (same tokens, less time) and transformers' generate elsewhere; "transformers" is
    always generate with its dynamic cache; "static" is generate with a preallocated cache;
    "lean" forces the lean loop on any device (benchmarks compare them).
    Specs with gates steer only the rows their gate fires on; `gate_readings` receives what the
    gates said about each row. `sampling` (one per row, None for greedy) samples those rows instead,
    each from its own seeded stream. `prefill` (one per row) starts each answer with given text.
    `share_prefix`: the lean loop reads the prompts' common start once (unsteered batches; see
    `decoding.greedy_decode`); transformers' generate reads every prompt whole.
    """
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise SafeSteerError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}")
    if decoder not in DECODERS:
        raise SafeSteerError(f"unknown decoder '{decoder}': use one of {', '.join(DECODERS)}")
    for spec in specs:
        n = len(spec.strengths())
        if n not in (1, len(prompts)):
            raise SafeSteerError(f"{n} strengths given for {len(prompts)} prompts")
    batch = lm.encode(list(prompts), prefill)
    check_prompt_lengths(batch["attention_mask"].sum(dim=1).tolist())
    if sampling is not None and len(sampling) != len(prompts):
        raise SafeSteerError(f"{len(sampling)} sampling settings given for {len(prompts)} prompts")
    chooser = TokenChooser(sampling) if sampling is not None else None
    chooser = None if chooser is None or chooser.greedy else chooser
    tokenizer = lm.tokenizer
    if decoder == "lean" and not decoding.fits(lm):
        raise SafeSteerError(f"the lean decode loop does not cover {lm.identity.describe()}")
    if decoder == "lean" or (decoder == "auto" and decoding.supports(lm)):
        return decoding.greedy_decode(
            lm,
            batch,
            specs,
            max_new_tokens=max_new_tokens,
            eos_token_ids=_eos_ids(lm),
            pad_token_id=tokenizer.pad_token_id,
            suppress_eos=fixed_length,
            streamer=streamer,
            gate_readings=gate_readings,
            sampling=None if chooser is None else sampling,
            share_prefix=share_prefix,
        )
    options: dict[str, Any] = {"cache_implementation": "static"} if decoder == "static" else {}
    if chooser is not None:  # it rules out all but its own choice; greedy decoding then takes that token
        from transformers import LogitsProcessorList  # heavy: deferred so `import safesteer` stays quick

        options["logits_processor"] = LogitsProcessorList([chooser])
    with steer(lm, specs, gate_readings), torch.inference_mode():
        output = lm.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if fixed_length else None,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            **options,
        )
    return output[:, batch["input_ids"].shape[1] :]


def generate(
    lm: LoadedModel,
    prompts: Sequence[Prompt],
    specs: Sequence[SteeringSpec] = (),
    *,
    max_new_tokens: int = 64,
    fixed_length: bool = False,
    streamer: Any = None,
    decoder: Decoder = "auto",
    gate_readings: list[GateReading] | None = None,
    prefill: Sequence[str] | None = None,
) -> list[str]:
    """Greedy completions of chat prompts, one per row, with the specs applied (per-row strengths allowed).

    Greedy decoding keeps previews reproducible: the same prompt and settings always give the
    same text, so a difference between naive and steered is the steering's doing.
    `fixed_length` ignores end-of-text so every call makes exactly `max_new_tokens` (benchmarks).
    """
    if not prompts:
        return []
    new_tokens = generate_ids(
        lm,
        prompts,
        specs,
        max_new_tokens=max_new_tokens,
        fixed_length=fixed_length,
        streamer=streamer,
        decoder=decoder,
        gate_readings=gate_readings,
        prefill=prefill,
    )
    return [text.strip() for text in lm.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


@dataclass(frozen=True)
class GateVerdict:
    """What one gated spec's gate said about a prompt."""

    score: float
    threshold: float
    fired: bool


@dataclass(frozen=True)
class SideBySide:
    """One prompt answered without and with steering; `gates[i]` is spec i's gate verdict (None: not gated)."""

    prompt: str
    naive: str
    steered: str
    gates: tuple[GateVerdict | None, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "naive": self.naive,
            "steered": self.steered,
            "gates": [None if g is None else asdict(g) for g in self.gates],
        }


def verdicts(specs: Sequence[SteeringSpec], reading: GateReading | None, row: int) -> tuple[GateVerdict | None, ...]:
    """Per spec, its gate's verdict on batch row `row` (gated specs only; others None)."""
    out: list[GateVerdict | None] = []
    k = 0
    for spec in specs:
        if spec.gated and not spec.is_noop() and reading is not None:
            gate = spec.gate
            assert gate is not None
            out.append(GateVerdict(reading.scores[row][k], gate.threshold, reading.fired[row][k]))
            k += 1
        else:
            out.append(None)
    return tuple(out)


def generate_side_by_side(
    lm: LoadedModel, prompt: str, specs: Sequence[SteeringSpec], *, max_new_tokens: int = 64
) -> SideBySide:
    """Naive and steered answers to one prompt from a single batched `generate` call."""
    two_rows = [replace(spec, strength=(0.0, spec.strengths()[0])) for spec in specs]
    readings: list[GateReading] = []
    naive, steered = generate(lm, [prompt, prompt], two_rows, max_new_tokens=max_new_tokens, gate_readings=readings)
    gates = verdicts(two_rows, readings[0] if readings else None, row=1)
    return SideBySide(prompt=prompt, naive=naive, steered=steered, gates=gates)


def generate_strength_sweep(
    lm: LoadedModel, prompt: str, spec: SteeringSpec, strengths: Sequence[float], *, max_new_tokens: int = 64
) -> list[str]:
    """One prompt answered at several strengths of one vector, all in one batched call."""
    return generate(
        lm, [prompt] * len(strengths), [replace(spec, strength=tuple(strengths))], max_new_tokens=max_new_tokens
    )


class _RowStreamer:
    """Receives each decode step's tokens for every row (transformers' streamer protocol)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[list[int] | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt ids
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


def generate_stream(
    lm: LoadedModel,
    prompts: Sequence[Prompt],
    specs: Sequence[SteeringSpec] = (),
    *,
    max_new_tokens: int = 64,
    gate_readings: list[GateReading] | None = None,
) -> Iterator[list[str]]:
    """Like `generate`, but yields every row's text so far after each decoding step.

    Generation runs in a worker thread (steering is entered there, so it stays private to this
    request); the last item yielded is exactly what `generate` returns.
    """
    streamer = _RowStreamer()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["texts"] = generate(
                lm, prompts, specs, max_new_tokens=max_new_tokens, streamer=streamer, gate_readings=gate_readings
            )
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    rows: list[list[int]] = [[] for _ in prompts]
    while (step := streamer.queue.get()) is not None:
        for row, token in zip(rows, step, strict=True):
            row.append(token)
        yield [text.strip() for text in lm.tokenizer.batch_decode(rows, skip_special_tokens=True)]
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["texts"]
