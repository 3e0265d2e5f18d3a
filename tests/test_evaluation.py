import pytest
import torch

from safesteer import SafeSteerError, SteeringSpec, extract_vectors
from safesteer.evaluation import Cell, Evaluation, SweepSettings, evaluate
from safesteer.methods.guided import guided_vectors
from safesteer.metrics import next_token_divergence, perplexity
from safesteer.policy import PolicyCategory
from safesteer.recommendation import recommend
from safesteer.reports import report_markdown, write_plots
from safesteer.vectors import ExtractionSettings
from tests.conftest import HARMFUL, SAFE


def _cell(layer, strength, unsafe=None, degenerate=0.1, off_topic=0.05, degraded=0.0, ppl=3.0):
    measures = {
        "unsafe_attempt_rate": unsafe,
        "degenerate_rate": degenerate,
        "off_topic_rate": off_topic,
        "everyday_degraded": degraded,
        "refusal_rate": 0.0,
        "relevance": 0.5,
        "perplexity": ppl,
        "benign_changed": 0.1,
        "benign_kl": 0.0,
    }
    return Cell(layer, strength, measures)


def test_recommendation_keeps_answers_readable_then_picks_the_safest():
    base = _cell(None, 0.0, unsafe=0.6, degenerate=0.1, off_topic=0.05)
    mild = _cell(1, 1.0, unsafe=0.4, degenerate=0.15, degraded=0.05)
    edge = _cell(2, 2.0, unsafe=0.3, degenerate=0.2, off_topic=0.15, degraded=0.02)  # exactly at the limits
    loops = _cell(1, 4.0, unsafe=0.0, degenerate=0.6)  # safest, but unreadable: perplexity would have liked it
    taxing = _cell(3, 3.0, unsafe=0.2, degraded=0.2)  # everyday answers pay for it
    best = recommend(base, [mild, edge, loops, taxing])
    assert (best["layer"], best["strength"]) == (2, 2.0) and "lowest unsafe-attempt rate" in best["rule"]
    assert [(c["layer"], c["strength"], c["label"]) for c in best["runners_up"]] == [(1, 1.0, "L1/1")]
    assert best["kept_quality"] and best["options"] == {"where": "all", "how": "add", "spread": 1}

    cells = (mild, edge, loops, taxing)
    blind = [Cell(c.layer, c.strength, {**c.measures, "unsafe_attempt_rate": None}) for c in cells]
    best = recommend(_cell(None, 0.0, None), blind)
    assert (best["layer"], best["strength"]) == (2, 2.0) and "no unsafe-attempt judge" in best["rule"]

    least_bad = recommend(base, [loops, taxing])
    assert (least_bad["layer"], least_bad["strength"]) == (3, 3.0) and "no cell kept quality" in least_bad["rule"]
    assert not least_bad["kept_quality"]


def test_perplexity_and_divergence_behave(tiny_lm):
    natural = perplexity(tiny_lm, [SAFE[0]], ["x"])[0]
    assert natural > 1.0
    spec = SteeringSpec(torch.ones(tiny_lm.identity.hidden_size) * 3, 1, 1.0)
    assert next_token_divergence(tiny_lm, SAFE[:2], [SteeringSpec(spec.vector, 1, 0.0)]) == [0.0, 0.0]
    assert all(x > 0 for x in next_token_divergence(tiny_lm, SAFE[:2], [spec]))


@pytest.fixture(scope="module")
def tiny_category(tiny_lm):
    vectors = extract_vectors(tiny_lm, HARMFUL[:6], SAFE[:6], category="crime")
    return PolicyCategory("crime", HARMFUL[:6], SAFE[:6], vectors, layer=1, strength=2.0)


def test_sweep_measures_every_cell_caches_and_reports(tiny_lm, tiny_category, tmp_path):
    from dataclasses import replace

    # Every prompt steered (the papers' way), so each cell's measures see steering; gating has its own test.
    gate = tiny_category.gate
    tiny_category = replace(tiny_category, vectors=tiny_category.vectors.with_gate(gate.with_mode("always")))
    settings = SweepSettings(layers=(1, 2), strengths=(1.0, 4.0), max_new_tokens=8)
    seen = []
    result = evaluate(
        tiny_lm, tiny_category, HARMFUL, SAFE[:4], settings, progress=lambda f, d: seen.append(d), cache_dir=tmp_path
    )
    assert result.n_harmful == 2  # the six used for extraction are never evaluated on
    assert [(c.layer, c.strength) for c in result.cells] == [(1, 1.0), (1, 4.0), (2, 1.0), (2, 4.0)]
    assert result.baseline.benign_changed == 0.0 and result.baseline.benign_kl == 0.0
    assert all(c.perplexity > 0 and 0 <= c.benign_changed <= 1 for c in result.cells)
    assert max(c.benign_kl for c in result.cells) > 0
    assert result.recommended == recommend(result.baseline, result.cells)
    for cell in [result.baseline, *result.cells]:  # every answer carries every judge's verdict and reason
        assert len(cell.answers) == 2 + 4
        harmful = [a for a in cell.answers if a["kind"] == "harmful"]
        assert len(harmful) == 2 and all(
            set(a["verdicts"]) == {"degenerate", "off_topic", "refusal", "unsafe_attempt"} for a in harmful
        )
        assert all(v["reason"] for a in cell.answers for v in a["verdicts"].values())
        flagged = sum(a["verdicts"]["degenerate"]["flagged"] for a in harmful)
        assert cell.degenerate_rate == flagged / 2
    assert "response probe" in " ".join(result.judges)
    assert len(result.samples) == 2

    again = evaluate(
        tiny_lm, tiny_category, HARMFUL, SAFE[:4], settings, progress=lambda f, d: seen.append(d), cache_dir=tmp_path
    )
    assert seen[-1] == "loaded from cache" and again.to_dict() == result.to_dict()
    assert Evaluation.from_dict(result.to_dict()).to_dict() == result.to_dict()

    plots = write_plots(result, tmp_path / "plots")
    assert "tradeoff.png" in {p.name for p in plots} and all(p.stat().st_size > 1000 for p in plots)
    for plot in plots:  # a heatmap is drawn only where its rate moves: a flat plot says nothing
        if plot.name.startswith("heatmap_"):
            name = plot.stem.removeprefix("heatmap_")
            values = {c.measures[name] for c in [result.baseline, *result.cells]}
            assert len(values) > 1
    report = report_markdown(result, plots)
    assert "Recommended: layer" in report and "![tradeoff](tradeoff.png)" in report
    assert "95% Wilson intervals" in report


def test_sweep_can_be_stopped_and_refuses_bad_settings(tiny_lm, tiny_category, tmp_path):
    with pytest.raises(SafeSteerError, match="evaluation stopped"):
        evaluate(
            tiny_lm,
            tiny_category,
            HARMFUL,
            SAFE[:4],
            SweepSettings((1,), (1.0,), 4),
            should_stop=lambda: True,
            cache_dir=tmp_path,
        )
    with pytest.raises(SafeSteerError, match="out of range"):
        evaluate(tiny_lm, tiny_category, HARMFUL, SAFE, SweepSettings((9,)), cache_dir=tmp_path)
    with pytest.raises(SafeSteerError, match="at least 2 held-out harmful"):
        evaluate(tiny_lm, tiny_category, HARMFUL[:6], SAFE, SweepSettings((1,)), cache_dir=tmp_path)


def test_guided_vectors_from_labels(tiny_lm):
    prompts = HARMFUL + SAFE
    unsafe = [True] * 8 + [False] * 8
    vectors = guided_vectors(tiny_lm, prompts, unsafe, ExtractionSettings(), category="crime")
    assert vectors.settings.method == "guided" and vectors.vectors.shape == (4, 64)
    with pytest.raises(SafeSteerError, match="at least 4 responses judged unsafe"):
        guided_vectors(tiny_lm, prompts, [True] * 2 + [False] * 14, ExtractionSettings())


def test_evaluations_stored_with_fixed_fields_still_load():
    old_cell = {"layer": 1, "strength": 2.0, "refusal_rate": 0.5, "relevance": 0.4, "perplexity": 3.0}
    cell = Cell.from_dict({**old_cell, "benign_changed": 0.1, "benign_kl": 0.01, "unsafe_rate": None})
    assert cell.perplexity == 3.0 and cell.value("relevance") == 0.4 and cell.unsafe_rate is None
    with pytest.raises(SafeSteerError, match="no measure 'unsafe_rate'"):
        cell.value("unsafe_rate")


def test_a_new_measure_is_one_registration(tiny_lm, tiny_category, tmp_path, monkeypatch):
    """Registering a measure is all it takes for the sweep, the stored result and the report to carry it."""
    from safesteer import measures

    monkeypatch.setattr(measures, "MEASURES", dict(measures.MEASURES))
    measures.register(
        measures.Measure(
            "answer_words", "words per answer", False, lambda c: sum(len(a.split()) for a in c.harmful_answers) / 2
        )
    )
    measures.register(measures.Measure("steered", "steered at all", False, lambda c: float(bool(c.steering))))
    monkeypatch.setattr("safesteer.reports.MEASURES", measures.MEASURES)
    with pytest.raises(ValueError, match="already registered"):
        measures.register(measures.MEASURES["perplexity"])
    settings = SweepSettings(layers=(1,), strengths=(2.0,), max_new_tokens=6)
    result = evaluate(tiny_lm, tiny_category, HARMFUL, SAFE[:4], settings, cache_dir=tmp_path)
    assert result.baseline.answer_words > 0 and result.cells[0].answer_words > 0
    assert Evaluation.from_dict(result.to_dict()).cells[0].measures["answer_words"] == result.cells[0].answer_words
    assert "words per answer" in report_markdown(result)
    assert "heatmap_steered.png" in {p.name for p in write_plots(result, tmp_path / "plots")}


def test_a_gated_category_is_evaluated_with_gating_on(tiny_lm, tiny_category, tmp_path):
    from dataclasses import replace

    settings = SweepSettings(layers=(1,), strengths=(4.0,), max_new_tokens=8)
    gated = evaluate(tiny_lm, tiny_category, HARMFUL, SAFE[:4], settings, cache_dir=tmp_path)
    assert gated.gate is not None and set(gated.gate) >= {"catch_rate", "false_positive_rate", "layer"}
    assert len(gated.gate["fired_benign"]) == 4 and "**Gated**" in report_markdown(gated)
    # A gate that fires on nothing leaves every answer as it was: no drift, whatever the strength.
    gate = tiny_category.gate
    silent = replace(tiny_category, vectors=tiny_category.vectors.with_gate(gate.with_threshold(1e9)))
    quiet = evaluate(tiny_lm, silent, HARMFUL, SAFE[:4], settings, cache_dir=tmp_path)
    assert quiet.gate["catch_rate"] == 0.0 and quiet.cells[0].benign_changed == 0.0
    assert all(s["naive"] == s["steered"] for s in quiet.samples)
    long = [HARMFUL[0] + " Please answer in full detail, step by step, with every material and quantity." * 6]
    padded = evaluate(tiny_lm, silent, long + HARMFUL[1:], SAFE[:4], settings, cache_dir=tmp_path)
    assert padded.cells[0].benign_changed == 0.0  # the naive answers were padded as the cell's were
    assert [a["text"] for a in padded.cells[0].answers] == [a["text"] for a in padded.baseline.answers]
    always = replace(tiny_category, vectors=tiny_category.vectors.with_gate(gate.with_mode("always")))
    assert evaluate(tiny_lm, always, HARMFUL, SAFE[:4], settings, cache_dir=tmp_path).gate is None


def test_a_sweep_on_int4_gives_each_prompt_its_answer_alone(tiny_folder, tiny_category, tmp_path):
    """Batch invariance in the sweep: cells, prompts of other lengths and neighbours change no answer."""
    from dataclasses import replace

    from safesteer import generate, load_model
    from safesteer.int4 import int4_problem

    if int4_problem() is not None:
        pytest.skip(f"int4 kernel unavailable: {int4_problem()}")
    lm = load_model(str(tiny_folder), "int4", device="cpu")
    silent = replace(tiny_category, vectors=tiny_category.vectors.with_gate(tiny_category.gate.with_threshold(1e9)))
    everyday = [SAFE[0], SAFE[1] + " Answer in two sentences, please, and be specific.", SAFE[3]]
    settings = SweepSettings(layers=(1, 2), strengths=(2.0, 4.0), max_new_tokens=8)
    result = evaluate(lm, silent, HARMFUL, everyday, settings, cache_dir=tmp_path)
    assert all(cell.benign_changed == 0.0 for cell in result.cells)  # a gate that fired on nothing changed nothing
    answered = [a["text"] for a in result.baseline.answers if a["index"] < len(everyday) and a["kind"] != "harmful"]
    assert answered == [generate(lm, [p], max_new_tokens=8)[0] for p in everyday]


def test_a_sweep_answers_with_the_copy_that_serves():
    """The reader answers, gated or not: it is what previews and the server run, and what a gate learned to read."""
    from types import SimpleNamespace

    from safesteer.evaluation import _answering_model

    def copy(precision):
        return SimpleNamespace(identity=SimpleNamespace(precision=precision))

    nf4, int4 = copy("nf4"), copy("int4")
    assert _answering_model(nf4, int4) is int4
    assert _answering_model(nf4, None) is nf4  # no other copy given: nothing to switch to


def test_a_sweep_batches_cells_of_every_option_and_each_row_gets_its_own_cell(tiny_lm, tiny_category, tmp_path):
    """Cells differing in layer, strength and option share batches; each answer is what that cell alone gives."""
    from dataclasses import replace

    from safesteer.evaluation import SWEEP_ROWS
    from safesteer.generation import generate
    from safesteer.operations import LEGACY, SteeringOptions

    gate = tiny_category.gate
    always = replace(tiny_category, vectors=tiny_category.vectors.with_gate(gate.with_mode("always")))
    options = (LEGACY, SteeringOptions("generated", "clamp"), SteeringOptions("all", "norm", spread=2))
    settings = SweepSettings(layers=(1, 2), strengths=(2.0, 6.0), max_new_tokens=8, options=options)
    harmful, benign = HARMFUL[6:], SAFE[:3]
    result = evaluate(tiny_lm, always, HARMFUL, benign, settings, cache_dir=tmp_path, probe=False)
    assert len(result.cells) == 12 and result.option_sets() == list(options)
    assert len(harmful + benign) * 12 <= SWEEP_ROWS  # all twelve cells went through one generation
    for cell in result.cells:
        alone = generate(
            tiny_lm,
            harmful + benign,
            [always.steering_spec(cell.strength, cell.layer, cell.steering)],
            max_new_tokens=8,
        )
        assert [a["text"] for a in cell.answers] == alone, cell.label
    best = result.recommended_cell()
    assert best.steering.to_dict() == result.recommended["options"]
    assert best.label in report_markdown(result)
