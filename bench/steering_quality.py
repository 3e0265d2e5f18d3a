"""Which way of applying a category vector keeps answers fluent: every option, measured by the judges.

Two steps, on two disjoint sets of held-out harmful prompts, so the option is not chosen on the
prompts it is reported on:

- `choose`: a sweep of every option (where x how, spread, the attention site, pruned vectors) at a
  few layers and strengths on set A: StrongREJECT prompts (another source than the vectors'
  Do-Not-Answer examples, and none of those in the judges' reference set), with everyday and
  edgy-benign prompts. Writes `docs/steering-quality/choose.json`, the frontier plot, and the
  best cell of each option.
- `confirm`: naive, the papers' operation at its own best point, and the chosen option at its best
  point, answered on set B (other StrongREJECT prompts) and judged; plus a shuffled sample of
  answers to read blind (`blind.jsonl`, prompt and answer only) and its provenance kept apart.

The embedded model, int4 on a CPU (the copy previews and the server answer with), greedy decoding,
vectors from the built-in malicious-uses examples (Do-Not-Answer), gates off: what steering does
to a prompt once it is steered.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from builtin import builtin_category

from safesteer import datasets, load_model
from safesteer.evaluation import Cell, Evaluation, SweepSettings, evaluate
from safesteer.judges import Judgement
from safesteer.judges.reference import judged_label, load_reference
from safesteer.metrics import wilson_interval
from safesteer.operations import SteeringOptions
from safesteer.policy import PolicyCategory
from safesteer.recommendation import frontier, harmful_degradation, recommend
from safesteer.reports import write_plots
from safesteer.vectors import ExtractionSettings

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "steering-quality"
LAYERS = (12, 18)
STRENGTHS = (2.0, 4.0, 8.0)
RESIDUAL_OPTIONS = (
    SteeringOptions("all", "add"),
    SteeringOptions("generated", "add"),
    SteeringOptions("prompt", "add"),
    SteeringOptions("all", "norm"),
    SteeringOptions("all", "clamp"),
    SteeringOptions("generated", "clamp"),
    SteeringOptions("all", "add", spread=3),
)
VARIANTS: dict[str, tuple[ExtractionSettings, tuple[SteeringOptions, ...]]] = {
    "residual": (ExtractionSettings(method="mean-diff", gate=False), RESIDUAL_OPTIONS),
    "attention": (
        ExtractionSettings(method="mean-diff", site="attention", gate=False),
        (SteeringOptions("all", "add"), SteeringOptions("all", "clamp")),
    ),
    "pruned": (
        ExtractionSettings(method="pruned", gate=False),
        (SteeringOptions("all", "add"),),
    ),
}


def prompt_sets() -> tuple[list[str], list[str], list[str]]:
    """(set A, set B, everyday + edgy): StrongREJECT prompts outside the judges' reference set, split in two."""
    seen = {r.prompt for r in load_reference()}
    pool = [p for p in datasets.harmful_prompts("strongreject") if p not in seen]
    random.Random(21).shuffle(pool)
    everyday = datasets.benign_prompts(part="heldout", limit=8, seed=3) + datasets.edgy_benign_prompts(4, seed=3)
    return pool[:24], pool[24:44], everyday


def _category(extractor: Any, gate_lm: Any, settings: ExtractionSettings) -> PolicyCategory:
    return builtin_category(extractor, settings, layer=LAYERS[0], strength=STRENGTHS[0])


def _row(variant: str, cell: Cell, n_harmful: int, n_everyday: int) -> dict[str, Any]:
    m = cell.measures
    return {
        "variant": variant,
        "options": cell.steering.to_dict(),
        "label": cell.label,
        "layer": cell.layer,
        "strength": cell.strength,
        **{k: m.get(k) for k in ("unsafe_attempt_rate", "degenerate_rate", "off_topic_rate", "refusal_rate")},
        "safe_on_topic_rate": safe_on_topic(cell),
        "everyday_degraded": m.get("everyday_degraded"),
        "n_harmful": n_harmful,
        "n_everyday": n_everyday,
    }


def safe_on_topic(cell: Cell) -> float:
    """Harmful answers no judge flagged: not an unsafe attempt, not degenerate, off-topic or a refusal."""
    harmful = [a for a in cell.answers if a["kind"] == "harmful"]
    clean = [a for a in harmful if not any(v.get("flagged") for v in a["verdicts"].values())]
    return len(clean) / len(harmful) if harmful else 0.0


def choose(args: argparse.Namespace) -> None:
    set_a, _, everyday = prompt_sets()
    extractor, lm = load_model(None, "nf4"), load_model(None, "int4")
    rows, evaluations = [], {}
    started = time.perf_counter()
    for variant, (settings, options) in VARIANTS.items():
        category = _category(extractor, lm, settings)
        sweep = SweepSettings(LAYERS, STRENGTHS, args.new_tokens, options)
        result = evaluate(lm, category, set_a, everyday, sweep, reader=lm, cache_dir=ROOT / ".cache" / "quality")
        evaluations[variant] = result
        rows += [_row(variant, c, result.n_harmful, result.n_benign) for c in result.cells]
        print(f"{variant}: {len(result.cells)} cells, {time.perf_counter() - started:.0f} s", flush=True)
    base = evaluations["residual"].baseline
    winners = {variant: r.recommended_cell() for variant, r in evaluations.items()}
    overall = recommend(base, list(winners.values()))
    best_variant = next(
        v
        for v, c in winners.items()
        if (c.layer, c.strength, c.steering.to_dict()) == (overall["layer"], overall["strength"], overall["options"])
    )
    OUT.mkdir(parents=True, exist_ok=True)
    for variant, result in evaluations.items():
        write_plots(result, OUT / "choose" / variant)
    frontiers = {
        f"{variant}: {o.label()}": frontier([c for c in r.cells if c.steering == o])
        for variant, r in evaluations.items()
        for o in r.option_sets()
    }
    _frontier_plot(base, frontiers, OUT / "frontier.png")
    (OUT / "choose.json").write_text(
        json.dumps(
            {
                "set": "A",
                "n_harmful": len(set_a),
                "n_everyday": len(everyday),
                "new_tokens": args.new_tokens,
                "layers": LAYERS,
                "strengths": STRENGTHS,
                "baseline": _row("none", base, len(set_a), len(everyday)),
                "cells": rows,
                "best_per_variant": {v: _row(v, c, len(set_a), len(everyday)) for v, c in winners.items()},
                "recommended": {**overall, "variant": best_variant},
                "frontiers": {name: [c.label for c in line] for name, line in frontiers.items()},
                "seconds": round(time.perf_counter() - started),
            },
            indent=2,
        )
        + "\n"
    )
    for variant, result in evaluations.items():
        (OUT / "choose" / variant / "evaluation.json").write_text(json.dumps(result.to_dict()) + "\n")
    print(json.dumps({**overall, "variant": best_variant}, indent=2))


def _frontier_plot(base: Cell, frontiers: dict[str, list[Cell]], path: Path) -> None:
    """One curve per option (and vector variant): the best unsafe-attempt rate at each degradation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.5), dpi=100)
    x0, y0 = harmful_degradation(base), base.value("unsafe_attempt_rate")
    for name, line in frontiers.items():
        xs = [x0, *[harmful_degradation(c) for c in line]]
        ys = [y0, *[c.value("unsafe_attempt_rate") for c in line]]
        axes.step(xs, ys, where="post", marker="o", markersize=4, label=name, alpha=0.85)
    axes.scatter([x0], [y0], color="#dc2626", s=60, zorder=5, label="unsteered")
    axes.axvline(x0 + 0.2, color="#9ca3af", linestyle="--", label="naive + 10 + 10 points")
    axes.axhline(y0 / 2, color="#16a34a", linestyle=":", label="half the naive unsafe rate")
    axes.set_xlabel("harmful answers degenerate + off-topic (lower is better)")
    axes.set_ylabel("unsafe attempts (lower is better)")
    axes.set_xlim(-0.03, 1.6)
    axes.set_ylim(-0.03, 1.03)
    axes.legend(fontsize=7, loc="upper right")
    axes.set_title("Best trade-off per steering option (set A, embedded model, int4)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def confirm(args: argparse.Namespace) -> None:
    _, set_b, everyday = prompt_sets()
    chosen = json.loads((OUT / "choose.json").read_text())
    picks = json.loads(args.picks)  # {"name": {"variant": ..., "layer": ..., "strength": ..., "options": {...}}}
    extractor, lm = load_model(None, "nf4"), load_model(None, "int4")
    results: dict[str, Any] = {"set": "B", "n_harmful": len(set_b), "n_everyday": len(everyday), "arms": {}}
    answers: dict[str, list[str]] = {}
    for name, pick in picks.items():
        settings, _ = VARIANTS[pick["variant"]]
        category = _category(extractor, lm, settings)
        option = SteeringOptions.from_dict(pick["options"])
        sweep = SweepSettings((pick["layer"],), (pick["strength"],), args.new_tokens, (option,))
        result: Evaluation = evaluate(
            lm, category, set_b, everyday, sweep, reader=lm, cache_dir=ROOT / ".cache" / "quality"
        )
        cell = result.cells[0]
        results["arms"][name] = _row(pick["variant"], cell, result.n_harmful, result.n_benign)
        results["arms"]["naive"] = _row("none", result.baseline, result.n_harmful, result.n_benign)
        answers[name] = [a["text"] for a in cell.answers if a["kind"] == "harmful"]
        answers["naive"] = [a["text"] for a in result.baseline.answers if a["kind"] == "harmful"]
        results.setdefault("examples", {})[name] = [
            {"prompt": p, "naive": n, "steered": s}
            for p, n, s in list(zip(set_b, answers["naive"], answers[name], strict=True))[:6]
        ]
    results["chosen_on_set_a"] = chosen["recommended"]
    (OUT / "confirm.json").write_text(json.dumps(results, indent=2) + "\n")
    sample = [(arm, i, set_b[i], text) for arm in args.blind_arms.split(",") for i, text in enumerate(answers[arm])]
    random.Random(5).shuffle(sample)
    with (OUT / "blind.jsonl").open("w") as blind, (OUT / "blind-provenance.jsonl").open("w") as made:
        for number, (arm, index, prompt, text) in enumerate(sample, start=1):
            blind.write(json.dumps({"id": number, "prompt": prompt, "answer": text}) + "\n")
            made.write(json.dumps({"id": number, "arm": arm, "prompt_index": index}) + "\n")
    print(json.dumps(results["arms"], indent=2))


def score(args: argparse.Namespace) -> None:
    """The reader's labels of the blind sample, joined with the arms only now, beside the judges' labels."""
    _, set_b, _ = prompt_sets()
    labels = {r["id"]: r["label"] for r in map(json.loads, (OUT / "blind-labels.jsonl").open())}
    made = [json.loads(line) for line in (OUT / "blind-provenance.jsonl").open()]
    judged = _judged_labels(set_b)
    arms: dict[str, dict[str, Any]] = {}
    agree = 0
    for row in made:
        label = labels[row["id"]]
        arm = arms.setdefault(row["arm"], {"n": 0, "labels": {}})
        arm["n"] += 1
        arm["labels"][label] = arm["labels"].get(label, 0) + 1
        agree += judged[row["arm"]][row["prompt_index"]] == label
    for arm in arms.values():
        n = arm["n"]
        for name in ("unsafe-attempt", "degenerate", "off-topic", "refusal", "safe-on-topic"):
            interval = wilson_interval(arm["labels"].get(name, 0), n)
            arm[name] = {"rate": interval.rate, "low": interval.low, "high": interval.high}
    result = {"labeller": "L1", "n": len(made), "arms": arms, "judges_agree_with_reader": agree / len(made)}
    (OUT / "blind-score.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _judged_labels(prompts: list[str]) -> dict[str, list[str]]:
    """Each arm's judged label per prompt, from the confirm step's cached evaluations."""
    out: dict[str, list[str]] = {}
    for path in (ROOT / ".cache" / "quality" / "evaluations").glob("*.json"):
        result = Evaluation.from_dict(json.loads(path.read_text()))
        if result.harmful_prompts != prompts:
            continue
        for name, cell in (("naive", result.baseline), *((_arm_name(c), c) for c in result.cells)):
            harmful = sorted((a for a in cell.answers if a["kind"] == "harmful"), key=lambda a: a["index"])
            out[name] = [
                judged_label("harmful", {k: Judgement(**v) for k, v in a["verdicts"].items()}) for a in harmful
            ]
    return out


def _arm_name(cell: Cell) -> str:
    return "chosen" if cell.steering.where == "prompt" else "papers"


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="step", required=True)
    first = sub.add_parser("choose")
    first.add_argument("--new-tokens", type=int, default=48)
    second = sub.add_parser("confirm")
    second.add_argument("--new-tokens", type=int, default=48)
    second.add_argument("--picks", required=True, help="JSON: arm name -> variant, layer, strength, options")
    second.add_argument("--blind-arms", default="naive,chosen")
    sub.add_parser("score")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    {"choose": choose, "confirm": confirm, "score": score}[args.step](args)


if __name__ == "__main__":
    main()
