"""The `safesteer` command: the same library calls as the app, for scripts and terminals.

Every failure a user can cause ends as one `error: ...` line on stderr and exit status 2.
Read commands take `--json` for scripts.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import datasets
from .activations import TOKENS
from .architectures import SITES
from .errors import SafeSteerError
from .generation import generate, generate_side_by_side
from .limits import check_layer, check_strength
from .models import (
    EMBEDDED_MODEL,
    PRECISIONS,
    LoadedModel,
    check_compatible,
    describe_model,
    generation_precision,
    load_model,
)
from .policy import PolicyCategory, PolicyVersion, check_name
from .progress import ProgressCallback
from .prompts import read_prompt_file
from .steering import SteeringSpec
from .vectors import METHODS, CategoryVectors, ExtractionSettings, check_prompt_counts, extract_vectors

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


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _store(args: argparse.Namespace):
    from db import PolicyStore

    return PolicyStore(args.db)


def _load(
    args: argparse.Namespace, model_id: str | None, progress: ProgressCallback | None = None, *, generating: bool
) -> LoadedModel:
    """NF4 by default; `generating` a few rows defaults to the fastest 4-bit path here (int4 on a CPU)."""
    precision = args.precision or (generation_precision("nf4") if generating else "nf4")
    return load_model(model_id, precision, progress=progress)


# --- extract and generate ------------------------------------------------------------------------


def cmd_extract(args: argparse.Namespace) -> int:
    dropped: list[str] = []
    harmful = prompts_from_argument(args.harmful, dropped)
    safe = prompts_from_argument(args.safe, dropped)
    settings = ExtractionSettings(
        site=args.site,
        token=args.token,
        method=args.method,
        prune_fraction=args.prune_fraction,
        batch_size=args.batch_size,
    )
    settings.validate()
    try:  # every cheap check before the model loads
        check_prompt_counts(harmful, safe)
    except SafeSteerError as exc:
        raise SafeSteerError(f"{exc}" + (f" (dropped: {'; '.join(dropped)})" if dropped else "")) from exc
    if args.policy:
        check_name("policy", args.policy)
        check_name("category", args.category)
        check_strength(args.strength)
        if args.layer is not None:
            check_layer(args.layer)
    store = _store(args) if args.policy else None  # open (and migrate) before the long work
    bar = _Bar()
    try:
        started = time.perf_counter()
        lm = _load(args, args.model, bar, generating=False)
        loaded = time.perf_counter()
        result = extract_vectors(lm, harmful, safe, settings, category=args.category, progress=bar)
        finished = time.perf_counter()
    finally:
        bar.close()
    summary: dict[str, Any] = {
        **result.summary(),
        "timing_s": {"load": round(loaded - started, 2), "extract": round(finished - loaded, 2)},
    }
    if args.out or not args.policy:  # never drop a result: without a policy, save to a file
        summary["out"] = str(result.save(args.out or Path("vectors.safetensors")))
    if store is not None:
        category = PolicyCategory(
            name=args.category,
            harmful=harmful,
            safe=safe,
            vectors=result,
            layer=result.recommended_layer if args.layer is None else args.layer,
            strength=args.strength,
        )
        number = store.save_version(
            args.policy, [category], author=args.author, note=args.note, keep_other_categories=True
        )
        summary["saved"] = {"policy": args.policy, "version": number}
    _print_json(summary)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if bool(args.vectors) == bool(args.policy):
        raise SafeSteerError("give either --vectors FILE or --policy NAME")
    check_strength(args.strength, allow_negative=args.allow_negative)
    if args.policy:
        version = _store(args).load_version(args.policy, args.version)
        model = version.model
        specs = version.steering_specs()
        described = {
            "policy": version.policy,
            "version": version.number,
            "categories": {c.name: {"layer": c.layer, "strength": c.strength} for c in version.categories},
        }
    else:
        vectors = CategoryVectors.load(args.vectors)
        layer = vectors.recommended_layer if args.layer is None else args.layer
        model = vectors.model
        specs = [
            SteeringSpec(vector=vectors.vector(layer), layer=layer, strength=args.strength, site=vectors.settings.site)
        ]
        described = {"layer": layer, "strength": args.strength}
    lm = _load(args, args.model or model.model_id, generating=True)
    check_compatible(model, lm.identity)
    started = time.perf_counter()
    if len(specs) == 1:
        result = generate_side_by_side(lm, args.prompt, specs, max_new_tokens=args.max_new_tokens).to_dict()
    else:
        naive, steered = generate(
            lm,
            [args.prompt, args.prompt],
            [SteeringSpec(s.vector, s.layer, (0.0, s.strengths()[0]), s.site) for s in specs],
            max_new_tokens=args.max_new_tokens,
        )
        result = {"prompt": args.prompt, "naive": naive, "steered": steered}
    elapsed = time.perf_counter() - started
    if args.json:
        _print_json({**result, **described, "seconds": round(elapsed, 2)})
    else:
        print(f"--- naive ---\n{result['naive']}\n")
        print(f"--- steered ({json.dumps(described)}) ---\n{result['steered']}")
    return 0


# --- policies ----------------------------------------------------------------------------------


def _version_dict(version: PolicyVersion) -> dict[str, Any]:
    return {
        "policy": version.policy,
        "description": version.description,
        "version": version.number,
        "author": version.author,
        "created_at": version.created_at,
        "note": version.note,
        "restored_from": version.restored_from,
        "model": version.model.to_dict(),
        "evaluation": version.evaluation,
        "categories": [
            {
                "name": c.name,
                "layer": c.layer,
                "strength": c.strength,
                "settings": asdict(c.vectors.settings),
                "recommended_layer": c.vectors.recommended_layer,
                "harmful_examples": len(c.harmful),
                "safe_examples": len(c.safe),
            }
            for c in version.categories
        ],
    }


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def cmd_policy(args: argparse.Namespace) -> int:
    store = _store(args)
    action = args.action
    if action == "create":
        summary = store.create_policy(args.name, args.description, actor=args.author)
        _print_json(asdict(summary)) if args.json else print(f"created policy {summary.name!r}")
    elif action == "list":
        rows = [asdict(p) for p in store.list_policies(include_archived=args.all)]
        _print_json(rows) if args.json else _table(
            rows, ["name", "versions", "latest", "archived", "created_by", "description"]
        )
    elif action == "show":
        data = _version_dict(store.load_version(args.name, args.version))
        if args.json:
            _print_json(data)
        else:
            author = data["author"] or "?"
            print(f"{data['policy']} v{data['version']} by {author} at {data['created_at']}: {data['note']}")
            _table(
                data["categories"],
                ["name", "layer", "strength", "recommended_layer", "harmful_examples", "safe_examples"],
            )
    elif action == "versions":
        rows = [asdict(v) for v in store.list_versions(args.name)]
        _print_json(rows) if args.json else _table(
            rows, ["number", "author", "created_at", "categories", "restored_from", "note"]
        )
    elif action == "diff":
        diff = store.diff(args.name, args.old, args.new).to_dict()
        if args.json:
            _print_json(diff)
        else:
            for c in diff["categories"]:
                print(f"{c['name']}: {c['status']}")
                for key in ("harmful_added", "harmful_removed", "safe_added", "safe_removed"):
                    if c[key]:
                        print(f"  {key.replace('_', ' ')}: {len(c[key])}")
                for key, (old, new) in c["settings_changed"].items():
                    print(f"  {key}: {old} -> {new}")
                if c["cosine_by_layer"]:
                    print(
                        f"  vector cosine: min {min(c['cosine_by_layer']):.3f} over {len(c['cosine_by_layer'])} layers"
                    )
    elif action == "rollback":
        number = store.rollback(args.name, args.number, actor=args.author, note=args.note)
        print(f"saved version {args.number} of {args.name!r} again as version {number}")
    elif action == "archive":
        store.archive_policy(args.name, actor=args.author, archived=not args.undo)
        print(f"{'unarchived' if args.undo else 'archived'} policy {args.name!r}")
    elif action == "delete":
        store.delete_policy(args.name, confirm=args.confirm or "", actor=args.author)
        print(f"deleted policy {args.name!r} and all its versions")
    elif action == "audit" and args.verify:
        check = store.verify_audit()
        if not check.ok:
            raise SafeSteerError(
                f"the audit log was altered: entry {check.first_bad_id} does not match the hash chain "
                f"({check.entries - 1} entries before it are intact)"
            )
        _print_json(asdict(check)) if args.json else print(f"audit log intact: {check.entries} entries")
    elif action == "audit":
        rows = [asdict(e) for e in store.audit_log(args.name, limit=args.limit)]
        _print_json(rows) if args.json else _table(rows, ["at", "actor", "action", "policy", "version", "detail"])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .bundles import export_bundle, export_llama_cpp

    version = _store(args).load_version(args.policy, args.version)
    if args.format == "llama-cpp":
        path = export_llama_cpp(version, args.out)
    else:
        path = export_bundle(version, args.out, created_by=args.author)
    print(json.dumps({"policy": version.policy, "version": version.number, "format": args.format, "out": str(path)}))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from db import import_bundle

    path = Path(args.file)
    if not path.is_file():
        raise SafeSteerError(f"no such file: {path}")
    target = describe_model(args.model, args.precision or "nf4")
    store = _store(args)
    name, number = import_bundle(
        store,
        path.read_bytes(),
        target=target,
        actor=args.author,
        rename=args.as_name,
        allow_other_model=args.allow_other_model,
    )
    print(json.dumps({"policy": name, "version": number}))
    return 0


def default_heldout(seed: int = 7) -> list[str]:
    """All Do-Not-Answer prompts, shuffled per risk area and interleaved, so any prefix mixes the areas."""
    import itertools
    import random

    areas = [datasets.harmful_prompts(area) for area in datasets.DONOTANSWER_AREAS]
    areas = [random.Random(seed).sample(prompts, len(prompts)) for prompts in areas]
    return [p for group in itertools.zip_longest(*areas) for p in group if p is not None]


def sweep_layers(n_layers: int, around: int, count: int = 5) -> tuple[int, ...]:
    """`count` layers spread over the middle of the model, always including `around`."""
    low, high = max(1, round(0.25 * (n_layers - 1))), round(0.7 * (n_layers - 1))
    spread = {round(low + i * (high - low) / max(1, count - 1)) for i in range(count)}
    return tuple(sorted(spread | {around}))


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import SweepSettings, evaluate, report_markdown, write_plots
    from .judges import load_guard

    store = _store(args)
    version = store.load_version(args.policy, args.version)
    category = version.category(args.category) if args.category else version.categories[0]
    lm = _load(args, args.model or version.model.model_id, generating=False)  # sweeps: big batches
    check_compatible(version.model, lm.identity)
    pool = prompts_from_argument(args.heldout) if args.heldout else default_heldout()
    used = set(category.harmful)
    harmful = [p for p in pool if p not in used][: args.prompts]  # never the prompts the vectors were made from
    benign = datasets.benign_prompts(limit=args.benign, seed=11)
    if args.sweep:
        settings = SweepSettings(
            sweep_layers(lm.identity.n_layers, category.layer), tuple(args.strengths), args.max_new_tokens
        )
    else:
        settings = SweepSettings((category.layer,), (category.strength,), args.max_new_tokens)
    guard, guard_note = load_guard(args.judge)
    if args.judge and guard is None:
        print(f"note: {guard_note}", file=sys.stderr)
    bar = _Bar()
    try:
        result = evaluate(lm, category, harmful, benign, settings, guard, progress=bar)
    finally:
        bar.close()
    out = Path(args.out)
    plots = write_plots(result, out)
    (out / "report.md").write_text(report_markdown(result, plots))
    (out / "evaluation.json").write_text(json.dumps(result.to_dict(), indent=2))
    store.add_evaluation(version.policy, version.number, "sweep", result.to_dict(), author=args.author)
    summary = {
        "policy": version.policy,
        "version": version.number,
        "category": category.name,
        "recommended": result.recommended,
        "baseline": asdict(result.baseline),
        "at_recommended": asdict(result.cell(result.recommended["layer"], result.recommended["strength"])),
        "report": str(out / "report.md"),
        "judges": result.judges,
    }
    if args.json:
        _print_json(summary)
    else:
        print((out / "report.md").read_text())
    return 0


# --- parser ------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
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
    extract.add_argument("--method", choices=METHODS, default="mean-diff")
    extract.add_argument(
        "--prune-fraction", type=float, default=0.5, help="share of harmful examples kept by --method pruned"
    )
    extract.add_argument(
        "--batch-size", type=_positive_int, default=0, help="prompts per pass (default: 16 on a CPU, 64 on a GPU)"
    )
    extract.add_argument(
        "--out", type=Path, default=None, help="save the vectors here (default without --policy: vectors.safetensors)"
    )
    extract.add_argument("--policy", default=None, help="save the category as a new version of this policy")
    extract.add_argument(
        "--layer", type=int, default=None, help="with --policy: layer to apply at (default: recommended)"
    )
    extract.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help="with --policy: strength to apply at")
    extract.add_argument("--note", default="", help="with --policy: a change note")
    extract.set_defaults(handler=cmd_extract)

    gen = subcommand(commands, "generate", help="answer a prompt naive and steered, side by side")
    gen.add_argument("--vectors", type=Path, default=None, help="a vectors file written by `extract --out`")
    gen.add_argument(
        "--policy", default=None, help="a saved policy (all its categories at their saved layer and strength)"
    )
    gen.add_argument("--version", type=_positive_int, default=None, help="with --policy: version (default: latest)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--layer", type=int, default=None, help="with --vectors: layer (default: the recommended one)")
    gen.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help="with --vectors: strength")
    gen.add_argument(
        "--allow-negative", action="store_true", help="accept a negative --strength (steers toward the harmful side)"
    )
    gen.add_argument("--max-new-tokens", type=_positive_int, default=64)
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
    show.add_argument("--version", type=_positive_int, default=None)
    versions = subcommand(actions, "versions", help="list a policy's versions")
    versions.add_argument("name")
    diff = subcommand(actions, "diff", help="compare two versions")
    diff.add_argument("name")
    diff.add_argument("old", type=_positive_int)
    diff.add_argument("new", type=_positive_int)
    rollback = subcommand(actions, "rollback", help="save an old version again as the newest")
    rollback.add_argument("name")
    rollback.add_argument("number", type=_positive_int)
    rollback.add_argument("--note", default="")
    archive = subcommand(actions, "archive", help="hide a policy from lists (keeps everything)")
    archive.add_argument("name")
    archive.add_argument("--undo", action="store_true", help="unarchive")
    delete = subcommand(actions, "delete", help="delete a policy and all its versions")
    delete.add_argument("name")
    delete.add_argument("--confirm", default=None, help="repeat the policy name to confirm")
    audit = subcommand(actions, "audit", help="who did what, and when")
    audit.add_argument("name", nargs="?", default=None)
    audit.add_argument("--limit", type=_positive_int, default=50)
    audit.add_argument("--verify", action="store_true", help="recompute the tamper-evident hash chain")
    for sub in (create, listing, show, versions, diff, audit):
        sub.add_argument("--json", action="store_true", help="print JSON")
    for sub in (rollback, archive, delete):
        sub.set_defaults(json=False)
    policy.set_defaults(handler=cmd_policy)

    export = subcommand(commands, "export", help="export a policy version as a bundle or llama.cpp control vector")
    export.add_argument("--policy", required=True)
    export.add_argument("--version", type=_positive_int, default=None)
    export.add_argument("--out", required=True, type=Path)
    export.add_argument("--format", choices=("bundle", "llama-cpp"), default="bundle")
    export.set_defaults(handler=cmd_export)

    ev = subcommand(commands, "eval", help="measure a saved policy's effect on safety and quality (optionally a sweep)")
    ev.add_argument("--policy", required=True)
    ev.add_argument("--version", type=_positive_int, default=None)
    ev.add_argument("--category", default=None, help="which category (default: the first)")
    ev.add_argument("--judge", default=None, help="guard model id or folder (e.g. meta-llama/Llama-Guard-3-1B)")
    ev.add_argument("--sweep", action="store_true", help="try a layer x strength grid and recommend a point")
    ev.add_argument("--strengths", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ev.add_argument("--heldout", default=None, help="held-out harmful prompts (file or builtin:<area>)")
    ev.add_argument("--prompts", type=_positive_int, default=10, help="held-out harmful prompts to use")
    ev.add_argument("--benign", type=_positive_int, default=8, help="benign prompts to use")
    ev.add_argument("--max-new-tokens", type=_positive_int, default=32)
    ev.add_argument("--out", required=True, type=Path, help="folder for report.md, evaluation.json and plots")
    ev.add_argument("--json", action="store_true")
    with_model(ev, None)
    ev.set_defaults(handler=cmd_eval)

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
    except BrokenPipeError:  # `safesteer policy versions X | head`: the reader left; nothing is wrong
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so Python's own flush at exit does not fail again
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment problem: one line, the traceback only with -v
        if args.verbose:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: unexpected {type(exc).__name__}: {first} (run with -v for details)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
