"""Answer vectors (safe answers minus unsafe ones, the model's own): choose on set A, confirm on set B, read blind.

    python bench/answer_vectors.py choose      # set A: targets x layers x strengths, gates off: what steering does
    python bench/answer_vectors.py choose --gated --targets refuse   # set A as the product runs: gated; the rule picks
    python bench/answer_vectors.py confirm     # set B + unseen everyday prompts: naive, always-on, gated
    # ... a reader labels docs/steering-quality/answers/blind.jsonl into blind-labels.jsonl, blind ...
    python bench/answer_vectors.py score       # the reader's labels joined with the arms, beside the judges'

Set A and set B are `steering_quality.prompt_sets()` (StrongREJECT, none in the judges' reference
set); the confirming everyday and edgy prompts are ones set A never used. Vectors come from the
built-in malicious-uses examples (Do-Not-Answer), the model answering its own training prompts
(self-contrast); none of those answers are measured. Embedded model, int4 on a CPU, greedy.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from builtin import builtin_category
from steering_quality import prompt_sets, safe_on_topic

from safesteer import datasets, load_model
from safesteer.evaluation import Cell, SweepSettings, evaluate
from safesteer.judges import Judgement
from safesteer.judges.reference import judged_label
from safesteer.metrics import wilson_interval
from safesteer.operations import SteeringOptions
from safesteer.recommendation import recommend
from safesteer.vectors import ExtractionSettings

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "steering-quality" / "answers"
CACHE = ROOT / ".cache" / "answers"
LAYERS = (8, 10, 12, 14)
STRENGTHS = (0.5, 1.0, 1.5)
ALL = SteeringOptions("all", "add")
RATES = ("unsafe_attempt_rate", "degenerate_rate", "off_topic_rate", "refusal_rate", "everyday_degraded")


def _row(cell: Cell) -> dict[str, Any]:
    m = cell.measures
    return {
        "layer": cell.layer,
        "strength": cell.strength,
        "options": cell.steering.to_dict() if cell.layer is not None else None,
        **{k: m.get(k) for k in RATES},
        "safe_on_topic_rate": safe_on_topic(cell),
    }


def choose(args: argparse.Namespace) -> None:
    set_a, _, everyday = prompt_sets()
    if args.gated:
        everyday = everyday + everyday_sets()[0]
    lm = load_model(None, "int4")
    out: dict[str, Any] = {
        "set": "A",
        "gated": args.gated,
        "n_harmful": len(set_a),
        "n_everyday": len(everyday),
        "targets": {},
    }
    started = time.perf_counter()
    layers = tuple(int(x) for x in args.layers.split(","))
    for target in args.targets.split(","):
        settings = ExtractionSettings(gate=args.gated, target=target)  # type: ignore[arg-type]
        category = builtin_category(lm, settings, reader=lm, options=ALL)
        sweep = SweepSettings(layers, STRENGTHS, args.new_tokens, (ALL,))
        result = evaluate(lm, category, set_a, everyday, sweep, reader=lm, cache_dir=CACHE)
        out["naive"] = _row(result.baseline)
        out.setdefault("gate", {})[target] = result.gate
        out["targets"][target] = {
            "answers": category.vectors.answers.describe() if category.vectors.answers else "",
            "cells": [_row(c) for c in result.cells],
            "recommended": recommend(result.baseline, result.cells),
        }
        print(target, json.dumps(out["targets"][target]["recommended"]), f"{time.perf_counter() - started:.0f} s")
    out["seconds"] = round(time.perf_counter() - started)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ("choose-gated.json" if args.gated else "choose.json")).write_text(json.dumps(out, indent=2) + "\n")


def everyday_sets() -> tuple[list[str], list[str]]:
    """(choosing, confirming) everyday and edgy prompts, disjoint, none of them set A's twelve.

    Set A's 12 everyday prompts cannot resolve the rule's 5-point limit once gated (one answer is 8
    points), so the gated choice adds 48 more; the confirming set has its own 32.
    """
    _, _, seen = prompt_sets()
    fresh = [p for p in datasets.benign_prompts(part="heldout") if p not in seen]
    edgy = [p for p in datasets.edgy_benign_prompts() if p not in seen]
    random.Random(9).shuffle(fresh)
    random.Random(9).shuffle(edgy)
    return fresh[:36] + edgy[:12], fresh[36:60] + edgy[12:20]


def confirm(args: argparse.Namespace) -> None:
    out = args.out
    _, set_b, _ = prompt_sets()
    everyday = everyday_sets()[1]
    lm = load_model(None, "int4")
    target, layer, strength = args.target, args.layer, args.strength
    settings = ExtractionSettings(target=target)  # the product's default: gated (policy gate)
    gated = builtin_category(lm, settings, reader=lm, layer=layer, strength=strength, options=ALL)
    always = replace(gated, vectors=gated.vectors.with_gate(None))  # the same vectors, every prompt steered
    sweep = SweepSettings((layer,), (strength,), args.new_tokens, (ALL,))
    arms: dict[str, Cell] = {}
    for name, category in (("gated", gated), ("always", always)):
        result = evaluate(lm, category, set_b, everyday, sweep, reader=lm, cache_dir=CACHE)
        arms["naive"], arms[name] = result.baseline, result.cells[0]
        if name == "gated":
            gate = result.gate
    summary = {
        "set": "B",
        "target": target,
        "layer": layer,
        "strength": strength,
        "n_harmful": len(set_b),
        "n_everyday": len(everyday),
        "gate": gate,
        "arms": {name: _row(cell) for name, cell in arms.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "confirm.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = []
    for arm in ("naive", "gated"):
        for answer in arms[arm].answers:
            prompts = set_b if answer["kind"] == "harmful" else everyday
            rows.append((arm, answer["kind"], answer["index"], prompts[answer["index"]], answer["text"], answer))
    random.Random(13).shuffle(rows)
    with (out / "blind.jsonl").open("w") as blind, (out / "blind-provenance.jsonl").open("w") as made:
        for number, (arm, kind, index, prompt, text, answer) in enumerate(rows, start=1):
            blind.write(json.dumps({"id": number, "kind": kind, "prompt": prompt, "answer": text}) + "\n")
            verdicts = {k: Judgement(**v) for k, v in answer["verdicts"].items()}
            made.write(
                json.dumps({"id": number, "arm": arm, "index": index, "judged": judged_label(kind, verdicts)}) + "\n"
            )
    print(json.dumps(summary["arms"], indent=2))


def score(args: argparse.Namespace) -> None:
    out = args.out
    labels = {r["id"]: r["label"] for r in map(json.loads, (out / "blind-labels.jsonl").open())}
    made = [json.loads(line) for line in (out / "blind-provenance.jsonl").open()]
    kinds = {r["id"]: r["kind"] for r in map(json.loads, (out / "blind.jsonl").open())}
    arms: dict[str, dict[str, Any]] = {}
    agree = 0
    for row in made:
        label, kind = labels[row["id"]], kinds[row["id"]]
        arm = arms.setdefault(f"{row['arm']} ({kind})", {"n": 0, "labels": {}})
        arm["n"] += 1
        arm["labels"][label] = arm["labels"].get(label, 0) + 1
        agree += row["judged"] == label
    for arm in arms.values():
        arm["rates"] = {name: vars(wilson_interval(count, arm["n"])) for name, count in sorted(arm["labels"].items())}
    result = {"n": len(made), "arms": arms, "judges_agree_with_reader": round(agree / len(made), 3)}
    (out / "blind-score.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="step", required=True)
    first = sub.add_parser("choose")
    first.add_argument("--targets", default="refuse,redirect")
    first.add_argument("--gated", action="store_true", help="gate each category as the product does")
    first.add_argument("--layers", default=",".join(map(str, LAYERS)))
    first.add_argument("--new-tokens", type=int, default=48)
    second = sub.add_parser("confirm")
    second.add_argument("--target", default="refuse")
    second.add_argument("--layer", type=int, required=True)
    second.add_argument("--strength", type=float, required=True)
    second.add_argument("--new-tokens", type=int, default=48)
    second.add_argument("--out", type=Path, default=OUT, help="where the arms and the blind sample go")
    third = sub.add_parser("score")
    third.add_argument("--out", type=Path, default=OUT, help="the folder confirm wrote and the reader labelled")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    {"choose": choose, "confirm": confirm, "score": score}[args.step](args)


if __name__ == "__main__":
    main()
