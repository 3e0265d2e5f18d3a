"""How long a sweep takes: cells of any layer, strength and steering option answered as rows of one batch.

The target: 18 cells (6 layers x 3 strengths) on 16 held-out harmful and 8 everyday prompts at
32 new tokens within 60 s on the embedded model with 2 CPU cores, judging included. The
response probe is trained (or read from its cache) before the clock starts: it is made once per
model. Writes `docs/sweep.json`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from safesteer import datasets, extract_vectors, load_model
from safesteer.evaluation import SweepSettings, evaluate
from safesteer.judges.probe import reference_probe
from safesteer.operations import SteeringOptions
from safesteer.policy import PolicyCategory
from safesteer.vectors import ExtractionSettings
from safesteer.workflows import sweep_layers

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--answer-with", default="int4", help="precision of the copy that answers")
    parser.add_argument("--options", type=int, default=1, help="1: the category's option; 3: add, norm, clamp")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "sweep.json")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    extractor = load_model(None, "nf4")
    train, heldout = datasets.split_heldout(datasets.harmful_prompts("malicious-uses"), 40, seed=5)
    vectors = extract_vectors(
        extractor,
        train,
        datasets.benign_prompts(limit=64),
        ExtractionSettings(method="mean-diff", gate=False),
        "malicious-uses",
    )
    category = PolicyCategory("malicious-uses", train, datasets.benign_prompts(limit=64), vectors, 14, 4.0)
    reader = load_model(None, "int4")
    answering = reader if args.answer_with == "int4" else load_model(None, args.answer_with)  # type: ignore[arg-type]
    reference_probe(reader)  # made once per model and cached: not part of a sweep's time
    layers = sweep_layers(vectors.n_layers, 14, count=6)[:6]
    options = (
        () if args.options == 1 else tuple(SteeringOptions(how=h) for h in ("add", "norm", "clamp"))[: args.options]
    )
    strengths = (2.0, 4.0, 8.0)
    settings = SweepSettings(layers, strengths, 32, options)
    harmful, benign = heldout[:16], datasets.benign_prompts(part="heldout")[:8]
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: nothing is read back
        started = time.perf_counter()
        marks: list[tuple[float, str]] = []
        result = evaluate(
            answering,
            category,
            harmful,
            benign,
            settings,
            reader=reader,
            cache_dir=Path(cache),
            progress=lambda f, m: marks.append((time.perf_counter() - started, m)),
        )
        seconds = time.perf_counter() - started
    judging_from = next((t for t, m in marks if m.startswith("judging")), seconds)
    figures = {
        "cells": len(result.cells),
        "harmful": len(harmful),
        "everyday": len(benign),
        "new_tokens": 32,
        "answered_with": answering.identity.precision,
        "seconds": round(seconds, 1),
        "answering_seconds": round(judging_from, 1),
        "judging_seconds": round(seconds - judging_from, 1),
        "target_seconds": 60,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(figures, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
