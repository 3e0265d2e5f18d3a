"""Text features for gate baselines, and the data gates may learn from kept apart from what measures them."""

import torch

from safesteer import datasets
from safesteer.text_gates import tfidf_features, tfidf_vocabulary


def test_tfidf_vectors_are_unit_length_and_ignore_unknown_words():
    texts = ["how do I bake bread", "how do I bake a cake", "how do I fix a bike"]
    vocabulary = tfidf_vocabulary(texts, min_count=2)
    assert {"how", "how do", "bake", "i bake"} <= set(vocabulary) and "bread" not in vocabulary
    assert vocabulary["bake"] > vocabulary["how"]  # rarer words weigh more
    features = tfidf_features([*texts, "zebra"], vocabulary)
    assert torch.allclose(features[:3].norm(dim=-1), torch.ones(3))
    assert features[3].abs().sum() == 0


def test_gate_training_data_never_overlaps_what_measures_gates():
    training = set(datasets.edgy_benign_prompts(part="training"))
    measured = set(datasets.edgy_benign_prompts()) | set(datasets.benign_prompts(part="all"))
    assert len(training) >= 200 and not training & measured
    framings = datasets.training_framings()
    assert len(framings) >= 8 and all(f.count("{prompt}") == 1 for f in framings)
    assert all(f.format(prompt="X").count("X") == 1 for f in framings)


def test_baselines_are_measured_on_the_gates_own_held_out_prompts(tiny_lm):
    from safesteer.extraction import record_policy_gate
    from safesteer.text_gates import baseline_rates
    from safesteer.vectors import ExtractionSettings
    from tests.conftest import HARMFUL, SAFE

    harmful, safe, others = HARMFUL * 3, SAFE * 3, [f"{p} Be specific." for p in HARMFUL]
    gate = record_policy_gate(tiny_lm, harmful, safe, others, ExtractionSettings())
    rates = baseline_rates(harmful, safe, others, seed=0, fpr=0.05)
    assert [r.name for r in rates] == ["word counts (TF-IDF)", "sentence embeddings (MiniLM)"]
    held = gate.rates()
    for r in rates:
        assert (r.n_harmful, r.n_safe) == (held.n_harmful, held.n_safe)
        assert 0.0 <= r.catch_rate <= 1.0 and 0.0 <= r.false_positive_rate <= 1.0


def test_the_preview_says_when_another_category_fit_better():
    from safesteer.generation import GateVerdict
    from studio.gating import verdict_lines

    lines = verdict_lines(
        ["fraud", "hacking", "cooking"],
        [GateVerdict(2.0, 1.0, True), GateVerdict(1.5, 1.0, False), GateVerdict(-3.0, 1.0, False)],
    ).splitlines()
    assert "**fired**" in lines[0] and "steered" in lines[0]
    assert "fits another category better" in lines[1] and "did not fire" in lines[2]
