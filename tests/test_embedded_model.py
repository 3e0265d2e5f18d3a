"""Integration tests on the real embedded SmolLM2-135M-Instruct, loaded 4-bit NF4 via bitsandbytes."""

import pytest
import torch

from safesteer import SteeringSpec, datasets, extract_vectors, generate, generate_side_by_side
from safesteer.vectors import ExtractionSettings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def malicious_vectors(embedded_lm):
    harmful = datasets.harmful_prompts("malicious-uses", limit=24, seed=1)
    safe = datasets.benign_prompts(limit=24, seed=1)
    return extract_vectors(embedded_lm, harmful, safe, ExtractionSettings(method="pruned"), category="malicious-uses")


def test_embedded_model_is_smollm2_in_4bit(embedded_lm):
    import bitsandbytes as bnb

    identity = embedded_lm.identity
    assert (identity.model_type, identity.n_layers, identity.hidden_size) == ("llama", 30, 576)
    assert identity.precision == "nf4"
    assert identity.revision.startswith("sha256:")
    assert isinstance(embedded_lm.architecture.layers[10].mlp.down_proj, bnb.nn.Linear4bit)


def test_extraction_on_real_prompts_separates_the_category(malicious_vectors):
    v = malicious_vectors
    assert v.vectors.shape == (30, 576) and torch.isfinite(v.vectors).all()
    best = max(s.auroc for s in v.layer_stats)
    assert best > 0.8  # real harmful vs everyday requests are clearly separable somewhere
    assert 7 <= v.recommended_layer <= 19


def test_real_steering_changes_output_and_strength_zero_does_not(embedded_lm, malicious_vectors):
    layer = malicious_vectors.recommended_layer
    prompt = datasets.harmful_prompts("malicious-uses", limit=60, seed=2)[-1]
    plain = generate(embedded_lm, [prompt], max_new_tokens=24)[0]
    zero = generate(
        embedded_lm, [prompt], [SteeringSpec(malicious_vectors.vector(layer), layer, 0.0)], max_new_tokens=24
    )[0]
    assert zero == plain
    side = generate_side_by_side(
        embedded_lm, prompt, [SteeringSpec(malicious_vectors.vector(layer), layer, 4.0)], max_new_tokens=24
    )
    assert side.naive == plain
    assert side.steered != plain
    assert len(side.steered) > 0


@pytest.fixture(scope="module")
def embedded_int4():
    from safesteer import load_model
    from safesteer.int4 import int4_problem

    if int4_problem() is not None:
        pytest.skip(f"int4 kernel unavailable: {int4_problem()}")
    return load_model(None, "int4", device="cpu")


def test_int4_repacks_the_gguf_4bit_codes_exactly(embedded_int4):
    """The embedded GGUF is Q4_1: repacking its dequantized weights finds the very same grid."""
    from safetensors import safe_open

    from safesteer.checkpoints import EMBEDDED_MODEL
    from safesteer.int4 import GROUP_SIZE, _pack_codes
    from safesteer.models import _resolve_source
    from safesteer.progress import no_progress

    folder = _resolve_source(EMBEDDED_MODEL, None, no_progress).location
    with safe_open(f"{folder}/model.safetensors", "pt") as checkpoint:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
            weight = checkpoint.get_tensor(name).float()
            codes, sz = _pack_codes(weight, GROUP_SIZE)
            rows = weight.shape[0]
            rebuilt = (codes.reshape(rows, -1, GROUP_SIZE) - 8) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]
            assert (rebuilt.reshape(weight.shape) - weight).abs().max() < 1e-6


def test_int4_lean_loop_matches_transformers_on_the_real_model(embedded_int4, malicious_vectors):
    layer = malicious_vectors.recommended_layer
    prompts = datasets.harmful_prompts("malicious-uses", limit=3, seed=4)
    spec = SteeringSpec(malicious_vectors.vector(layer), layer, (0.0, 4.0, 2.0))
    lean = generate(embedded_int4, prompts, [spec], max_new_tokens=32)
    reference = generate(embedded_int4, prompts, [spec], max_new_tokens=32, decoder="transformers")
    assert lean == reference


def test_int4_reads_the_template_start_from_the_cache_and_changes_no_token(
    embedded_int4, malicious_vectors, monkeypatch
):
    """The chat template's start (a 23-token system prompt) is read once per steering; prompts of several
    lengths share one pass after it; every answer is still transformers' answer to the prompt alone."""
    from safesteer import decoding
    from safesteer.prompt_passes import template_start

    opening = template_start(embedded_int4)
    assert opening.exact()  # this machine's int4 products are exact row by row
    assert embedded_int4.tokenizer.decode(opening.ids).startswith("<|im_start|>system\nYou are a helpful")
    starts = []
    real = decoding.prompt_pass
    monkeypatch.setattr(
        decoding,
        "prompt_pass",
        lambda lm, ids, lengths, start, cache: starts.append(start) or real(lm, ids, lengths, start, cache),
    )
    layer = malicious_vectors.recommended_layer
    prompts = datasets.harmful_prompts("malicious-uses", limit=3, seed=9)
    assert len({len(embedded_int4.encode([p])["input_ids"][0]) for p in prompts}) > 1
    strengths = (0.0, 4.0, 4.0)
    lean = generate(
        embedded_int4, prompts, [SteeringSpec(malicious_vectors.vector(layer), layer, strengths)], max_new_tokens=24
    )
    assert starts == [opening.length]  # one pass for all three, after the cached start
    for prompt, strength, answer in zip(prompts, strengths, lean, strict=True):
        own = [SteeringSpec(malicious_vectors.vector(layer), layer, strength)]
        assert [answer] == generate(embedded_int4, [prompt], own, max_new_tokens=24, decoder="transformers")
    conversation = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": prompts[0]}]
    starts.clear()
    own_system = generate(embedded_int4, [conversation], max_new_tokens=16)
    assert starts == [0]  # another start: the whole prompt is read
    assert own_system == generate(embedded_int4, [conversation], max_new_tokens=16, decoder="transformers")


@pytest.mark.parametrize("token", ["last", "mean"])
def test_int4_gates_read_after_the_cached_start_get_the_features_of_a_whole_pass(embedded_int4, token):
    """A gate pass that reads only what follows the template start, with the start's states put back in
    front, gives every gate the same features bit for bit, prompts of several lengths right-padded."""
    from types import SimpleNamespace

    from safesteer.prompt_passes import right_padded, template_start
    from safesteer.steering import read_gate_features

    opening = template_start(embedded_int4)
    prompts = [*datasets.harmful_prompts("malicious-uses", limit=2, seed=9), *datasets.benign_prompts(limit=2, seed=9)]
    rows = [embedded_int4.encode([p])["input_ids"][0] for p in prompts]
    assert len({len(row) for row in rows}) > 1 and all(opening.usable_for(row[None]) for row in rows)
    ids = right_padded(rows)
    mask = (torch.arange(ids.shape[1])[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
    gates = [SimpleNamespace(layer=layer, site="residual", token=token) for layer in (0, 13, 29)]
    start = opening.for_gates({(g.layer, g.site) for g in gates})
    whole = read_gate_features(embedded_int4, ids, mask, gates)
    split = read_gate_features(embedded_int4, ids, mask, gates, start=start)
    assert all(torch.equal(a, b) for a, b in zip(whole, split, strict=True))
    # the same prompt twice is read once, and still after the start
    twice = read_gate_features(embedded_int4, ids[[0, 0, 1]], mask[[0, 0, 1]], gates, start=start)
    assert all(torch.equal(t, w[[0, 0, 1]]) for t, w in zip(twice, whole, strict=True))
