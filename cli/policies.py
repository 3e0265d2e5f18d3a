"""`safesteer policy …`, `export`, `import` and `eval`: versioned policies and their evaluation."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safesteer.bundles import applied_to
from safesteer.errors import SafeSteerError
from safesteer.evaluation import SweepSettings, evaluate
from safesteer.identity import check_compatible
from safesteer.judges import load_guard
from safesteer.judges.reference import load_labelled
from safesteer.models import describe_model
from safesteer.policy import PolicyVersion
from safesteer.workflows import (
    evaluation_prompts,
    export_version,
    export_warning,
    import_bundle,
    sweep_layers,
    write_evaluation_files,
)

from .common import ProgressBar, load_for, open_store, print_json, prompts_from_argument


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
                "mode": c.mode,
                "gate": c.gate.summary() if c.gate is not None else None,
                "harmful_examples": len(c.harmful),
                "safe_examples": len(c.safe),
            }
            for c in version.categories
        ],
    }


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def cmd_policy(args: argparse.Namespace) -> int:
    store = open_store(args)
    action = args.action
    if action == "create":
        summary = store.create_policy(args.name, args.description, actor=args.author)
        print_json(asdict(summary)) if args.json else print(f"created policy {summary.name!r}")
    elif action == "list":
        rows = [asdict(p) for p in store.list_policies(include_archived=args.all)]
        print_json(rows) if args.json else print_table(
            rows, ["name", "versions", "latest", "archived", "created_by", "description"]
        )
    elif action == "show":
        data = _version_dict(store.load_version(args.name, args.version))
        if args.json:
            print_json(data)
        else:
            author = data["author"] or "?"
            print(f"{data['policy']} v{data['version']} by {author} at {data['created_at']}: {data['note']}")
            print_table(
                data["categories"],
                ["name", "layer", "strength", "mode", "recommended_layer", "harmful_examples", "safe_examples"],
            )
            for c in store.load_version(args.name, args.version).categories:
                print(f"{c.name}: steers {applied_to(c)}")
    elif action == "versions":
        rows = [asdict(v) for v in store.list_versions(args.name)]
        print_json(rows) if args.json else print_table(
            rows, ["number", "author", "created_at", "categories", "restored_from", "note"]
        )
    elif action == "diff":
        diff = store.diff(args.name, args.old, args.new).to_dict()
        if args.json:
            print_json(diff)
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
        print_json(asdict(check)) if args.json else print(f"audit log intact: {check.entries} entries")
    elif action == "audit":
        rows = [asdict(e) for e in store.audit_log(args.name, limit=args.limit)]
        print_json(rows) if args.json else print_table(rows, ["at", "actor", "action", "policy", "version", "detail"])
    return 0


def cmd_export(args: argparse.Namespace) -> int:

    version = open_store(args).load_version(args.policy, args.version)
    warning = export_warning(version, args.format)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    path = export_version(version, args.out, args.format, created_by=args.author)
    summary = {"policy": version.policy, "version": version.number, "format": args.format, "out": str(path)}
    print(json.dumps({**summary, "warning": warning} if warning else summary))
    return 0


def cmd_import(args: argparse.Namespace) -> int:

    path = Path(args.file)
    if not path.is_file():
        raise SafeSteerError(f"no such file: {path}")
    target = describe_model(args.model, args.precision or "nf4")
    store = open_store(args)
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


def cmd_eval(args: argparse.Namespace) -> int:

    store = open_store(args)
    version = store.load_version(args.policy, args.version)
    category = version.category(args.category) if args.category else version.categories[0]
    lm = load_for(args, args.model or version.model.model_id, generating=False)  # sweeps: big batches
    check_compatible(version.model, lm.identity)
    heldout = prompts_from_argument(args.heldout) if args.heldout else None
    options = tuple(dict.fromkeys(o for group in args.options or () for o in group)) or (category.options,)
    harmful, benign = evaluation_prompts(category, heldout, n_harmful=args.prompts, n_benign=args.benign)
    if args.sweep:
        settings = SweepSettings(
            sweep_layers(lm.identity.n_layers, category.layer), tuple(args.strengths), args.max_new_tokens, options
        )
    else:
        settings = SweepSettings((category.layer,), (category.strength,), args.max_new_tokens, options)
    judge, judge_note = load_guard(args.judge, args.judge_kind)
    if args.judge and judge is None:
        print(f"note: {judge_note}", file=sys.stderr)
    team_labels = load_labelled(args.labels) if args.labels else ()  # a bad file fails before any model loads
    bar = ProgressBar()
    try:
        reader = load_for(args, args.model or version.model.model_id, generating=True)  # reads answers faster
        result = evaluate(
            lm,
            category,
            harmful,
            benign,
            settings,
            judge,
            progress=bar,
            probe=not args.no_probe,
            reader=reader,
            team_labels=team_labels,
        )
    finally:
        bar.close()
    files = write_evaluation_files(result, Path(args.out))
    store.add_evaluation(version.policy, version.number, "sweep", result.to_dict(), author=args.author)
    summary = {
        "policy": version.policy,
        "version": version.number,
        "category": category.name,
        "recommended": result.recommended,
        "baseline": result.baseline.measures,
        "at_recommended": result.recommended_cell().measures,
        "report": str(files.report),
        "judges": result.judges,
    }
    if args.json:
        print_json(summary)
    else:
        print(files.report.read_text())
    return 0
