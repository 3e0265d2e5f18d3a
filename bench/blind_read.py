"""A blind read of an evaluation's recommended point: naive and steered answers, shuffled and unmarked.

    python bench/blind_read.py sample eval/evaluation.json docs/blind-read/   # writes to_label.jsonl, arms.jsonl
    # ... a person labels to_label.jsonl into labels.jsonl (the reference set's labels and guide) ...
    python bench/blind_read.py score docs/blind-read/                          # rates per arm, from the labels

The reader sees prompts and answers only; which arm made each answer is in `arms.jsonl`, joined
after the labels are written. Scoring also puts the judges' rates beside the reader's.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from safesteer.evaluation import Evaluation
from safesteer.judges.reference import judged_label
from safesteer.metrics import wilson_interval


def sample(evaluation: Path, out: Path, seed: int = 7) -> None:
    result = Evaluation.from_dict(json.loads(evaluation.read_text()))
    chosen = result.recommended_cell()
    rows = []
    for arm, cell in (("naive", result.baseline), ("steered", chosen)):
        for answer in cell.answers:
            prompts = result.harmful_prompts if answer["kind"] == "harmful" else result.benign_prompts
            rows.append(
                {
                    "arm": arm,
                    "kind": answer["kind"],
                    "prompt": prompts[answer["index"]],
                    "answer": answer["text"],
                    "judged": judged_label(answer["kind"], _verdicts(answer)),
                }
            )
    random.Random(seed).shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "to_label.jsonl").open("w") as blind, (out / "arms.jsonl").open("w") as arms:
        for number, row in enumerate(rows, start=1):
            blind.write(json.dumps({"id": number, "prompt": row["prompt"], "answer": row["answer"]}) + "\n")
            arms.write(json.dumps({"id": number, **{k: row[k] for k in ("arm", "kind", "judged")}}) + "\n")
    point = f"layer {result.recommended['layer']}, strength {result.recommended['strength']:g}"
    (out / "about.json").write_text(json.dumps({"category": result.category, "recommended": point}) + "\n")
    print(f"{len(rows)} answers to read in {out / 'to_label.jsonl'}")


def _verdicts(answer: dict) -> dict:
    from safesteer.judges import Judgement

    return {name: Judgement(v["flagged"], v["score"], v["reason"]) for name, v in answer["verdicts"].items()}


def score(folder: Path) -> dict:
    arms = {r["id"]: r for r in map(json.loads, (folder / "arms.jsonl").read_text().splitlines())}
    labels = {r["id"]: r["label"] for r in map(json.loads, (folder / "labels.jsonl").read_text().splitlines())}
    table: dict = {}
    for arm in ("naive", "steered"):
        for kind in ("harmful", "everyday"):
            ids = [i for i, r in arms.items() if r["arm"] == arm and r["kind"] == kind]
            read = Counter(labels[i] for i in ids)
            judged = Counter(arms[i]["judged"] for i in ids)
            table[f"{arm} {kind}"] = {
                label: {
                    "reader": read[label],
                    "judges": judged[label],
                    "n": len(ids),
                    "reader_interval": [round(x, 3) for x in _interval(read[label], len(ids))],
                }
                for label in sorted(set(read) | set(judged))
            }
    (folder / "scores.json").write_text(json.dumps(table, indent=2) + "\n")
    print(json.dumps(table, indent=1))
    return table


def _interval(k: int, n: int) -> tuple[float, float]:
    i = wilson_interval(k, n)
    return i.low, i.high


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("sample")
    make.add_argument("evaluation", type=Path)
    make.add_argument("out", type=Path)
    read = commands.add_parser("score")
    read.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.command == "sample":
        sample(args.evaluation, args.out)
    else:
        score(args.folder)


if __name__ == "__main__":
    main()
