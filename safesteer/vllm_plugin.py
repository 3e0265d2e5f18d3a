"""Per-request steering inside vLLM's model runner: a vLLM general plugin (entry point `vllm.general_plugins`).

vLLM batches many requests into one flat row of tokens per step. To steer each request by its own
policy, the plugin wraps the model runner's input preparation: after it, the runner knows which
token rows belong to which request, how far each request has got, and each request's sampling
parameters, whose `extra_args["safesteer"]` carries the steering (`vllm_engine.steering_payload`:
vectors, layer, strength, where and how). Forward hooks on the decoder layers then apply exactly
the operations the project's own engine applies (`operations.apply_steering`) to those rows only:
a request without the field, and every other request in the batch, runs untouched.

The gate is decided before the request reaches vLLM (`vllm_engine`), from an unsteered reading
of the prompt, as the project's own engine decides it; a request whose gate did not fire carries
no steering at all. Hooks need eager execution (`enforce_eager=True`): a captured CUDA graph
would replay without them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .operations import Shift, apply_steering, prepare_shift

log = logging.getLogger(__name__)

FIELD = "safesteer"
"""The key of `SamplingParams.extra_args` that carries a request's steering."""


@dataclass(frozen=True)
class LayerSteer:
    """One vector at one layer and site, with the request's strength, where and how."""

    layer: int
    site: str
    vector: torch.Tensor
    strength: float
    where: str
    how: str
    safe_projection: float | None


@dataclass(frozen=True)
class Slice:
    """A request's token rows in this step: `start`, `count`; whether they are prompt tokens, and the prompt's last."""

    start: int
    count: int
    prompt: bool
    has_last_prompt_token: bool
    steers: tuple[LayerSteer, ...]


_parsed: OrderedDict[str, tuple[LayerSteer, ...]] = OrderedDict()
_PARSED_LIMIT = 256
_by_request: OrderedDict[tuple[str, int], tuple[LayerSteer, ...]] = OrderedDict()  # a request's steering stays
_REQUEST_LIMIT = 4096
_step = threading.local()  # `plan`: the slices of the forward pass about to run; `at`: them by (layer, site)


def parse_payload(payload: dict[str, Any]) -> tuple[LayerSteer, ...]:
    """A request's steering, as sent by `vllm_engine.steering_payload`; parsed once per distinct payload."""
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    if key in _parsed:
        _parsed.move_to_end(key)
        return _parsed[key]
    steers = []
    for spec in payload.get("specs", []):
        vectors = torch.tensor(spec["vectors"], dtype=torch.float32)
        projections = spec.get("safe_projection")
        share = float(spec["strength"]) / len(vectors)  # spread: the layers share the strength evenly
        for part, vector in enumerate(vectors):
            steers.append(
                LayerSteer(
                    layer=int(spec["layer"]) + part,
                    site=str(spec.get("site", "residual")),
                    vector=vector,
                    strength=share,
                    where=str(spec.get("where", "all")),
                    how=str(spec.get("how", "add")),
                    safe_projection=None if projections is None else float(projections[part]),
                )
            )
    parsed = tuple(steers)
    _parsed[key] = parsed
    while len(_parsed) > _PARSED_LIMIT:
        _parsed.popitem(last=False)
    return parsed


def step_plan(runner: Any, num_scheduled_tokens: Sequence[int]) -> list[Slice]:
    """Which token rows of this step belong to a steered request, read off the runner's input batch."""
    batch = runner.input_batch
    plan: list[Slice] = []
    start = 0
    for index in range(batch.num_reqs):
        count = int(num_scheduled_tokens[index])
        request = runner.requests.get(batch.req_ids[index])
        params = getattr(request, "sampling_params", None)
        payload = (getattr(params, "extra_args", None) or {}).get(FIELD)
        if payload:
            done = int(batch.num_computed_tokens_cpu[index])
            prompt_length = int(request.num_prompt_tokens)
            prompt = done < prompt_length
            steers = _request_steers(batch.req_ids[index], payload)
            plan.append(Slice(start, count, prompt, prompt and done + count >= prompt_length, steers))
        start += count
    return plan


def _request_steers(request_id: str, payload: dict[str, Any]) -> tuple[LayerSteer, ...]:
    """Parsed once per request (its id and its payload object), not at every decoding step."""
    key = (request_id, id(payload))
    if key not in _by_request:
        _by_request[key] = parse_payload(payload)
        while len(_by_request) > _REQUEST_LIMIT:
            _by_request.popitem(last=False)
    return _by_request[key]


def set_plan(plan: list[Slice]) -> None:
    """The plan for the next forward pass, also grouped by (layer, site) so an unsteered layer costs a lookup."""
    at: dict[tuple[int, str], list[tuple[Slice, list[LayerSteer]]]] = {}
    for piece in plan:
        grouped: dict[tuple[int, str], list[LayerSteer]] = {}
        for steer in piece.steers:
            grouped.setdefault((steer.layer, steer.site), []).append(steer)
        for key, steers in grouped.items():
            at.setdefault(key, []).append((piece, steers))
    _step.plan, _step.at = plan, at


def _shifted(hidden: torch.Tensor, steers: Sequence[LayerSteer], piece: Slice) -> torch.Tensor:
    """One request's rows `[count, hidden]` with its steering applied as the project's engine applies it."""
    states = hidden.unsqueeze(0)  # [1, count, hidden]: one row, its positions
    shifts: list[Shift] = []
    for steer in steers:
        if steer.where == "generated" and piece.prompt and not piece.has_last_prompt_token:
            continue  # an early chunk of a long prompt: its last position is not the prompt's last
        shifts.append(
            prepare_shift(
                steer.vector,
                (steer.strength,),
                hidden.dtype,
                hidden.device,
                3,
                steer.how,  # type: ignore[arg-type]
                steer.where,  # type: ignore[arg-type]
                steer.safe_projection,
            )
        )
    return apply_steering(states, shifts, prompt_pass=piece.prompt).squeeze(0)


def _layer_hook(layer: int, site: str):
    key = (layer, site)

    def hook(module: torch.nn.Module, args: object, output: Any) -> Any:
        pieces = getattr(_step, "at", {}).get(key)
        if not pieces:
            return None
        residual_pair = isinstance(output, tuple) and len(output) == 2 and output[1] is not None
        if site == "residual" and residual_pair:
            hidden, residual = output  # vLLM keeps the stream as hidden + residual
            full = hidden + residual
        else:
            full = output[0] if isinstance(output, tuple) else output
        changed = full.clone()
        for piece, steers in pieces:
            rows = slice(piece.start, piece.start + piece.count)
            changed[rows] = _shifted(full[rows], steers, piece)
        if site == "residual" and residual_pair:
            return (hidden + (changed - full), residual)
        return (changed, *output[1:]) if isinstance(output, tuple) else changed

    return hook


def _decoder_layers(model: torch.nn.Module) -> Sequence[Any]:
    for path in ("model.layers", "language_model.model.layers", "model.language_model.layers"):
        found: Any = model
        for name in path.split("."):
            found = getattr(found, name, None)
            if found is None:
                break
        if found is not None:
            return found
    raise RuntimeError(f"safesteer: cannot find the decoder layers of {type(model).__name__}")


def install(model: torch.nn.Module) -> None:
    """Hooks on every decoder layer and attention block, once per model; they act only on planned rows."""
    if getattr(model, "_safesteer_hooks", False):
        return
    for index, layer in enumerate(_decoder_layers(model)):
        layer.register_forward_hook(_layer_hook(index, "residual"))
        layer.self_attn.register_forward_hook(_layer_hook(index, "attention"))

    def forget(module: torch.nn.Module, args: object, output: object) -> None:
        set_plan([])  # a plan serves one forward pass: a warm-up or dummy pass after it sees none

    model.register_forward_hook(forget)
    model._safesteer_hooks = True  # type: ignore[assignment]
    log.info("safesteer: per-request steering hooks installed on %d layers", len(_decoder_layers(model)))


def register() -> None:
    """The vLLM general plugin: wrap the model runner's input preparation (runs in every vLLM process)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_safesteer_wrapped", False):
        return
    original = GPUModelRunner._prepare_inputs

    def prepare_inputs(self: Any, scheduler_output: Any, num_scheduled_tokens: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        install(self.get_model())
        set_plan(step_plan(self, num_scheduled_tokens))
        return result

    GPUModelRunner._prepare_inputs = prepare_inputs
    GPUModelRunner._safesteer_wrapped = True
