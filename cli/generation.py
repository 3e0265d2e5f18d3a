"""`safesteer extract` and `safesteer generate`."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safesteer.errors import SafeSteerError
from safesteer.extraction import extract_vectors
from safesteer.generation import generate_side_by_side
from safesteer.identity import check_compatible
from safesteer.limits import check_layer, check_strength
from safesteer.models import LoadedModel
from safesteer.policy import PolicyCategory, category_spec, check_name, suggested_point
from safesteer.vectors import CategoryVectors, ExtractionSettings, check_prompt_counts
from safesteer.workflows import other_categories_prompts, save_category

from .common import ProgressBar, load_for, open_store, print_json, prompts_from_argument


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
        gate=args.mode != "none",
        gate_fpr=args.gate_fpr,
        gate_recipe=args.gate_recipe,
        target=args.target,
        answer_source=args.answer_source,
    )
    settings.validate()
    try:  # every cheap check before the model loads
        check_prompt_counts(harmful, safe)
    except SafeSteerError as exc:
        raise SafeSteerError(f"{exc}" + (f" (dropped: {'; '.join(dropped)})" if dropped else "")) from exc
    if args.policy:
        check_name("policy", args.policy)
        check_name("category", args.category)
        if args.strength is not None:
            check_strength(args.strength)
        if args.layer is not None:
            check_layer(args.layer)
    store = open_store(args) if args.policy else None  # open (and migrate) before the long work
    others = other_categories_prompts(store, args.policy, args.category) if store is not None else []
    bar = ProgressBar()
    try:
        started = time.perf_counter()
        lm = load_for(args, args.model, bar, generating=False)
        gate_lm = load_for(args, args.model, generating=True) if settings.gate else None  # what `generate` reads with
        loaded = time.perf_counter()
        result = extract_vectors(
            lm, harmful, safe, settings, category=args.category, progress=bar, others=others, gate_lm=gate_lm
        )
        finished = time.perf_counter()
    finally:
        bar.close()
    if result.gate is not None and args.mode == "always":
        result = result.with_gate(result.gate.with_mode("always"))
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
            strength=suggested_point(result).strength if args.strength is None else args.strength,
            options=args.steer,
        )

        def router_reader() -> LoadedModel:  # the model that reads the gates learns their routers
            return gate_lm or load_for(args, args.model, generating=True)

        saving = time.perf_counter()
        bar = ProgressBar()
        try:
            number = save_category(
                store, args.policy, category, router_reader, author=args.author, note=args.note, progress=bar
            )
        finally:
            bar.close()
        summary["saved"] = {"policy": args.policy, "version": number}
        summary["timing_s"]["save"] = round(time.perf_counter() - saving, 2)  # routers are learnt as it saves
    print_json(summary)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if bool(args.vectors) == bool(args.policy):
        raise SafeSteerError("give either --vectors FILE or --policy NAME")
    check_strength(args.strength, allow_negative=args.allow_negative)
    if args.policy:
        version = open_store(args).load_version(args.policy, args.version)
        model = version.model
        specs = version.steering_specs()
        names = [c.name for c in version.categories]
        described = {
            "policy": version.policy,
            "version": version.number,
            "categories": {
                c.name: {"layer": c.layer, "strength": c.strength, "mode": c.mode, **c.options.to_dict()}
                for c in version.categories
            },
        }
    else:
        vectors = CategoryVectors.load(args.vectors)
        layer = vectors.recommended_layer if args.layer is None else args.layer
        model = vectors.model
        specs = [category_spec(vectors, layer, args.strength, args.steer)]
        names = [vectors.category]
        described = {"layer": layer, "strength": args.strength, "mode": vectors.mode, **args.steer.to_dict()}
    lm = load_for(args, args.model or model.model_id, generating=True)
    check_compatible(model, lm.identity)
    started = time.perf_counter()
    side = generate_side_by_side(lm, args.prompt, specs, max_new_tokens=args.max_new_tokens)
    result = side.to_dict()
    result["gates"] = {
        name: {**asdict(verdict)} if verdict is not None else None
        for name, verdict in zip(names, side.gates, strict=True)
    }
    result["fired"] = [name for name, verdict in zip(names, side.gates, strict=True) if verdict and verdict.fired]
    elapsed = time.perf_counter() - started
    if args.json:
        print_json({**result, **described, "seconds": round(elapsed, 2)})
    else:
        print(f"--- naive ---\n{result['naive']}\n")
        print(f"--- steered ({json.dumps(described)}) ---\n{result['steered']}")
        for name, verdict in zip(names, side.gates, strict=True):
            if verdict is not None:
                said = "fired: steered" if verdict.fired else "did not fire: not steered"
                print(f"gate of {name!r}: score {verdict.score:.2f} vs threshold {verdict.threshold:.2f}, {said}")
    return 0


def vllm_options(given: list[str]) -> dict[str, Any]:
    """`--vllm-option NAME=VALUE` pairs: VALUE as JSON when it parses (numbers, true, lists), else text."""
    options: dict[str, Any] = {}
    for item in given:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise SafeSteerError(f"--vllm-option takes NAME=VALUE, not {item!r}")
        try:
            options[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[name.strip()] = value
    return options


def cmd_serve(args: argparse.Namespace) -> int:
    from safesteer.threads import serial_main_thread
    from server import ServeSettings, api_keys_from_env, create_app, run

    keys = api_keys_from_env()
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        raise SafeSteerError(f"set SAFESTEER_API_KEYS before serving on {args.host}: without keys anyone could call it")
    store = open_store(args)
    engine = None
    if args.engine == "vllm":  # vLLM runs the weights as they are; the gates read them at the same precision
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise SafeSteerError("--engine vllm needs vLLM installed (`make test-vllm` builds .venv-vllm with it)")
        from safesteer.models import model_location
        from safesteer.vllm_engine import VllmBatcher

        args.precision = args.precision or "fp32"
        location = Path(model_location(args.model))

        options = vllm_options(args.vllm_option)

        def engine(lm: Any, settings: Any) -> Any:  # create_app makes the engine when the server starts
            return VllmBatcher(lm, location, max_queue=settings.max_queue, engine_options=options)

    cores = serial_main_thread() if engine is None else None  # the batcher's worker computes, not this thread
    lm = load_for(args, args.model, generating=True)
    settings = ServeSettings(
        api_keys=keys,
        cores=cores,
        max_tokens_limit=args.max_tokens_limit,
        max_batch=args.max_batch,
        timeout_s=args.timeout,
        max_queue=args.max_queue,
        audit=args.audit or args.audit_prompts,
        audit_prompts=args.audit_prompts,
    )
    run(create_app(lm, store, settings, base_name=args.model_name, engine=engine), host=args.host, port=args.port)
    return 0
