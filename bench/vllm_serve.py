"""`safesteer serve` with SafeSteer's own engine and with vLLM: throughput and latency at 1, 8 and 32 clients.

Run with `make bench-vllm` (in .venv-vllm, where vLLM is installed). Starts the server in-process
on a free port, once per engine, with one gated policy made from the built-in examples, and sends
a mix of harmful and everyday requests (32 new tokens each) from 1, 8 and 32 concurrent clients
with the `openai` client. Then, on vLLM, the steering overhead: every request steered (the policy
always on) against every request plain (`base`). Writes docs/vllm.json.

Each engine runs what it runs best on a CPU: the own engine its int4 kernel, vLLM float32 weights
(vLLM's CPU backend has no int4 path for this model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db import PolicyStore
from safesteer import datasets, extract_vectors, load_model
from safesteer.models import model_location
from safesteer.operations import SteeringOptions
from safesteer.policy import PolicyCategory
from safesteer.threads import serial_main_thread
from safesteer.vectors import ExtractionSettings
from safesteer.vllm_engine import VllmBatcher
from server import ServeSettings, create_app
from tests.conftest import free_port, serving

DOCS = Path(__file__).resolve().parent.parent / "docs"
TOKENS = 32


def _store(lm, folder: Path) -> PolicyStore:
    """'Uses' (gated, as authors save it) and 'Always' (the same vectors steering every request)."""
    store = PolicyStore(f"sqlite:///{folder / 'bench.db'}")
    harmful = datasets.harmful_prompts("malicious-uses", limit=40, seed=1)
    safe = datasets.benign_prompts(limit=40, seed=1)
    settings = ExtractionSettings(method="mean-diff", gate_recipe="category")
    vectors = extract_vectors(lm, harmful, safe, settings, category="uses")
    options = SteeringOptions("all", "add")
    store.save_version("Uses", [PolicyCategory("uses", harmful, safe, vectors, 12, 4.0, options=options)])
    always = vectors.with_gate(vectors.gate.with_mode("always")) if vectors.gate is not None else vectors
    store.save_version("Always", [PolicyCategory("uses", harmful, safe, always, 12, 4.0, options=options)])
    return store


@contextmanager
def served_process(folder: Path) -> Iterator[str]:
    """`safesteer serve` (own engine, int4) in a process of its own over the bench's store, as a deployer runs it."""
    port = free_port()
    command = [sys.executable, "-m", "cli", "--db", f"sqlite:///{folder / 'bench.db'}", "serve", "--port", str(port)]
    command += ["--precision", "int4", "--max-batch", "32", "--max-queue", "256", "--timeout", "900"]
    root = Path(__file__).resolve().parent.parent
    server = subprocess.Popen(command, cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("safesteer serve did not start")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(60)


def _prompts() -> list[str]:
    """Harmful and held-out everyday requests, alternating: none of them made the policy."""
    harmful = datasets.harmful_prompts("malicious-uses", limit=56, seed=1)[40:]
    everyday = datasets.benign_prompts(limit=16, seed=7, part="heldout")
    return [p for pair in zip(harmful, everyday, strict=False) for p in pair]


def _load(url: str, clients: int, requests: int, models: list[str]) -> dict[str, float]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    prompts = _prompts()
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def ask(i: int) -> None:
        nonlocal tokens
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model=models[i % len(models)],
            messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
            max_tokens=TOKENS,
            temperature=0,
        )
        with lock:
            latencies.append(time.perf_counter() - started)
            tokens += reply.usage.completion_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(ask, range(requests)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "clients": clients,
        "requests": requests,
        "tokens_per_s": round(tokens / wall, 1),
        "p50_s": round(statistics.median(latencies), 2),
        "p95_s": round(latencies[max(0, int(0.95 * len(latencies)) - 1)], 2),
    }


def _mixed(url: str, model: str, seconds: float = 90.0, clients: int = 8, long_every: int = 4) -> dict[str, float]:
    """Short requests (4 tokens) among long ones (300): their latency busy, against the same request idle.

    Each client asks for a long answer every `long_every` requests. With 0 every request is short: their
    tail with nothing else to serve, which no treatment of the long requests can get below.
    """
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)
    prompts = _prompts()

    def ask(prompt: str, tokens: int) -> float:
        started = time.perf_counter()
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0
        )
        return time.perf_counter() - started

    for i in range(4):  # one-time work (the first steered start, the first pass of each kind) is not idle latency
        ask(prompts[i], 4)
    before = [ask(prompts[i], 4) for i in range(9)]
    short: list[float] = []
    long: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def loop(k: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            if long_every and (i + k) % long_every == 0:  # the clients out of step
                took = ask(prompts[(i + k) % len(prompts)], 300)
                with lock:
                    long.append(took)
            else:
                took = ask(prompts[(i + k) % len(prompts)], 4)
                with lock:
                    short.append(took)
            i += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(loop, range(clients)))
    # Timed again once the load has gone, so the idle latency spans the run as the p95 does (the
    # machine's speed drifts within minutes).
    after = [ask(prompts[i], 4) for i in range(9)]
    idle = statistics.median(before + after)
    short.sort()
    p95 = short[max(0, int(0.95 * len(short)) - 1)]
    return {
        "idle_short_s": round(idle, 3),
        "idle_before_after_s": [round(statistics.median(before), 3), round(statistics.median(after), 3)],
        "short_requests": len(short),
        "p50_short_s": round(statistics.median(short), 2),
        "p95_short_s": round(p95, 3),
        "ratio": round(p95 / idle, 2),
        "long_requests": len(long),  # what serving the short ones first costs the long ones
        "p50_long_s": round(statistics.median(long), 2) if long else None,
        "long_every": long_every,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--out", type=Path, default=DOCS / "vllm.json")
    parser.add_argument("--mixed", action="store_true", help="only the short-among-long latency test, both engines")
    parser.add_argument("--seconds", type=float, default=90.0, help="how long the mixed test runs")
    parser.add_argument(
        "--long-every",
        type=int,
        default=4,
        help="mixed test: each client's long requests, one in N (0: only short ones, the floor of their tail)",
    )
    parser.add_argument("--mixed-clients", type=int, default=8, help="mixed test: how many clients")
    parser.add_argument(
        "--process", action="store_true", help="run the own engine as `safesteer serve` in its own process"
    )
    parser.add_argument(
        "--no-fast-lane", action="store_true", help="own engine: every step decodes every row (`batching.FastLane` off)"
    )
    parser.add_argument(
        "--engines", default="own,vllm", help="which to run (own, vllm); the others' figures are kept from --out"
    )
    args = parser.parse_args()
    if args.long_every < 0 or args.mixed_clients < 1:
        parser.error("--long-every must be 0 or more, --mixed-clients 1 or more")
    counts = [int(c) for c in args.clients.split(",")]
    cores = serial_main_thread()  # as `safesteer serve` does: the batcher's worker computes
    fp32 = load_model(None, "fp32")
    int4 = load_model(None, "int4")
    folder = Path(tempfile.mkdtemp(prefix="safesteer-vllm-bench-"))
    store = _store(fp32, folder)
    mix = ["Uses@1", "base"]
    results: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {cores} threads",
        "new_tokens": TOKENS,
        "models": mix,
    }

    def vllm(lm, settings):
        return VllmBatcher(lm, Path(model_location(None)), max_queue=256)

    chosen = set(args.engines.split(","))
    out = args.out.with_name(args.out.stem + "-mixed.json") if args.mixed else args.out
    if chosen != {"own", "vllm"} and out.exists():
        results = {**json.loads(out.read_text()), **results}  # keep the engine not run this time
    engines = (("own", "safesteer (int4)", int4, None), ("vllm", "vllm (float32)", fp32, vllm))
    for key, name, lm, engine in engines:
        if key not in chosen:
            continue
        lane = not args.no_fast_lane
        settings = ServeSettings(
            max_queue=256, max_batch=32, timeout_s=900, max_tokens_limit=512, cores=cores, fast_lane=lane
        )
        app = create_app(lm, store, settings, base_name="base", engine=engine)
        place = served_process(folder) if args.process and engine is None else serving(app, start_s=600)
        with place as url:
            if args.mixed:
                variant = name
                if engine is None:  # the own engine's variants are kept side by side
                    variant += ", own process" if args.process else ""
                    variant += ", no fast lane" if args.no_fast_lane else ""
                if args.long_every == 0:
                    variant += ", short requests only"
                elif args.long_every != 4:
                    variant += f", one long request in {args.long_every}"
                variant += f", {args.mixed_clients} clients" if args.mixed_clients != 8 else ""
                measured = _mixed(
                    url, "Uses@1", seconds=args.seconds, clients=args.mixed_clients, long_every=args.long_every
                )
                results[variant] = {**measured, "seconds": args.seconds}
                results[variant]["own_process"] = bool(args.process and engine is None)
                results[variant]["fast_lane"] = engine is None and not args.no_fast_lane
                print(variant, results[variant], flush=True)
                continue
            _load(url, 1, 2, mix)  # warm-up
            rows = [_load(url, c, max(8, 2 * c), mix) for c in counts]
            if engine is not None:
                plain = _load(url, 8, 32, ["base"])
                steered = _load(url, 8, 32, ["Always@1"])
                results["vllm_steering_overhead"] = {
                    "base_tokens_per_s": plain["tokens_per_s"],
                    "steered_tokens_per_s": steered["tokens_per_s"],
                    "overhead": round(1 - steered["tokens_per_s"] / plain["tokens_per_s"], 3),
                }
        results[name] = rows
        for row in rows:
            print(name, row, flush=True)
    print(json.dumps(results.get("vllm_steering_overhead"), indent=2))
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
