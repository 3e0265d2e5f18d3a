"""What the GPU path relies on, checked on a CPU: decoders agree, split models steer, the GPU bench runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safesteer import SafeSteerError, SteeringSpec, record_activations, wrap_model
from safesteer.activations import default_batch_size
from safesteer.generation import DECODERS, generate_ids
from tests.conftest import HARMFUL, SAFE

ROOT = Path(__file__).resolve().parent.parent


def random_spec(lm, layer: int, strength) -> SteeringSpec:
    vector = torch.randn(lm.identity.hidden_size, generator=torch.Generator().manual_seed(layer)) * 4
    return SteeringSpec(vector, layer, strength)


@pytest.mark.parametrize("decoder", [d for d in DECODERS if d != "transformers"])
def test_every_decoder_gives_the_tokens_of_generate(tiny_lm, decoder):
    prompts = [HARMFUL[0], SAFE[1] + " Answer at length, please."]
    specs = [
        random_spec(tiny_lm, 1, (0.0, 4.0)),
        SteeringSpec(random_spec(tiny_lm, 2, 1.0).vector, 2, 2.0, site="attention"),
    ]
    expected = generate_ids(tiny_lm, prompts, specs, max_new_tokens=12, decoder="transformers")
    assert torch.equal(generate_ids(tiny_lm, prompts, specs, max_new_tokens=12, decoder=decoder), expected)


def test_unknown_decoder_is_refused(tiny_lm):
    with pytest.raises(SafeSteerError, match="unknown decoder"):
        generate_ids(tiny_lm, [HARMFUL[0]], [], max_new_tokens=4, decoder="fastest")  # type: ignore[arg-type]


def test_batch_size_zero_picks_the_device_default_and_changes_only_rounding(tiny_lm):
    assert default_batch_size(tiny_lm) == 16  # a CPU
    prompts = HARMFUL + SAFE
    auto, small = record_activations(tiny_lm, prompts, batch_size=0), record_activations(tiny_lm, prompts, batch_size=3)
    torch.testing.assert_close(auto, small, atol=1e-4, rtol=1e-4)


def test_a_model_split_over_devices_steers_each_layer_where_it_lives(tiny_folder, tiny_lm, tmp_path):
    """Half the layers offloaded to disk by accelerate: hooks still steer them, exactly as in one piece."""
    from transformers import AutoModelForCausalLM

    n_layers = tiny_lm.architecture.n_layers
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": ("cpu" if i < n_layers // 2 else "disk") for i in range(n_layers)}
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_folder), dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path)
    )
    split = wrap_model(model, tiny_lm.tokenizer, "tiny-split", "fp32")
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    specs = [random_spec(tiny_lm, 0, 4.0), random_spec(tiny_lm, n_layers - 1, 4.0)]  # one kept in memory, one offloaded
    prompts = [HARMFUL[1]]

    def tokens(lm, steering):
        return generate_ids(lm, prompts, steering, max_new_tokens=10, fixed_length=True, decoder="transformers")

    unsteered = tokens(split, [])
    assert torch.equal(unsteered, tokens(tiny_lm, []))
    steered = tokens(split, specs)
    assert not torch.equal(steered, unsteered)
    assert torch.equal(steered, tokens(tiny_lm, specs))
    assert torch.equal(tokens(split, [SteeringSpec(s.vector, s.layer, 0.0) for s in specs]), unsteered)


def test_the_gpu_benchmark_runs_and_its_checks_hold_on_a_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "gpu.py"),
        *("--shapes", "tiny", "--device", "cpu", "--precisions", "fp32", "--prompts", "16", "--repeats", "1"),
        *("--new-tokens", "6", "--sweep-prompts", "4", "--sweep-tokens", "4", "--extraction-batches", "8"),
        *("--workdir", str(tmp_path / "models"), "--out", str(out)),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "| tiny | fp32 |" in finished.stdout
    result = json.loads(out.read_text())["shapes"]["tiny"]["fp32"]
    checks = result["checks"]
    assert checks["zero_strength_is_unsteered"] and checks["zero_row_of_mixed_batch_is_unsteered"]
    assert checks["threads_without_leaks"]
    for option, decoders in checks["same_tokens_as_generate"].items():
        for decoder, agreement in decoders.items():
            assert agreement["identical"], (option, decoder)
    assert set(result["generation"]) == {"new_tokens", "transformers", "static", "lean"}
    assert result["extraction"]["batch_8"]["prompts_per_s"] > 0
