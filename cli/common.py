"""What every command shares: prompt arguments, the store, model loading, progress and output."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from db import PolicyStore
from safesteer import datasets
from safesteer.models import LoadedModel, generation_precision, load_model
from safesteer.progress import ProgressCallback
from safesteer.prompts import read_prompt_file

BUILTIN_PREFIX = "builtin:"
DEFAULT_STRENGTH = 2.0


def prompts_from_argument(value: str, dropped: list[str] | None = None) -> list[str]:
    """A prompt file, or `builtin:benign` / `builtin:<Do-Not-Answer area>`; what a file lost is noted on stderr."""
    if value.startswith(BUILTIN_PREFIX):
        name = value[len(BUILTIN_PREFIX) :]
        return datasets.benign_prompts() if name == "benign" else datasets.harmful_prompts(name)
    report = read_prompt_file(value)
    for problem in report.problems():
        print(f"note: {Path(value).name}: {problem}", file=sys.stderr)
        if dropped is not None:
            dropped.append(f"{Path(value).name}: {problem}")
    return report.prompts


def default_author() -> str:
    return os.environ.get("SAFESTEER_USER") or getpass.getuser()


class ProgressBar:
    """A stderr progress bar that only draws on a terminal (pipes and CI logs stay clean)."""

    def __init__(self) -> None:
        from tqdm import tqdm  # comes with transformers; only the commands that load a model draw a bar

        self._bar = tqdm(total=100, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)

    def __call__(self, fraction: float, description: str) -> None:
        self._bar.set_description_str(description)
        self._bar.n = round(fraction * 100)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def open_store(args: argparse.Namespace):

    return PolicyStore(args.db)


def load_for(
    args: argparse.Namespace, model_id: str | None, progress: ProgressCallback | None = None, *, generating: bool
) -> LoadedModel:
    """NF4 by default; `generating` a few rows defaults to the fastest 4-bit path here (int4 on a CPU)."""
    precision = args.precision or (generation_precision("nf4") if generating else "nf4")
    return load_model(model_id, precision, progress=progress)
