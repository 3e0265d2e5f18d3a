"""The `safesteer` command: the same library calls as the app, for scripts and terminals.

Every failure a user can cause ends as one `error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import datasets
from .activations import TOKENS
from .architectures import SITES
from .errors import SafeSteerError
from .generation import generate_side_by_side
from .models import EMBEDDED_MODEL, PRECISIONS, LoadedModel, check_compatible, load_model
from .progress import ProgressCallback
from .prompts import load_prompt_file
from .steering import SteeringSpec
from .vectors import METHODS, CategoryVectors, ExtractionSettings, extract_vectors

BUILTIN_PREFIX = "builtin:"
DEFAULT_STRENGTH = 4.0


def prompts_from_argument(value: str) -> list[str]:
    """A prompt file, or `builtin:benign` / `builtin:<Do-Not-Answer area>`."""
    if value.startswith(BUILTIN_PREFIX):
        name = value[len(BUILTIN_PREFIX) :]
        return datasets.benign_prompts() if name == "benign" else datasets.harmful_prompts(name)
    return load_prompt_file(value)


class _Bar:
    """A stderr progress bar that only draws on a terminal (pipes and CI logs stay clean)."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=100, file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)

    def __call__(self, fraction: float, description: str) -> None:
        self._bar.set_description_str(description)
        self._bar.n = round(fraction * 100)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _load(args: argparse.Namespace, model_id: str, progress: ProgressCallback | None = None) -> LoadedModel:
    return load_model(model_id, args.precision, progress=progress)


def cmd_extract(args: argparse.Namespace) -> int:
    harmful = prompts_from_argument(args.harmful)
    safe = prompts_from_argument(args.safe)
    settings = ExtractionSettings(
        site=args.site,
        token=args.token,
        method=args.method,
        prune_fraction=args.prune_fraction,
        batch_size=args.batch_size,
    )
    settings.validate()
    bar = _Bar()
    try:
        started = time.perf_counter()
        lm = _load(args, args.model, bar)
        loaded = time.perf_counter()
        result = extract_vectors(lm, harmful, safe, settings, category=args.category, progress=bar)
        finished = time.perf_counter()
    finally:
        bar.close()
    path = result.save(args.out)
    summary = {
        "out": str(path),
        **result.summary(),
        "timing_s": {"load": round(loaded - started, 2), "extract": round(finished - loaded, 2)},
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    vectors = CategoryVectors.load(args.vectors)
    layer = vectors.recommended_layer if args.layer is None else args.layer
    vector = vectors.vector(layer)
    lm = _load(args, args.model or vectors.model.model_id)
    check_compatible(vectors.model, lm.identity)
    spec = SteeringSpec(vector=vector, layer=layer, strength=args.strength, site=vectors.settings.site)
    started = time.perf_counter()
    result = generate_side_by_side(lm, args.prompt, [spec], max_new_tokens=args.max_new_tokens)
    elapsed = time.perf_counter() - started
    if args.json:
        payload = {**result.to_dict(), "layer": layer, "strength": args.strength, "seconds": round(elapsed, 2)}
        print(json.dumps(payload, indent=2))
    else:
        print(f"--- naive ---\n{result.naive}\n")
        print(f"--- steered (layer {layer}, strength {args.strength}) ---\n{result.steered}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safesteer", description="Category-wise safety steering for language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library log messages")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_model(sub: argparse.ArgumentParser, default: str | None) -> None:
        sub.add_argument(
            "--model",
            default=default,
            help="Hugging Face id, local folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
        )
        sub.add_argument(
            "--precision", choices=PRECISIONS, default="nf4", help="weights precision (default: 4-bit NF4)"
        )

    extract = commands.add_parser("extract", help="compute a category's steering vectors from example prompts")
    extract.add_argument("--harmful", required=True, help="CSV/JSONL/TXT of harmful prompts, or builtin:<area>")
    extract.add_argument("--safe", required=True, help="CSV/JSONL/TXT of safe prompts, or builtin:benign")
    extract.add_argument("--category", default="category", help="a name for the category")
    with_model(extract, EMBEDDED_MODEL)
    extract.add_argument(
        "--site", choices=SITES, default="residual", help="where to read and steer: residual stream or attention output"
    )
    extract.add_argument("--token", choices=TOKENS, default="last", help="last prompt token or mean over the prompt")
    extract.add_argument("--method", choices=METHODS, default="mean-diff")
    extract.add_argument(
        "--prune-fraction", type=float, default=0.5, help="share of harmful examples kept by --method pruned"
    )
    extract.add_argument("--batch-size", type=_positive_int, default=16)
    extract.add_argument("--out", type=Path, default=Path("vectors.safetensors"), help="where to save the vectors")
    extract.set_defaults(handler=cmd_extract)

    gen = commands.add_parser("generate", help="answer a prompt naive and steered, side by side")
    gen.add_argument("--vectors", required=True, type=Path, help="a vectors file written by `extract`")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--layer", type=int, default=None, help="layer to steer at (default: the recommended one)")
    gen.add_argument("--strength", type=float, default=DEFAULT_STRENGTH)
    gen.add_argument("--max-new-tokens", type=_positive_int, default=64)
    gen.add_argument("--json", action="store_true", help="print JSON")
    with_model(gen, None)
    gen.set_defaults(handler=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return args.handler(args)
    except SafeSteerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
