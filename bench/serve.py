"""Throughput of `safesteer serve` on the embedded model: 8 concurrent clients vs the same requests one at a time.

Run with `make bench-serve`. Starts the server in-process on a free port with a gated policy made
from the built-in examples, then sends the same requests (mixed: the policy, its older version,
the bare model) first one at a time, then from 8 concurrent clients, with the official `openai`
client. Reports completion tokens per second, the ratio, p50/p95 latency, and whether every answer
was identical in both runs (greedy decoding: it must be). Writes docs/serving.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
import uvicorn

from db import PolicyStore
from safesteer import datasets, extract_vectors, load_model
from safesteer.models import generation_precision
from safesteer.policy import PolicyCategory
from safesteer.threads import serial_main_thread
from safesteer.vectors import ExtractionSettings
from server import ServeSettings, create_app

PROMPT_VECTORS = ExtractionSettings(method="mean-diff")  # what these figures have always timed: prompt vectors

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--precision", default=None, help="the serving model's (default: what `generate` uses here)")
    parser.add_argument("--out", type=Path, default=DOCS / "serving.json")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cores = serial_main_thread()  # as `safesteer serve` does: the batcher's worker computes

    lm = load_model(None, args.precision or generation_precision("nf4"))
    harmful = datasets.harmful_prompts("malicious-uses")
    vectors = extract_vectors(lm, harmful[:48], datasets.benign_prompts(limit=96), PROMPT_VECTORS, "malicious-uses")
    layer = vectors.recommended_layer
    store = PolicyStore(f"sqlite:///{tempfile.mkdtemp()}/serve.db")
    safe = datasets.benign_prompts(limit=96)
    for strength in (2.0, 4.0):
        category = PolicyCategory("malicious-uses", harmful[:48], safe, vectors, layer, strength)
        store.save_version("safety", [category], author="bench")
    app = create_app(lm, store, ServeSettings(max_tokens_limit=args.max_tokens, max_batch=args.clients, cores=cores))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=600)

    prompts = harmful[48:] + datasets.benign_prompts(part="heldout")
    models = ["safety", "safety@1", "base"]
    cases = [(prompts[(i * 7) % len(prompts)], models[i % len(models)]) for i in range(args.requests)]

    def ask(case: tuple[str, str]) -> tuple[str, int, float]:
        started = time.perf_counter()
        answer = client.chat.completions.create(
            model=case[1], messages=[{"role": "user", "content": case[0]}], max_tokens=args.max_tokens
        )
        assert answer.usage is not None
        return answer.choices[0].message.content or "", answer.usage.completion_tokens, time.perf_counter() - started

    ask(cases[0])  # warm-up
    runs = {}
    for label, workers in (("one_at_a_time", 1), ("concurrent", args.clients)):
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(ask, cases))
        wall = time.perf_counter() - started
        latencies = sorted(r[2] for r in results)
        runs[label] = {
            "texts": [r[0] for r in results],
            "wall_s": round(wall, 2),
            "completion_tokens": sum(r[1] for r in results),
            "tokens_per_s": round(sum(r[1] for r in results) / wall, 1),
            "latency_p50_s": round(statistics.median(latencies), 2),
            "latency_p95_s": round(latencies[max(0, round(0.95 * len(latencies)) - 1)], 2),
        }
    server.should_exit = True
    batches = app.state.batcher.batches
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": cores},
        "model": lm.identity.describe(),
        "precision": lm.identity.precision,
        "requests": args.requests,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "one_at_a_time": {k: v for k, v in runs["one_at_a_time"].items() if k != "texts"},
        "concurrent": {k: v for k, v in runs["concurrent"].items() if k != "texts"},
        "throughput_ratio": round(runs["concurrent"]["tokens_per_s"] / runs["one_at_a_time"]["tokens_per_s"], 2),
        "identical_answers": runs["concurrent"]["texts"] == runs["one_at_a_time"]["texts"],
        "identical_share": round(
            statistics.fmean(
                a == b for a, b in zip(runs["concurrent"]["texts"], runs["one_at_a_time"]["texts"], strict=True)
            ),
            3,
        ),
        "largest_batch": max(batches),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
