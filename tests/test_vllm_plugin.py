"""The vLLM plugin's own logic, without vLLM: which rows a step steers, and that it steers them as the own engine."""

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cli.generation import vllm_options
from safesteer import SafeSteerError
from safesteer.operations import apply_steering, prepare_shift
from safesteer.steering import SteeringSpec
from safesteer.vllm_engine import steering_payload
from safesteer.vllm_plugin import FIELD, _layer_hook, parse_payload, set_plan, step_plan

HIDDEN = 8


def _spec(layer: int = 2, strength: float = 4.0, where: str = "all", layers: int = 1) -> SteeringSpec:
    vector = torch.arange(HIDDEN * layers, dtype=torch.float32).reshape(layers, HIDDEN) / 10
    return SteeringSpec(vector if layers > 1 else vector[0], layer, strength, where=where)  # type: ignore[arg-type]


def test_a_payload_carries_the_spec_and_spreads_the_strength():
    steers = parse_payload(steering_payload([_spec(layers=2)]))
    assert [s.layer for s in steers] == [2, 3] and [s.strength for s in steers] == [2.0, 2.0]
    assert torch.equal(steers[1].vector, torch.arange(HIDDEN, 2 * HIDDEN, dtype=torch.float32) / 10)
    assert steering_payload([_spec(strength=0.0)]) == {"specs": []}  # strength 0 steers nothing


def _runner(steered: dict[str, dict]) -> SimpleNamespace:
    """A model runner's view of a step: a prompt of 3 tokens (first pass), a decode step, a chunked prompt."""
    requests = {
        rid: SimpleNamespace(
            num_prompt_tokens=prompt,
            sampling_params=SimpleNamespace(extra_args={FIELD: steered[rid]} if rid in steered else None),
        )
        for rid, prompt in (("a", 3), ("b", 2), ("c", 6))
    }
    batch = SimpleNamespace(num_reqs=3, req_ids=["a", "b", "c"], num_computed_tokens_cpu=np.array([0, 4, 0]))
    return SimpleNamespace(input_batch=batch, requests=requests)


def test_the_plan_names_each_steered_requests_rows_and_whether_they_are_prompt_tokens():
    payload = steering_payload([_spec()])
    plan = step_plan(_runner({"a": payload, "c": payload}), [3, 1, 2])
    assert [(p.start, p.count, p.prompt, p.has_last_prompt_token) for p in plan] == [
        (0, 3, True, True),  # the whole prompt
        (4, 2, True, False),  # the first chunk of a 6-token prompt
    ]


@pytest.mark.parametrize("where", ["all", "prompt", "generated"])
def test_the_hook_shifts_the_residual_stream_of_planned_rows_only_as_the_own_engine_does(where):
    spec = _spec(where=where)
    set_plan(step_plan(_runner({"a": steering_payload([spec])}), [3, 1, 2]))
    hidden, residual = torch.randn(6, HIDDEN), torch.randn(6, HIDDEN)
    try:
        new_hidden, new_residual = _layer_hook(2, "residual")(torch.nn.Identity(), (), (hidden, residual))
    finally:
        set_plan([])
    assert new_residual is residual
    stream, before = new_hidden + residual, hidden + residual
    shift = prepare_shift(spec.vector, (4.0,), torch.float32, torch.device("cpu"), 3, "add", where)  # type: ignore[arg-type]
    expected = apply_steering(before[0:3].unsqueeze(0), [shift], prompt_pass=True).squeeze(0)
    assert torch.allclose(stream[0:3], expected, atol=1e-5)
    assert torch.equal(new_hidden[3:], hidden[3:])  # the other requests' rows are untouched
    assert _layer_hook(5, "residual")(torch.nn.Identity(), (), (hidden, residual)) is None  # no plan: no change


def test_vllm_options_read_json_values():
    assert vllm_options(["tensor_parallel_size=2", "dtype=bfloat16", "enforce_eager=true"]) == {
        "tensor_parallel_size": 2,
        "dtype": "bfloat16",
        "enforce_eager": True,
    }
    with pytest.raises(SafeSteerError, match="NAME=VALUE"):
        vllm_options(["oops"])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_serving_on_vllm_without_vllm_says_what_to_install(capsys, tmp_path, monkeypatch):
    from cli import main

    monkeypatch.setenv("SAFESTEER_DB", f"sqlite:///{tmp_path / 'p.db'}")
    assert main(["serve", "--engine", "vllm"]) == 2
    assert "needs vLLM installed" in capsys.readouterr().err
