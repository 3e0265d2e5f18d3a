"""Speed of the embedded int4 model's bfloat16 copies: prompt passes against the 4-bit kernel, and
the head's products against the int8 kernel in decoding steps; and padded passes whose MLPs skip
the padding against passes computing it.

Run with `make bench-prompts`. Both ways run in the same process, interleaved, so drift on a shared
machine hits them alike; each figure is a median over repeats (with min-max). Writes
`bench/results/prompt_passes.json` and prints three Markdown tables (docs/serving.md, "Prompt passes
that read less").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from timing import machine, summary

from safesteer import datasets, load_model, prompt_passes
from safesteer.activations import record_activations
from safesteer.compat import key_value_cache
from safesteer.decoding import RunningBatch
from safesteer.int4 import Int4Linear, keep_prompt_weights
from safesteer.models import LoadedModel
from safesteer.prompt_passes import new_cache, prompt_pass, right_padded, template_start

RESULTS = Path(__file__).parent / "results"


@contextlib.contextmanager
def four_bit_prompts(lm: LoadedModel) -> Iterator[None]:
    """Prompt passes through the 4-bit kernel, as before the model kept bfloat16 prompt weights."""
    layers = [m for m in lm.model.modules() if isinstance(m, Int4Linear)]
    kept = [layer.prompt_weight for layer in layers]
    for layer in layers:
        layer.prompt_weight = None
    try:
        yield
    finally:
        for layer, weight in zip(layers, kept, strict=True):
            layer.prompt_weight = weight


@contextlib.contextmanager
def int8_head(lm: LoadedModel) -> Iterator[None]:
    """The head's products through the int8 kernel, as before it kept bfloat16 weights."""
    head = lm.model.get_output_embeddings()
    kept, head.product_weight = head.product_weight, None
    try:
        yield
    finally:
        head.product_weight = kept


@contextlib.contextmanager
def padding_computed() -> Iterator[None]:
    """Padded passes compute their padding in every product, as before their MLPs were packed."""
    kept, prompt_passes.PACK_MIN_ROWS = prompt_passes.PACK_MIN_ROWS, 1 << 30
    try:
        yield
    finally:
        prompt_passes.PACK_MIN_ROWS = kept


def running(lm: LoadedModel, rows: list[torch.Tensor], cohorts: int, tokens: int) -> RunningBatch:
    """A running batch of `rows` in `cohorts` admissions, `tokens` into their answers (a busy server's)."""
    batch = RunningBatch(lm, eos_token_ids=[], suppress_eos=True)
    size = len(rows) // cohorts
    for c in range(cohorts):
        part = rows[c * size : (c + 1) * size]
        batch.admit(part, [], owners=list(range(c * size, (c + 1) * size)), max_new_tokens=[10_000] * len(part))
    for _ in range(tokens):
        batch.step()
    return batch


def after_start(lm: LoadedModel, rows: list[torch.Tensor]) -> Callable[[], object]:
    """One padded pass over `rows` after the template start taken from its cache (the server's path)."""
    start = template_start(lm)
    entry = start.keys_values([])

    def run() -> object:
        cache = key_value_cache(lm.model.config, entry.keys, entry.values, len(rows))
        rests = [row[start.length :] for row in rows]
        return prompt_pass(lm, right_padded(rests), [int(row.shape[0]) for row in rows], start.length, cache)

    return run


def whole(lm: LoadedModel, row: torch.Tensor) -> Callable[[], object]:
    return lambda: prompt_pass(lm, row[None], [int(row.shape[0])], 0, new_cache(lm))


def _ms(seconds: dict[str, float], digits: int) -> str:
    """A timing summary as a table cell: the median in ms, with min-max."""
    low, middle, high = (f"{1000 * seconds[k]:.{digits}f}" for k in ("min", "median", "max"))
    return f"{middle} ms ({low}-{high})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    lm = load_model(None, "int4", device="cpu")
    layers = [m for m in lm.model.modules() if isinstance(m, Int4Linear)]
    head = lm.model.get_output_embeddings()
    if any(layer.prompt_weight is None for layer in layers) or head.product_weight is None:
        raise SystemExit("this machine keeps no bfloat16 copies (see int4.rows_computed_alone)")
    started = time.perf_counter()
    with four_bit_prompts(lm), int8_head(lm):
        keep_prompt_weights(lm.model)  # what loading adds, timed on its own
    decode_s = time.perf_counter() - started
    if not template_start(lm).exact():
        raise SystemExit("split prompt passes are not exact here; the server reads whole prompts")

    encode = lambda text: lm.encode([text])["input_ids"][0]  # noqa: E731
    short = [encode(p) for p in datasets.harmful_prompts("malicious-uses", limit=56, seed=1)[40:46]]
    one = min(short, key=lambda row: abs(int(row.shape[0]) - 44))
    long = [" ".join(datasets.harmful_prompts("malicious-uses", limit=64, seed=s)[:10]) for s in range(16)]
    work = {
        "one prompt, whole": whole(lm, one),
        "one prompt, after the cached start": after_start(lm, [one]),
        "six prompts, one padded pass after the start": after_start(lm, short),
        "16 long prompts, recorded at every layer": lambda: record_activations(lm, long),
    }
    samples: dict[str, dict[str, list[float]]] = {name: {"bf16": [], "int4": []} for name in work}
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):  # the first round warms up and is not kept
            for name, fn in work.items():
                for way in ("bf16", "int4"):
                    with four_bit_prompts(lm) if way == "int4" else contextlib.nullcontext():
                        begun = time.perf_counter()
                        fn()
                        took = time.perf_counter() - begun
                    if repeat:
                        samples[name][way].append(took)

    chat = [lm.encode([[{"role": "user", "content": p}]])["input_ids"][0] for p in datasets.benign_prompts(limit=14)]
    steps = {
        "1 row": running(lm, chat[:1], 1, 100).step,
        "2 rows (a preview: naive and steered)": running(lm, chat[:2], 1, 100).step,
        "6 rows": running(lm, chat[:6], 1, 20).step,
        "8 rows in 4 cohorts, 150 tokens in": running(lm, chat[:8], 4, 150).step,
        "14 rows in 7 cohorts, 150 tokens in": running(lm, chat[:14], 7, 150).step,
    }
    step_samples: dict[str, dict[str, list[float]]] = {name: {"bf16": [], "int8": []} for name in steps}
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):
            for name, step in steps.items():
                for way in ("bf16", "int8"):
                    with int8_head(lm) if way == "int8" else contextlib.nullcontext():
                        took = []
                        for _ in range(5):  # one step is short: the median of five
                            begun = time.perf_counter()
                            step()
                            took.append(time.perf_counter() - begun)
                    if repeat:
                        step_samples[name][way].append(sorted(took)[2])

    harmful = [encode(p) for p in datasets.harmful_prompts("malicious-uses", limit=64, seed=1)[40:64]]
    burst_prompts = {f"{n} prompts": harmful[8 * i : 8 * i + n] for i, n in enumerate((2, 6, 8))}
    bursts = {name: after_start(lm, rows) for name, rows in burst_prompts.items()}
    pack_samples: dict[str, dict[str, list[float]]] = {name: {"packed": [], "padded": []} for name in bursts}
    with torch.inference_mode():
        for repeat in range(2 * args.repeats + 1):
            for name, fn in bursts.items():
                for way in ("packed", "padded"):
                    with padding_computed() if way == "padded" else contextlib.nullcontext():
                        begun = time.perf_counter()
                        fn()
                        took = time.perf_counter() - begun
                    if repeat:
                        pack_samples[name][way].append(took)
    rests = {name: [int(r.shape[0]) - template_start(lm).length for r in rows] for name, rows in burst_prompts.items()}

    tokens = {
        "one prompt, whole": int(one.shape[0]),
        "one prompt, after the cached start": int(one.shape[0]) - template_start(lm).length,
        "six prompts, one padded pass after the start": sum(int(r.shape[0]) - template_start(lm).length for r in short),
        "16 long prompts, recorded at every layer": sum(int(encode(p).shape[0]) for p in long),
    }
    report = {
        "machine": machine(),
        "model": lm.identity.to_dict(),
        "decoding_prompt_weights_s": round(decode_s, 3),
        "prompt_weight_bytes": sum(2 * m.in_features * m.out_features for m in layers),
        "passes": {
            name: {"tokens": tokens[name], **{way: summary(values) for way, values in ways.items()}}
            for name, ways in samples.items()
        },
        "head_weight_bytes": 2 * head.in_features * head.out_features,
        "decoding_steps": {
            name: {way: summary(values) for way, values in ways.items()} for name, ways in step_samples.items()
        },
        "packed_mlps": {
            name: {
                "padded_rows": len(rests[name]) * max(rests[name]),
                "real_rows": sum(rests[name]),
                **{way: summary(values) for way, values in ways.items()},
            }
            for name, ways in pack_samples.items()
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prompt_passes.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"| pass (embedded int4, {torch.get_num_threads()} threads) | tokens | 4-bit kernel | bfloat16 prompt weights |"
    )
    print("| --- | --- | --- | --- |")
    for name, row in report["passes"].items():
        print(f"| {name} | {row['tokens']} | {_ms(row['int4'], 0)} | {_ms(row['bf16'], 0)} |")
    kept_gb = (report["prompt_weight_bytes"] + report["head_weight_bytes"]) / 1e9
    print(f"decoding the bfloat16 copies at load: {decode_s:.2f} s, {kept_gb:.2f} GB")
    print()
    print(f"| decoding step (embedded int4, {torch.get_num_threads()} threads) | int8 head | bfloat16 head |")
    print("| --- | --- | --- |")
    for name, row in report["decoding_steps"].items():
        print(f"| {name} | {_ms(row['int8'], 1)} | {_ms(row['bf16'], 1)} |")
    print()
    print("| padded pass after the start | rows (real) | padding computed | MLPs packed |")
    print("| --- | --- | --- | --- |")
    for name, row in report["packed_mlps"].items():
        rows = f"{row['padded_rows']} ({row['real_rows']})"
        print(f"| {name} | {rows} | {_ms(row['padded'], 0)} | {_ms(row['packed'], 0)} |")


if __name__ == "__main__":
    main()
