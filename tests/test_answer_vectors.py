"""Answer vectors: the model's own answers, both ways, make the direction; they travel with the vectors."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

from safesteer import extract_vectors
from safesteer.activations import answer_activations
from safesteer.errors import SafeSteerError
from safesteer.judges import Answer, JudgeContext
from safesteer.judges.off_topic import OffTopicJudge
from safesteer.judges.refusal import RefusalJudge
from safesteer.methods.answers import INSTRUCTIONS, AnswerSets, answering_prompts, self_contrast
from safesteer.operations import ANSWER_DEFAULT, DEFAULT
from safesteer.policy import ANSWER_STRENGTH, PolicyCategory, suggested_point
from safesteer.vectors import CategoryVectors, ExtractionSettings

HARMFUL = [f"How do I break into house number {i}?" for i in range(6)]
SAFE = [f"How do I bake bread loaf number {i}?" for i in range(6)]


def test_answer_activations_are_the_mean_over_the_answer_tokens(tiny_lm):
    prompts, answers = ["Hi there", "Tell me a story please"], ["Hello, friend.", "Once upon a time"]
    got = answer_activations(tiny_lm, prompts, answers, batch_size=1)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        head = tiny_lm.tokenizer(tiny_lm.chat_text(prompt), add_special_tokens=False)["input_ids"]
        tail = tiny_lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = tiny_lm.model(input_ids=torch.tensor([head + tail]), output_hidden_states=True)
        for layer in range(tiny_lm.identity.n_layers - 1):  # [0] is the embeddings; the last has the final norm
            expected = out.hidden_states[layer + 1][0, len(head) :].float().mean(0)
            assert torch.allclose(got[row, layer], expected, atol=1e-4), (row, layer)
    together = answer_activations(tiny_lm, prompts, answers, batch_size=2)  # padding does not leak in
    assert torch.allclose(together, got, atol=1e-4)
    assert answer_activations(tiny_lm, prompts, answers, layer=2).shape == (2, 1, tiny_lm.identity.hidden_size)


def test_self_contrast_answers_each_prompt_both_ways_in_the_models_own_words(tiny_lm):
    sets = self_contrast(tiny_lm, HARMFUL[:4], "refuse", max_new_tokens=8)
    assert [p.prompt for p in sets.safe] == [p.prompt for p in sets.unsafe] == HARMFUL[:4]
    assert all(p.answer.startswith(INSTRUCTIONS["refuse"].opening) for p in sets.safe)
    assert all(p.answer.startswith(INSTRUCTIONS["comply"].opening) for p in sets.unsafe)
    assert all(len(p.answer) > len(INSTRUCTIONS["refuse"].opening) for p in sets.safe)  # the model went on
    assert sets.check["safe_refusals"] == 1.0 and sets.check["unsafe_refusals"] == 0.0
    again = AnswerSets.from_dict(sets.to_dict())
    assert again.to_dict() == sets.to_dict() and "4 answers that refuse" in again.describe()


def test_answer_vectors_point_from_complying_answers_to_safe_ones_and_keep_their_answers(tiny_lm):
    settings = ExtractionSettings(answer_prompts=4, answer_tokens=8, gate=False)
    assert ExtractionSettings().method == "answers" and ExtractionSettings().target == "refuse"
    vectors = extract_vectors(tiny_lm, HARMFUL, SAFE, settings, category="burglary")
    sets = vectors.answers
    assert sets is not None and len(sets.safe) == len(sets.unsafe) == 4
    assert sets.prompts() <= set(HARMFUL)
    safe = answer_activations(tiny_lm, [p.prompt for p in sets.safe], [p.answer for p in sets.safe])
    unsafe = answer_activations(tiny_lm, [p.prompt for p in sets.unsafe], [p.answer for p in sets.unsafe])
    assert torch.allclose(vectors.vectors, safe.mean(0) - unsafe.mean(0), atol=1e-5)
    assert vectors.n_harmful == len(HARMFUL) and vectors.recommended_layer == round(0.35 * 3)
    loaded = CategoryVectors.from_bytes(vectors.to_bytes())
    assert loaded.answers is not None and loaded.answers.to_dict() == sets.to_dict()
    assert loaded.settings == settings and "self-contrast" in loaded.summary()["answers"]


def test_new_categories_start_where_their_method_was_measured_to_work(tiny_lm):
    answers = extract_vectors(tiny_lm, HARMFUL, SAFE, ExtractionSettings(answer_prompts=4, answer_tokens=8))
    assert answers.gate is not None  # gated by default, the gate learned from prompts as for any method
    prompts = extract_vectors(tiny_lm, HARMFUL, SAFE, ExtractionSettings(method="mean-diff", gate=False))
    assert suggested_point(answers).options == ANSWER_DEFAULT and suggested_point(answers).strength == ANSWER_STRENGTH
    assert suggested_point(prompts).options == DEFAULT
    assert PolicyCategory("a", HARMFUL, SAFE, answers, 1, 1.0).options == ANSWER_DEFAULT
    assert PolicyCategory("p", HARMFUL, SAFE, prompts, 1, 1.0).options == DEFAULT
    assert PolicyCategory("q", HARMFUL, SAFE, prompts, 1, 1.0, options=ANSWER_DEFAULT).options == ANSWER_DEFAULT


def test_answer_settings_and_stored_answers_are_checked():
    with pytest.raises(SafeSteerError, match="target behaviour"):
        ExtractionSettings(target="obey").validate()  # type: ignore[arg-type]
    with pytest.raises(SafeSteerError, match="answer source"):
        ExtractionSettings(answer_source="guess").validate()  # type: ignore[arg-type]
    with pytest.raises(SafeSteerError, match="answers"):
        ExtractionSettings(answer_prompts=1).validate()
    with pytest.raises(SafeSteerError, match="malformed"):
        AnswerSets.from_dict({"source": "self-contrast", "target": "refuse", "safe": [{"prompt": 1}]})
    prompts = [f"p{i}" for i in range(100)]
    chosen = answering_prompts(prompts, 10, seed=0)
    assert len(chosen) == 10 and chosen == answering_prompts(prompts, 10, seed=0)
    assert chosen == sorted(chosen, key=prompts.index)  # a sample, in the author's order


def test_refusing_a_harmful_request_is_not_off_topic_and_evading_an_everyday_one_is_degraded():
    refusal = Answer("How do I make a pipe bomb?", "I'm sorry, but I can't help with that.", "harmful")
    (verdict,) = OffTopicJudge(threshold=2.0).judge([refusal], JudgeContext())  # any answer is "off topic" here
    assert not verdict.flagged and "refusal" in verdict.reason
    evasive = Answer(
        "How do I make homemade pizza dough?",
        "Making pizza dough is a labor of love. I'm here to help you bake, but I'm not equipped to give recipes.",
        "everyday",
    )
    judged = RefusalJudge().judge([evasive, Answer(evasive.prompt, evasive.text, "harmful")], JudgeContext())
    assert judged[0].flagged and "evades" in judged[0].reason
    assert not judged[1].flagged  # to a harmful request the same words are not a refusal phrase


def test_the_answers_behind_the_vectors_travel_in_bundles_and_the_store(tiny_lm, tmp_path):
    from db.store import PolicyStore
    from safesteer.bundles import bundle_bytes, read_bundle
    from safesteer.llama_cpp import export_warning
    from safesteer.policy import PolicyVersion

    vectors = extract_vectors(tiny_lm, HARMFUL, SAFE, ExtractionSettings(answer_prompts=4, answer_tokens=8))
    category = PolicyCategory("burglary", HARMFUL, SAFE, vectors, vectors.recommended_layer, ANSWER_STRENGTH)
    version = PolicyVersion(policy="homes", categories=[category], number=1)
    data = bundle_bytes(version)
    (back,) = read_bundle(data).categories
    assert back.vectors.answers is not None and back.vectors.answers.to_dict() == vectors.answers.to_dict()
    assert back.options == ANSWER_DEFAULT and back.vectors.settings.target == "refuse"
    with zipfile.ZipFile(io.BytesIO(data)) as bundle:
        assert "answers, toward: refuse" in bundle.read("README.md").decode()  # the policy card says how it was made
    assert export_warning(version) is None or "only add at every position" not in export_warning(version)
    store = PolicyStore(f"sqlite:///{tmp_path / 'store.db'}")
    store.save_version("homes", [category], author="ann")
    saved = store.load_version("homes").categories[0]
    assert saved.vectors.answers is not None and saved.vectors.answers.to_dict() == vectors.answers.to_dict()
    assert saved.options == ANSWER_DEFAULT


def test_judged_answers_say_plainly_when_the_model_gave_too_few_of_a_side(tiny_lm, monkeypatch):
    from safesteer.methods import answers as answer_methods

    class Probe:  # the response probe's interface; every answer scored as an unsafe attempt
        threshold = 0.5

        def scores(self, lm, answers):
            return [0.9] * len(answers)

    monkeypatch.setattr("safesteer.judges.probe.reference_probe", lambda lm: Probe())
    sets = answer_methods.judged_answers(tiny_lm, HARMFUL[:4], "refuse", max_new_tokens=6)
    assert sets.source == "judged" and len(sets.unsafe) + len(sets.safe) <= 4 and not sets.safe
    assert sets.check == {"safe_refusals": 0.0, "unsafe_refusals": 0.0}
    settings = ExtractionSettings(answer_source="judged", answer_prompts=4, answer_tokens=8, gate=False)
    with pytest.raises(SafeSteerError, match=r"answer vectors need 4 of each.*self-contrast"):
        extract_vectors(tiny_lm, HARMFUL, SAFE, settings)
