import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from safesteer import CategoryVectors, ExtractionSettings, SafeSteerError, extract_vectors, vectors_from_activations
from safesteer.identity import ModelIdentity
from safesteer.methods.prompt import mean_difference, pruned_mean_difference
from safesteer.vectors import LayerStats, auroc, recommend_layer
from tests.conftest import HARMFUL, SAFE

IDENTITY = ModelIdentity("toy", None, "fp32", "llama", n_layers=3, hidden_size=2)


def test_mean_difference_points_from_harmful_to_safe():
    harmful = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]]])  # [n=2, L=1, d=2]
    safe = torch.tensor([[[1.0, 4.0]], [[1.0, 2.0]]])
    v = mean_difference(harmful, safe, ExtractionSettings())
    torch.testing.assert_close(v, torch.tensor([[0.0, 3.0]]))


def test_pruned_keeps_the_most_harmful_looking_examples():
    safe = torch.zeros(4, 1, 2)
    # two strong examples far along -y, two weak ones near the safe centroid
    harmful = torch.tensor([[[0.0, -10.0]], [[0.0, -8.0]], [[0.5, -0.1]], [[-0.5, -0.1]]])
    v = pruned_mean_difference(harmful, safe, ExtractionSettings(method="pruned", prune_fraction=0.5))
    torch.testing.assert_close(v, torch.tensor([[0.0, 9.0]]))
    full = mean_difference(harmful, safe, ExtractionSettings())
    assert v[0, 1] > full[0, 1]


def test_auroc_known_values():
    pos = torch.tensor([[3.0, 0.0, 1.0], [4.0, 1.0, 1.0]])
    neg = torch.tensor([[1.0, 3.0, 1.0], [2.0, 4.0, 1.0]])
    torch.testing.assert_close(auroc(pos, neg), torch.tensor([1.0, 0.0, 0.5]))


def test_recommendation_prefers_middle_layers_and_explains_itself():
    stats = [
        LayerStats(i, auroc=0.99 if i in (0, 9) else (0.95 if i == 5 else 0.9), effect_size=1.0, norm=1.0)
        for i in range(10)
    ]
    layer, reason = recommend_layer(stats)
    assert layer == 5
    assert "layer 5" in reason and "AUROC" in reason


def _synthetic(n=12, layers=3, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    harmful = torch.randn(n, layers, d, generator=g) + torch.tensor([0.0, -3.0])
    safe = torch.randn(n, layers, d, generator=g) + torch.tensor([0.0, 3.0])
    return harmful, safe


def test_vectors_from_activations_scores_every_layer_on_heldout_prompts():
    harmful, safe = _synthetic()
    result = vectors_from_activations(harmful, safe, ExtractionSettings(), IDENTITY, "toy")
    assert result.vectors.shape == (3, 2)
    assert [s.layer for s in result.layer_stats] == [0, 1, 2]
    assert all(s.auroc > 0.9 for s in result.layer_stats)  # well separated clusters
    assert result.recommended_layer == 1  # the only layer in the middle band (25%-65% of depth) of 3


def test_save_and_load_round_trip(tmp_path):
    harmful, safe = _synthetic()
    result = vectors_from_activations(harmful, safe, ExtractionSettings(method="pruned"), IDENTITY, "toy")
    path = result.save(tmp_path / "v.safetensors")
    loaded = CategoryVectors.load(path)
    torch.testing.assert_close(loaded.vectors, result.vectors)
    assert loaded.metadata() == result.metadata()


def test_loading_rejects_files_that_lie_about_their_shape(tmp_path):
    harmful, safe = _synthetic()
    result = vectors_from_activations(harmful, safe, ExtractionSettings(), IDENTITY, "toy")
    path = result.save(tmp_path / "v.safetensors")
    meta = result.metadata()
    meta["model"]["hidden_size"] = 3
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata={"safesteer": json.dumps(meta)})
    with pytest.raises(SafeSteerError, match="does not match"):
        CategoryVectors.load(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SafeSteerError, match="not a SafeSteer vectors file"):
        CategoryVectors.load(tmp_path / "junk.safetensors")


def test_extract_on_a_model(tiny_lm):
    seen = []
    result = extract_vectors(tiny_lm, HARMFUL, SAFE, category="crime", progress=lambda f, d: seen.append(f))
    assert result.vectors.shape == (tiny_lm.identity.n_layers, tiny_lm.identity.hidden_size)
    assert torch.isfinite(result.vectors).all()
    assert result.model == tiny_lm.identity
    assert (result.n_harmful, result.n_safe) == (8, 8)
    assert seen[-1] == 1.0


def test_extract_refuses_too_few_prompts_and_unknown_settings(tiny_lm):
    with pytest.raises(SafeSteerError, match="at least 4 harmful"):
        extract_vectors(tiny_lm, HARMFUL[:3], SAFE)
    with pytest.raises(SafeSteerError, match="unknown site"):
        extract_vectors(tiny_lm, HARMFUL, SAFE, ExtractionSettings(site="mlp"))  # type: ignore[arg-type]
    with pytest.raises(SafeSteerError, match="judge"):
        extract_vectors(tiny_lm, HARMFUL, SAFE, ExtractionSettings(method="guided"))


def test_extraction_progress_says_which_prompt_set_it_is_recording(tiny_lm):
    """Every set counts its prompts from zero again: the line says which set, so the count never seems to jump back."""
    from safesteer.vectors import ExtractionSettings

    lines: list[str] = []
    settings = ExtractionSettings(method="mean-diff")  # the policy gate: the category's sets, then the gate's
    harmful, safe = ([f"{p} (progress)" for p in side] for side in (HARMFUL, SAFE))  # none from the cache
    extract_vectors(tiny_lm, harmful, safe, settings, progress=lambda f, d: lines.append(d))
    counted = [line for line in lines if "recorded" in line]
    for label in ("harmful prompts: recorded", "safe prompts: recorded", "the policy's harmful prompts, dressed up:"):
        assert any(line.startswith(label) for line in counted), label
    from safesteer.extraction import GATE_SET_LABELS, SET_LABELS

    assert all(any(line.startswith(f"{label}: ") for label in (*SET_LABELS, *GATE_SET_LABELS)) for line in counted)
