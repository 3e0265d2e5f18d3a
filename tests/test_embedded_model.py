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
