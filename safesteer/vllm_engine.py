"""Saved policies served by vLLM: the gate decided here, the steering applied inside vLLM (`vllm_plugin`).

`VllmBatcher` has the `batching.Batcher` interface, so `safesteer serve --engine vllm` keeps the
API contract (`policy@version`, `base`, the `safesteer` field, hot swap from the store, keys)
while vLLM schedules: continuous batching, requests joining and leaving at every step, paged
attention, and its sampling. Each request is turned into vLLM's terms in three steps:

1. the prompt is tokenized with the project's chat template and marker rule (`LoadedModel.encode`),
   so vLLM reads exactly the tokens the project's own engine reads;
2. the policy's gates read the prompt with the project's model, unsteered, as `steering.decide_rows`
   does (routing included), so a request is steered by the categories the own engine would steer;
3. what steers it travels in `SamplingParams.extra_args` to the plugin in vLLM's workers.

vLLM is imported only here and in the plugin: the rest of the project does not need it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .batching import Job, QueueFull
from .errors import SafeSteerError
from .gates import Gate
from .generation import _eos_ids
from .models import LoadedModel
from .steering import SteeringSpec, decide_rows, read_gate_features
from .vllm_plugin import FIELD

log = logging.getLogger(__name__)


def vllm_checkpoint(location: Path) -> Path:
    """A checkpoint folder vLLM loads as the project does.

    transformers 5 saves a tied embedding once, as `lm_head.weight`; vLLM looks for
    `model.embed_tokens.weight` and would leave the embedding empty. The copy adds that name and
    links every other file.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = location / "model.safetensors"
    if not weights.is_file():
        return location
    with safe_open(str(weights), "pt") as f:
        names = set(f.keys())
        if "model.embed_tokens.weight" in names or "lm_head.weight" not in names:
            return location
        tensors = {name: f.get_tensor(name) for name in names}
    target = location.parent / f"{location.name}-vllm"
    if (target / "model.safetensors").is_file():
        return target
    target.mkdir(exist_ok=True)
    for item in location.iterdir():
        if item.name != "model.safetensors" and not (target / item.name).exists():
            (target / item.name).symlink_to(item.resolve())
    tensors["model.embed_tokens.weight"] = tensors["lm_head.weight"].clone()  # one tensor per name on disk
    partial = target / "model.safetensors.partial"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata={"format": "pt"})
    os.replace(partial, target / "model.safetensors")
    return target


def steering_payload(specs: Sequence[SteeringSpec]) -> dict[str, Any]:
    """What steers one request, for `extra_args` (plain numbers: it crosses vLLM's process boundary)."""
    return {
        "specs": [
            {
                "vectors": (spec.vector if spec.vector.dim() == 2 else spec.vector.unsqueeze(0)).float().tolist(),
                "layer": spec.layer,
                "site": spec.site,
                "strength": spec.strengths()[0],
                "where": spec.where,
                "how": spec.how,
                "safe_projection": None if spec.safe_projection is None else list(spec.safe_projection),
            }
            for spec in specs
            if not spec.is_noop()
        ]
    }


def decide(lm: LoadedModel, prompt_ids: list[int], specs: Sequence[SteeringSpec]) -> list[bool]:
    """Which specs steer this prompt: always-on ones always; gated ones where their gate fires, one per policy.

    The gates read the prompt unsteered, as the project's engine reads them before its prompt pass.
    """
    gated = [k for k, spec in enumerate(specs) if spec.gated and not spec.is_noop()]
    steering = [not spec.is_noop() for spec in specs]
    if not gated:
        return steering
    gates: list[Gate] = [specs[k].gate for k in gated]  # type: ignore[misc]
    ids = torch.tensor([prompt_ids], device=lm.device)
    features = read_gate_features(lm, ids, torch.ones_like(ids), gates)
    _, fired = decide_rows(gates, features)
    for position, k in enumerate(gated):
        steering[k] = bool(fired[0, position])
    return steering


class VllmBatcher:
    """`Batcher`'s interface over a vLLM engine: one thread adds requests, steps the engine and hands out text."""

    def __init__(
        self,
        lm: LoadedModel,
        checkpoint: Path,
        *,
        max_queue: int = 64,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        self.lm = lm
        self.eos = _eos_ids(lm)
        self._incoming: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._running: dict[str, tuple[Job, tuple[str, ...]]] = {}
        self._closing = threading.Event()
        self.restarts = 0
        self.failed_batches = 0
        self.batches: list[int] = []
        options = {"enforce_eager": True, "max_model_len": 4096, "dtype": "float32", **(engine_options or {})}
        self._engine = _engine(vllm_checkpoint(checkpoint), options)
        self._worker = threading.Thread(target=self._run, name="safesteer-vllm", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        return self._incoming.qsize()

    def ensure_running(self) -> bool:
        return self._worker.is_alive()

    def submit(self, job: Job) -> Job:
        if self._closing.is_set():
            raise SafeSteerError("the server is shutting down")
        try:
            self._incoming.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._incoming.maxsize} requests are already waiting; retry shortly") from None
        return job

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, finish those taken, then stop vLLM's engine processes."""
        self._closing.set()
        self._worker.join(timeout)
        core = getattr(self._engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def _run(self) -> None:
        while not (self._closing.is_set() and self._incoming.empty() and not self._running):
            try:
                self._admit()
                self._abort_cancelled()
                if not self._running:
                    continue
                self.batches.append(len(self._running))
                for output in self._engine.step():
                    self._deliver(output)
            except Exception as exc:  # the engine's failure is its requests' failure, never the thread's
                self.failed_batches += 1
                log.error("a vLLM step failed", exc_info=exc)
                for job, _ in self._running.values():
                    job.settle(error=exc)
                self._running.clear()

    def _admit(self) -> None:
        """New requests join at the next step: tokenized, gated, and handed to vLLM with their steering."""
        from vllm import SamplingParams

        block = not self._running
        while True:
            try:
                job = self._incoming.get(timeout=0.05) if block else self._incoming.get_nowait()
            except queue.Empty:
                return
            block = False
            if job.cancelled.is_set():
                job.settle()
                continue
            try:
                ids = self.lm.encode([job.prompt])["input_ids"][0].tolist()
                steering = decide(self.lm, ids, job.specs)
                active = [spec for spec, on in zip(job.specs, steering, strict=True) if on]
                fired = tuple(
                    name for spec, name, on in zip(job.specs, job.names, steering, strict=True) if on and spec.gated
                )
                sampling = job.sampling
                params = SamplingParams(
                    max_tokens=job.max_new_tokens,
                    temperature=0.0 if sampling is None else sampling.temperature,
                    top_p=1.0 if sampling is None else sampling.top_p,
                    seed=None if sampling is None else sampling.seed,
                    stop_token_ids=self.eos,
                    detokenize=False,
                    extra_args={FIELD: steering_payload(active)} if active else None,
                )
            except Exception as exc:
                job.settle(error=exc)
                continue
            request_id = uuid.uuid4().hex
            self._engine.add_request(request_id, {"prompt_token_ids": ids}, params)
            self._running[request_id] = (job, fired)
            job.text = ""
            job.ids = []
            job.prompt_tokens = len(ids)

    def _abort_cancelled(self) -> None:
        gone = [rid for rid, (job, _) in self._running.items() if job.cancelled.is_set()]
        if gone:
            self._engine.abort_request(gone)
            for rid in gone:
                job, _ = self._running.pop(rid)
                job.settle()

    def _deliver(self, output: Any) -> None:
        entry = self._running.get(output.request_id)
        if entry is None:
            return
        job, fired = entry
        ids = [t for t in output.outputs[0].token_ids if t not in self.eos]
        job.ids = list(ids)
        whole = self.lm.tokenizer.decode(ids, skip_special_tokens=True)
        stopped = job.show(whole)
        if stopped and not output.finished:
            self._engine.abort_request([output.request_id])
        if output.finished or stopped:
            self._running.pop(output.request_id, None)
            job.finish(whole, job.prompt_tokens, fired)


def _engine(checkpoint: Path, options: dict[str, Any]) -> Any:
    """vLLM's engine for `checkpoint`, with the plugin loaded in every process it starts."""
    try:
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine
    except ImportError as exc:
        raise SafeSteerError(
            "the vLLM engine needs vLLM in this environment (`make test-vllm` builds one: .venv-vllm)"
        ) from exc
    from .vllm_plugin import register

    register()  # in this process too, in case vLLM runs its workers here
    options.setdefault("gpu_memory_utilization", float(os.environ.get("SAFESTEER_VLLM_MEMORY", "0.3")))
    options.setdefault("enable_prefix_caching", False)  # a gate reads every prompt token anyway
    return LLMEngine.from_engine_args(EngineArgs(model=str(checkpoint), **options))
