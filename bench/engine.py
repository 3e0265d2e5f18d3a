"""Speed of the core engine on the embedded model: extraction, steering overhead, side-by-side preview.

Run with `make bench`. Each figure is a median over repeats (with min-max); ratios compare
timings taken in the same run, since absolute times drift on shared machines. Writes
`bench/results/engine.json` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from timing import machine, summary, timed

from safesteer import SteeringSpec, datasets, extract_vectors, generate, generate_side_by_side, load_model
from safesteer.models import generation_precision
from safesteer.vectors import ExtractionSettings

PROMPT_VECTORS = ExtractionSettings(method="mean-diff")  # what these figures have always timed: prompt vectors

RESULTS = Path(__file__).parent / "results"


def naive_extraction(lm, prompts: list[str]) -> torch.Tensor:
    """What people write first: one forward per prompt with output_hidden_states, last token kept."""
    rows = []
    with torch.inference_mode():
        for prompt in prompts:
            batch = lm.encode([prompt])
            hidden = lm.model(**batch, output_hidden_states=True).hidden_states[1:]
            rows.append(torch.stack([h[0, -1].float() for h in hidden]))
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", default="nf4", help="the extraction model's precision")
    parser.add_argument(
        "--preview-precision", default=None, help="the generating model's (default: what the app previews with)"
    )
    parser.add_argument("--prompts", type=int, default=64, help="harmful and safe prompts each")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    lm = load_model(None, args.precision)
    harmful = datasets.harmful_prompts("malicious-uses", limit=args.prompts)
    safe = datasets.benign_prompts(limit=args.prompts)
    both = harmful + safe
    extract_vectors(lm, harmful[:8], safe[:8], PROMPT_VECTORS)  # warm-up

    ours, _ = timed(lambda: extract_vectors(lm, harmful, safe, PROMPT_VECTORS), args.repeats)
    loop, _ = timed(lambda: naive_extraction(lm, both), max(1, args.repeats - 1))

    vectors = extract_vectors(lm, harmful, safe, PROMPT_VECTORS)
    layer = vectors.recommended_layer
    spec = SteeringSpec(vectors.vector(layer), layer, 4.0)
    both_rows = SteeringSpec(spec.vector, layer, (0.0, 4.0))
    prompt = harmful[0]
    n = args.new_tokens
    previewer = load_model(None, args.preview_precision or generation_precision(args.precision))

    def run(model, prompts, specs, decoder="auto"):
        return lambda: generate(model, prompts, specs, max_new_tokens=n, fixed_length=True, decoder=decoder)

    runs = {
        "plain": run(previewer, [prompt], []),
        "steered": run(previewer, [prompt], [spec]),
        "side_by_side": run(previewer, [prompt, prompt], [both_rows]),
        "before_plain": run(lm, [prompt], [], decoder="transformers"),  # the extraction model through generate
    }
    for fn in runs.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # interleave, so drift hits all alike
        for name, fn in runs.items():
            samples.setdefault(name, []).append(timed(fn, 1)[0]["median"])
    gen = {k: summary(v) for k, v in samples.items()}
    generate_side_by_side(previewer, prompt, [spec], max_new_tokens=8)  # the public path works too

    report = {
        "machine": machine(),
        "model": lm.identity.to_dict(),
        "preview_model": previewer.identity.to_dict(),
        "extraction": {
            "prompts": len(both),
            "ours_s": ours,
            "naive_loop_s": loop,
            "speedup": loop["median"] / ours["median"],
        },
        "generation": {
            "new_tokens": n,
            **{f"{k}_s": v for k, v in gen.items()},
            "tokens_per_s_plain": n / gen["plain"]["median"],
            "steering_overhead": gen["steered"]["median"] / gen["plain"]["median"] - 1,
            "side_by_side_ratio": gen["side_by_side"]["median"] / gen["plain"]["median"],
            "tokens_per_s_before": n / gen["before_plain"]["median"],
            "speedup_vs_before": gen["before_plain"]["median"] / gen["plain"]["median"],
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps(report, indent=2))
    e, g = report["extraction"], report["generation"]
    print(f"| measure ({lm.identity.precision} extraction, {torch.get_num_threads()} threads) | value | target |")
    print("| --- | --- | --- |")
    print(
        f"| extraction, {e['prompts']} prompts x all layers | {e['ours_s']['median']:.2f} s "
        f"(naive loop {e['naive_loop_s']['median']:.2f} s) | |"
    )
    print(f"| extraction speed-up vs naive loop | {e['speedup']:.1f}x | >= 4x |")
    before = f"{lm.identity.precision} through transformers' generate"
    print(
        f"| unsteered generation ({previewer.identity.precision}, lean loop) | {g['tokens_per_s_plain']:.1f} tokens/s "
        f"({g['speedup_vs_before']:.1f}x the {g['tokens_per_s_before']:.1f} tokens/s of {before}) | |"
    )
    print(f"| steering overhead per token | {100 * g['steering_overhead']:+.1f}% | <= 5% |")
    print(f"| naive + steered in one batch vs one unsteered | {g['side_by_side_ratio']:.2f}x | <= 1.3x |")


if __name__ == "__main__":
    main()
