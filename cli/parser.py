"""The command line's grammar: every subcommand, its options and its handler."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from safesteer.activations import TOKENS
from safesteer.architectures import SITES
from safesteer.checkpoints import EMBEDDED_MODEL
from safesteer.errors import SafeSteerError
from safesteer.gates import DEFAULT_FPR
from safesteer.methods.answers import ANSWER_SOURCES, TARGETS
from safesteer.models import PRECISIONS
from safesteer.operations import ANSWER_DEFAULT, COMPARED, DEFAULT, SUGGESTED, SteeringOptions, parse_options
from safesteer.vectors import METHODS
from safesteer.workflows import DEFAULT_BENIGN, DEFAULT_HARMFUL, EXPORT_FORMATS

from .common import DEFAULT_STRENGTH, default_author
from .generation import cmd_extract, cmd_generate, cmd_serve
from .policies import cmd_eval, cmd_export, cmd_import, cmd_policy


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safesteer", description="Category-wise safety steering for language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library log messages")
    parser.add_argument(
        "--db", default=None, help="database URL (default: $SAFESTEER_DB or a SQLite file in the data folder)"
    )
    parser.add_argument(
        "--author", default=default_author(), help="who is acting (recorded in versions and the audit log)"
    )
    # The same options after a subcommand (`safesteer extract --db X`); SUPPRESS keeps the top-level value otherwise.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--db", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--author", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    def subcommand(group: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return group.add_parser(name, parents=[common], **kwargs)

    def with_model(sub: argparse.ArgumentParser, default: str | None) -> None:
        sub.add_argument(
            "--model",
            default=default,
            help="Hugging Face id, local folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
        )
        sub.add_argument(
            "--precision",
            choices=PRECISIONS,
            default=None,
            help="weights precision (default: 4-bit NF4; `generate` uses int4 on a CPU, faster for a few prompts)",
        )

    extract = subcommand(commands, "extract", help="compute a category's steering vectors from example prompts")
    extract.add_argument("--harmful", required=True, help="CSV/JSONL/TXT of harmful prompts, or builtin:<area>")
    extract.add_argument("--safe", required=True, help="CSV/JSONL/TXT of safe prompts, or builtin:benign")
    extract.add_argument("--category", default="category", help="a name for the category")
    with_model(extract, EMBEDDED_MODEL)
    extract.add_argument(
        "--site", choices=SITES, default="residual", help="where to read and steer: residual stream or attention output"
    )
    extract.add_argument("--token", choices=TOKENS, default="last", help="last prompt token or mean over the prompt")
    extract.add_argument(
        "--method",
        choices=METHODS,
        default="answers",
        help="answers: from the model's own answers (default, measured to make answers safer); mean-diff, pruned: "
        "from the prompts",
    )
    extract.add_argument(
        "--target",
        choices=TARGETS,
        default="refuse",
        help="with --method answers: steer toward refusing, or toward a safe on-topic answer (redirect)",
    )
    extract.add_argument(
        "--answer-source",
        choices=ANSWER_SOURCES,
        default="self-contrast",
        help="with --method answers: the model answers each prompt both ways (self-contrast), or its plain "
        "answers are sorted by the judges (judged)",
    )
    extract.add_argument(
        "--prune-fraction", type=float, default=0.5, help="share of harmful examples kept by --method pruned"
    )
    extract.add_argument(
        "--batch-size", type=positive_int, default=0, help="prompts per pass (default: 16 on a CPU, 64 on a GPU)"
    )
    extract.add_argument(
        "--mode",
        choices=("gated", "always", "none"),
        default="gated",
        help="gated: steer only prompts the category's gate fires on; always: every prompt (gate kept, off); "
        "none: train no gate",
    )
    extract.add_argument(
        "--gate-fpr", type=float, default=DEFAULT_FPR, help="gate's false-positive rate on held-out safe prompts"
    )
    extract.add_argument(
        "--gate-recipe",
        choices=("policy", "category"),
        default="policy",
        help="policy: the gate recognises any of the policy's categories and routes to the closest (default); "
        "category: the older gate that tells this category from the others",
    )
    extract.add_argument(
        "--out", type=Path, default=None, help="save the vectors here (default without --policy: vectors.safetensors)"
    )
    extract.add_argument("--policy", default=None, help="save the category as a new version of this policy")
    extract.add_argument(
        "--layer", type=int, default=None, help="with --policy: layer to apply at (default: recommended)"
    )
    extract.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --policy: strength to apply at (default: suggested for the method: 1 for answers, 2 for prompts)",
    )
    extract.add_argument("--note", default="", help="with --policy: a change note")
    add_steering_argument(extract, "with --policy: ", suggested=True)
    extract.set_defaults(handler=cmd_extract)

    gen = subcommand(commands, "generate", help="answer a prompt naive and steered, side by side")
    gen.add_argument("--vectors", type=Path, default=None, help="a vectors file written by `extract --out`")
    gen.add_argument(
        "--policy", default=None, help="a saved policy (all its categories at their saved layer and strength)"
    )
    gen.add_argument("--version", type=positive_int, default=None, help="with --policy: version (default: latest)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--layer", type=int, default=None, help="with --vectors: layer (default: the recommended one)")
    gen.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help="with --vectors: strength")
    gen.add_argument(
        "--allow-negative", action="store_true", help="accept a negative --strength (steers toward the harmful side)"
    )
    gen.add_argument("--max-new-tokens", type=positive_int, default=64)
    add_steering_argument(gen, "with --vectors: ")
    gen.add_argument("--json", action="store_true", help="print JSON")
    with_model(gen, None)
    gen.set_defaults(handler=cmd_generate)

    policy = subcommand(commands, "policy", help="manage versioned policies")
    actions = policy.add_subparsers(dest="action", required=True)
    create = subcommand(actions, "create", help="create an empty policy")
    create.add_argument("name")
    create.add_argument("--description", default="")
    listing = subcommand(actions, "list", help="list policies")
    listing.add_argument("--all", action="store_true", help="include archived policies")
    show = subcommand(actions, "show", help="show one version (default: the latest)")
    show.add_argument("name")
    show.add_argument("--version", type=positive_int, default=None)
    versions = subcommand(actions, "versions", help="list a policy's versions")
    versions.add_argument("name")
    diff = subcommand(actions, "diff", help="compare two versions")
    diff.add_argument("name")
    diff.add_argument("old", type=positive_int)
    diff.add_argument("new", type=positive_int)
    rollback = subcommand(actions, "rollback", help="save an old version again as the newest")
    rollback.add_argument("name")
    rollback.add_argument("number", type=positive_int)
    rollback.add_argument("--note", default="")
    archive = subcommand(actions, "archive", help="hide a policy from lists (keeps everything)")
    archive.add_argument("name")
    archive.add_argument("--undo", action="store_true", help="unarchive")
    delete = subcommand(actions, "delete", help="delete a policy and all its versions")
    delete.add_argument("name")
    delete.add_argument("--confirm", default=None, help="repeat the policy name to confirm")
    audit = subcommand(actions, "audit", help="who did what, and when")
    audit.add_argument("name", nargs="?", default=None)
    audit.add_argument("--limit", type=positive_int, default=50)
    audit.add_argument("--verify", action="store_true", help="recompute the tamper-evident hash chain")
    for sub in (create, listing, show, versions, diff, audit):
        sub.add_argument("--json", action="store_true", help="print JSON")
    for sub in (rollback, archive, delete):
        sub.set_defaults(json=False)
    policy.set_defaults(handler=cmd_policy)

    export = subcommand(commands, "export", help="export a policy version as a bundle or llama.cpp control vector")
    export.add_argument("--policy", required=True)
    export.add_argument("--version", type=positive_int, default=None)
    export.add_argument("--out", required=True, type=Path)
    export.add_argument("--format", choices=tuple(EXPORT_FORMATS), default="bundle")
    export.set_defaults(handler=cmd_export)

    ev = subcommand(commands, "eval", help="measure a saved policy's effect on safety and quality (optionally a sweep)")
    ev.add_argument("--policy", required=True)
    ev.add_argument("--version", type=positive_int, default=None)
    ev.add_argument("--category", default=None, help="which category (default: the first)")
    ev.add_argument(
        "--judge",
        default=None,
        help="unsafe-attempt judge: a guard model (e.g. meta-llama/Llama-Guard-3-1B) or any causal LM, asked "
        "StrongREJECT's rubric (default: the response probe trained on the reference set)",
    )
    ev.add_argument("--judge-kind", choices=("auto", "guard", "rubric"), default="auto")
    ev.add_argument("--no-probe", action="store_true", help="without --judge, judge no unsafe attempts at all")
    ev.add_argument(
        "--labels", type=Path, default=None, help="your own labelled answers (JSON lines) to train the probe with too"
    )
    ev.add_argument("--sweep", action="store_true", help="try a layer x strength grid and recommend a point")
    ev.add_argument("--strengths", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ev.add_argument(
        "--options",
        type=steering_options,
        nargs="+",
        default=None,
        help="ways of applying the vector to compare, each how:where[:spread] (e.g. add:all clamp:generated:3), "
        "or 'all' for the standard set (default: the category's own)",
    )
    ev.add_argument("--heldout", default=None, help="held-out harmful prompts (file or builtin:<area>)")
    ev.add_argument("--prompts", type=positive_int, default=DEFAULT_HARMFUL, help="held-out harmful prompts to use")
    ev.add_argument("--benign", type=positive_int, default=DEFAULT_BENIGN, help="everyday prompts to use")
    ev.add_argument("--max-new-tokens", type=positive_int, default=32)
    ev.add_argument("--out", required=True, type=Path, help="folder for report.md, evaluation.json and plots")
    ev.add_argument("--json", action="store_true")
    with_model(ev, None)
    ev.set_defaults(handler=cmd_eval)

    serve = subcommand(commands, "serve", help="serve saved policies over an OpenAI-compatible API")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (others need SAFESTEER_API_KEYS)")
    serve.add_argument("--port", type=positive_int, default=8000)
    serve.add_argument(
        "--model-name", default="base", help="the `model` value that asks for unsteered answers (default: base)"
    )
    serve.add_argument("--max-tokens-limit", type=positive_int, default=512, help="the largest max_tokens accepted")
    serve.add_argument("--max-batch", type=positive_int, default=16, help="requests answered together at most")
    serve.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests before 429")
    serve.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take")
    serve.add_argument(
        "--engine",
        choices=("safesteer", "vllm"),
        default="safesteer",
        help="what answers: SafeSteer's own batcher, or vLLM (needs vLLM installed: docs/serving.md)",
    )
    serve.add_argument(
        "--vllm-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option for vLLM's engine, repeatable (e.g. tensor_parallel_size=2); VALUE is JSON if it parses",
    )
    serve.add_argument("--audit", action="store_true", help="record each answer's policy version and gates fired")
    serve.add_argument("--audit-prompts", action="store_true", help="...with the prompt text (implies --audit)")
    with_model(serve, None)
    serve.set_defaults(handler=cmd_serve)

    imp = subcommand(commands, "import", help="import a policy bundle as a new version")
    imp.add_argument("file")
    imp.add_argument("--as", dest="as_name", default=None, help="import under another policy name")
    imp.add_argument(
        "--allow-other-model",
        action="store_true",
        help="import a bundle made for another model of the same shape (recorded in the version's history)",
    )
    with_model(imp, None)
    imp.set_defaults(handler=cmd_import)
    return parser


def steering_option(text: str) -> SteeringOptions:
    try:
        return parse_options(text)
    except SafeSteerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def steering_options(text: str) -> tuple[SteeringOptions, ...]:
    """One `--options` word: `all` is the standard set to compare, anything else one option."""
    return COMPARED if text.strip() == "all" else (steering_option(text),)


def add_steering_argument(parser: argparse.ArgumentParser, scope: str, suggested: bool = False) -> None:
    """`suggested`: without the flag, the options suggested for the vectors' method (`policy.suggested_point`)."""
    default = f"{DEFAULT.how}:{DEFAULT.where}:{DEFAULT.spread}"
    if suggested:
        default = (
            f"suggested for the method: {ANSWER_DEFAULT.how}:{ANSWER_DEFAULT.where} for answers, {default} for prompts"
        )
    parser.add_argument(
        "--steer",
        type=steering_option,
        default=SUGGESTED if suggested else DEFAULT,
        help=f"{scope}how the vector is applied, how:where[:spread] (how: add, norm, clamp; where: all, prompt, "
        f"generated; spread: adjacent layers sharing the strength); default {default}",
    )
