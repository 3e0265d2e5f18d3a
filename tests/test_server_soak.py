"""A bounded soak of the policy server on loopback: timeouts, hang-ups, long and short requests mixed.

By default 20 seconds; `make soak` runs it for two minutes (`SAFESTEER_SOAK_S=120`) and prints
the figures. The server must keep answering, `/health` must tell the truth, and memory must stay flat.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter

import httpx
import psutil
import pytest

from db import PolicyStore
from server import ServeSettings, create_app
from tests.conftest import HARMFUL, SAFE, serving
from tests.policy_factory import category

SOAK_S = float(os.environ.get("SAFESTEER_SOAK_S", "20"))
CLIENTS = 6


@pytest.fixture(scope="module")
def soaked_server(tiny_lm, tmp_path_factory):
    store = PolicyStore(f"sqlite:///{tmp_path_factory.mktemp('soak') / 'p.db'}")
    store.save_version("P", [category("weapons", identity=tiny_lm.identity, strength=4.0)], author="ann")
    settings = ServeSettings(max_tokens_limit=400, max_wait_s=0.01, timeout_s=0.6, max_queue=32)
    app = create_app(tiny_lm, store, settings)
    with serving(app) as url:
        yield url, app


def _client_loop(url: str, seed: int, until: float, outcomes: Counter, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < until:
            kind = rng.choice(["short", "short", "long", "hang-up", "stream"])
            prompt = rng.choice(HARMFUL + SAFE)
            body = {"model": rng.choice(["P", "base"]), "messages": [{"role": "user", "content": prompt}]}
            try:
                if kind == "short":
                    status = client.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 4}).status_code
                elif kind == "long":  # usually past the server's 0.6 s limit: 504, and its rows stop
                    status = client.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 400}).status_code
                else:
                    streamed = {**body, "max_tokens": 300, "stream": True}
                    with client.stream("POST", f"{url}/v1/chat/completions", json=streamed) as response:
                        status = response.status_code
                        for _ in response.iter_lines():
                            if kind == "hang-up":
                                break  # the client goes away mid-stream
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            with lock:
                outcomes[f"{kind}:{status}"] += 1


def test_the_server_survives_a_mixed_soak(soaked_server):
    url, app = soaked_server
    process = psutil.Process()
    outcomes: Counter = Counter()
    lock = threading.Lock()
    until = time.monotonic() + SOAK_S
    threads = [
        threading.Thread(target=_client_loop, args=(url, seed, until, outcomes, lock)) for seed in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    time.sleep(SOAK_S / 3)
    rss_early = process.memory_info().rss
    for t in threads:
        t.join(SOAK_S + 120)
    rss_late = process.memory_info().rss
    health = httpx.get(f"{url}/health").json()
    after = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "P", "messages": [{"role": "user", "content": SAFE[0]}], "max_tokens": 4},
        timeout=30,
    )
    figures = {
        "seconds": SOAK_S,
        "outcomes": dict(sorted(outcomes.items())),
        "health": health,
        "rss_growth_mb": round((rss_late - rss_early) / 2**20, 1),
    }
    print(json.dumps(figures))
    unexpected = {k: v for k, v in outcomes.items() if k.split(":")[1] not in ("200", "504")}
    assert not unexpected, figures
    assert outcomes["short:200"] > 0 and any(k.startswith("long:504") for k in outcomes), figures
    assert after.status_code == 200 and health["status"] == "ok" and health["worker_restarts"] == 0, figures
    assert app.state.batcher.alive and rss_late - rss_early < 100 * 2**20, figures
