"""The policy server, launched on a free local port and called with the official `openai` client."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from db import PolicyStore
from safesteer.batching import Job, answer_alone
from server import ServeSettings, create_app
from tests.conftest import HARMFUL, SAFE, serving
from tests.policy_factory import category

KEY = "test-key-2"


@pytest.fixture(scope="module")
def served(tiny_lm, tmp_path_factory):
    store = PolicyStore(f"sqlite:///{tmp_path_factory.mktemp('serve') / 'p.db'}")
    identity = tiny_lm.identity
    store.save_version("alpha", [category("weapons", identity=identity, strength=4.0)], author="ann")
    store.save_version("beta", [category("fraud", seed=3, identity=identity, layer=2, strength=3.0)], author="ann")
    settings = ServeSettings(api_keys=("test-key-1", KEY), max_tokens_limit=64, max_wait_s=0.05, audit=True)
    app = create_app(tiny_lm, store, settings)
    with serving(app) as url:
        yield url, store, app


def _client(url, key=KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _expected(lm, store, policy, number, messages, max_tokens):
    version = store.load_version(policy, number)
    job = Job(messages, [c.steering_spec() for c in version.categories], [c.name for c in version.categories])
    job.max_new_tokens = max_tokens
    return answer_alone(lm, job)


def test_answers_say_which_version_answered(served, tiny_lm):
    url, store, _ = served
    messages = [{"role": "user", "content": HARMFUL[0]}]
    raw = _client(url).chat.completions.with_raw_response.create(model="alpha", messages=messages, max_tokens=12)
    answer = raw.parse()
    assert raw.headers["x-safesteer-version"] == "alpha@1" and answer.model == "alpha@1"
    assert answer.choices[0].message.content == _expected(tiny_lm, store, "alpha", 1, messages, 12)
    extra = answer.model_extra["safesteer"]
    assert (extra["policy"], extra["version"], extra["categories"]) == ("alpha", 1, {"weapons": "gated"})
    assert raw.headers["x-safesteer-fired"] == ",".join(extra["fired"])
    assert answer.usage.completion_tokens <= 12 and answer.usage.prompt_tokens > 0
    base = _client(url).chat.completions.create(model="base", messages=messages, max_tokens=12)
    assert base.choices[0].message.content == answer_alone(tiny_lm, Job(messages, max_new_tokens=12))
    assert base.model_extra["safesteer"]["policy"] is None
    audit = store.audit_log("alpha", limit=5)
    assert audit[0].action == "serve" and audit[0].version == 1 and "messages" not in audit[0].detail


def test_streaming_matches_the_whole_answer(served, tiny_lm):
    url, store, _ = served
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": SAFE[0]}]
    stream = _client(url).chat.completions.create(model="beta@1", messages=messages, max_tokens=16, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == _expected(tiny_lm, store, "beta", 1, messages, 16)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["safesteer"]["version"] == 1


def test_models_health_and_bad_requests(served):
    url, _, _ = served
    names = [m.id for m in _client(url).models.list()]
    assert names[0] == tiny_model_name(served) and {"alpha", "alpha@1", "beta", "beta@1"} <= set(names)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="no policy named 'nope'"):
        _client(url).chat.completions.create(model="nope", messages=messages)
    with pytest.raises(openai.NotFoundError, match="no version '9'"):
        _client(url).chat.completions.create(model="alpha@9", messages=messages)
    with pytest.raises(openai.BadRequestError, match="max_tokens is at most 64"):
        _client(url).chat.completions.create(model="alpha", messages=messages, max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="messages"):
        _client(url).chat.completions.create(model="alpha", messages=[])
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        _client(url, key="wrong").chat.completions.create(model="alpha", messages=messages)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    broken = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers=headers)
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    huge = httpx.post(f"{url}/v1/chat/completions", content=b"x" * (2 << 20), headers=headers)
    assert huge.status_code == 413 and "larger than" in huge.json()["error"]["message"]
    long_prompt = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(openai.BadRequestError, match="the limit is"):
        _client(url).chat.completions.create(model="alpha", messages=long_prompt)


def tiny_model_name(served) -> str:
    return served[2].state.resolver.base_name


def test_hot_swap_and_rollback_without_a_restart(served, tiny_lm):
    url, store, _ = served
    client = _client(url)
    messages = [{"role": "user", "content": HARMFUL[2]}]
    before = client.chat.completions.create(model="alpha", messages=messages, max_tokens=12)
    stronger = category("weapons", identity=tiny_lm.identity, strength=8.0)
    # A request in flight keeps the version it started with.
    stream = client.chat.completions.create(model="alpha", messages=messages, max_tokens=40, stream=True)
    first = next(iter(stream))
    number = store.save_version("alpha", [stronger], author="ann", note="stronger")
    rest = list(stream)
    assert first.model == f"alpha@{number - 1}" and rest[-1].model_extra["safesteer"]["version"] == number - 1
    after = client.chat.completions.create(model="alpha", messages=messages, max_tokens=12)
    assert after.model == f"alpha@{number}"
    assert after.choices[0].message.content == _expected(tiny_lm, store, "alpha", number, messages, 12)
    back = store.rollback("alpha", number - 1, actor="ann")
    rolled = client.chat.completions.create(model="alpha@latest", messages=messages, max_tokens=12)
    assert rolled.model == f"alpha@{back}" and rolled.choices[0].message.content == before.choices[0].message.content


def test_concurrent_clients_nothing_leaks_nothing_lost(served, tiny_lm):
    url, store, app = served
    prompts = [*HARMFUL, *SAFE]
    models = ["alpha@1", "beta@1", "base"]
    cases = [(prompts[i % len(prompts)], models[i % len(models)]) for i in range(24)]

    def expected(prompt, model):
        messages = [{"role": "user", "content": prompt}]
        if model == "base":
            return answer_alone(tiny_lm, Job(messages, max_new_tokens=10))
        policy, number = model.split("@")
        return _expected(tiny_lm, store, policy, int(number), messages, 10)

    want = [expected(p, m) for p, m in cases]
    batches_before = len(app.state.batcher.batches)

    def ask(case):
        prompt, model = case
        answer = _client(url).chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=10
        )
        return answer.choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(ask, cases))
    assert got == want
    assert max(list(app.state.batcher.batches)[batches_before:]) > 1  # answered together, not one by one


def test_a_full_queue_answers_429(tiny_lm, tmp_path):
    from fastapi.testclient import TestClient

    store = PolicyStore(f"sqlite:///{tmp_path / 'q.db'}")
    app = create_app(tiny_lm, store, ServeSettings(max_queue=1, max_batch=1, max_wait_s=0.0))
    body = {"model": "base", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 40}
    with TestClient(app) as client, ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(lambda _: client.post("/v1/chat/completions", json=body), range(6)))
    codes = [r.status_code for r in statuses]
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
    refused = next(r for r in statuses if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error" and json.dumps(refused.json())
    assert all(r.headers.get("retry-after", "").isdigit() for r in statuses if r.status_code == 429)


def test_serve_refuses_to_listen_beyond_localhost_without_keys(monkeypatch, capsys):
    from cli import main

    monkeypatch.delenv("SAFESTEER_API_KEYS", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "set SAFESTEER_API_KEYS" in capsys.readouterr().err
