"""Answers of the embedded model to label by reading: naive and steered, to harmful and everyday prompts.

Writes two files to `--out` (default `safesteer/data/reference/`):
- `to_label.jsonl`: id, prompt, answer, shuffled, and nothing else: what a labeller reads, so a
  label cannot depend on how the answer was made;
- `provenance.jsonl`: id, prompt kind, source, layer, strength: how each answer was made, joined
  with the labels only after labelling.

Vectors come from the built-in malicious-uses examples (Do-Not-Answer); harmful prompts are
StrongREJECT's (another source) and held-out Do-Not-Answer ones; everyday prompts are the held-out
part of the project's set. Greedy decoding, so the file is reproducible.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from safesteer import SteeringSpec, datasets, extract_vectors, generate, load_model
from safesteer.models import generation_precision
from safesteer.vectors import ExtractionSettings

ROOT = Path(__file__).resolve().parent.parent
ARMS = ((None, 0.0), (8, 2.0), (8, 4.0), (14, 4.0), (14, 8.0), (20, 6.0))  # (layer, strength); None: naive


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--harmful", type=int, default=36)
    parser.add_argument("--everyday", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "safesteer" / "data" / "reference")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    extractor = load_model(None, "nf4")
    train, heldout = datasets.split_heldout(datasets.harmful_prompts("malicious-uses"), 40, seed=5)
    vectors = extract_vectors(
        extractor,
        train,
        datasets.benign_prompts(limit=160),
        ExtractionSettings(method="mean-diff", gate=False),
        "malicious-uses",
    )
    lm = load_model(None, generation_precision("nf4"))
    rng = random.Random(11)
    harmful = [("harmful", "strongreject", p) for p in rng.sample(datasets.harmful_prompts("strongreject"), 24)]
    harmful += [("harmful", "donotanswer", p) for p in heldout[: args.harmful - len(harmful)]]
    everyday = [
        ("everyday", "safesteer", p) for p in rng.sample(datasets.benign_prompts(part="heldout"), args.everyday)
    ]
    cases = harmful + everyday
    rows = []
    for layer, strength in ARMS:
        specs = [] if layer is None else [SteeringSpec(vectors.vector(layer), layer, strength)]
        answers = generate(lm, [p for _, _, p in cases], specs, max_new_tokens=args.new_tokens)
        for (kind, source, prompt), answer in zip(cases, answers, strict=True):
            rows.append(
                {
                    "kind": kind,
                    "source": source,
                    "layer": layer,
                    "strength": strength,
                    "prompt": prompt,
                    "answer": answer,
                }
            )
    rng.shuffle(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    with (
        (args.out / "to_label.jsonl").open("w", encoding="utf-8") as blind,
        (args.out / "provenance.jsonl").open("w", encoding="utf-8") as made,
    ):
        for number, row in enumerate(rows, start=1):
            blind.write(json.dumps({"id": number, "prompt": row["prompt"], "answer": row["answer"]}) + "\n")
            made.write(
                json.dumps({"id": number, **{k: row[k] for k in ("kind", "source", "layer", "strength")}}) + "\n"
            )
    print(f"{len(rows)} answers written to {args.out}")


if __name__ == "__main__":
    main()
