"""What a user would pick instead, measured on the same GPU, model, prompts and settings in one run.

steering-vectors and repeng work on the loaded transformers model itself, so all three share
one copy of the weights; ratios are taken within the run. repeng 0.4 still names `np.float_`,
which NumPy 2 removed: it is aliased to `np.float64` before import (its only incompatibility).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from gpu import Clock, interleaved
from timing import summary

from safesteer import SteeringSpec, extract_vectors
from safesteer.generation import generate_ids
from safesteer.vectors import ExtractionSettings

PROMPT_VECTORS = ExtractionSettings(method="mean-diff")  # what these figures have always timed: prompt vectors


def compare(lm, harmful: list[str], safe: list[str], args) -> dict[str, Any]:
    """Extraction (all layers, last token, mean difference) and steered decode: ours vs the peers."""
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # type: ignore[attr-defined]
    from repeng import ControlModel, ControlVector, DatasetEntry
    from steering_vectors import SteeringVector, mean_aggregator, train_steering_vector

    clock = Clock(str(lm.device))
    model, tokenizer = lm.model, lm.tokenizer
    n_layers = lm.architecture.n_layers
    chat_harmful = [lm.chat_text(p) for p in harmful]
    chat_safe = [lm.chat_text(p) for p in safe]
    pairs = list(zip(chat_safe, chat_harmful, strict=True))
    out: dict[str, Any] = {"prompts": 2 * len(pairs), "layers": n_layers}

    def repeat(fn) -> dict[str, float]:
        fn()  # warm-up
        return summary([clock.time(fn) for _ in range(args.repeats)])

    for batch in args.extraction_batches:
        settings = ExtractionSettings(method="mean-diff", batch_size=batch)
        out[f"safesteer_batch_{batch}_s"] = repeat(lambda s=settings: extract_vectors(lm, harmful, safe, s))
    for batch in args.extraction_batches:
        out[f"steering_vectors_batch_{batch}_s"] = repeat(
            lambda b=batch: train_steering_vector(
                model,
                tokenizer,
                pairs,
                layers=list(range(n_layers)),
                read_token_index=-1,
                aggregator=mean_aggregator(),
                show_progress=False,
                batch_size=b,
            )
        )
    control = ControlModel(model, list(range(1, n_layers)))
    dataset = [DatasetEntry(positive=s, negative=h) for s, h in pairs]
    for batch in args.extraction_batches:
        out[f"repeng_batch_{batch}_s"] = repeat(
            lambda b=batch: ControlVector.train(control, tokenizer, dataset, method="pca_diff", batch_size=b)
        )
    control.unwrap()

    ours = min(v["median"] for k, v in out.items() if k.startswith("safesteer_"))
    fastest_peer = min(v["median"] for k, v in out.items() if k.startswith(("steering_vectors_", "repeng_")))
    out["extraction_speedup_vs_fastest_peer"] = fastest_peer / ours

    vectors = extract_vectors(lm, harmful[:16], safe[:16], PROMPT_VECTORS)
    layer = n_layers // 2
    vector = vectors.vector(layer)
    spec = SteeringSpec(vector, layer, args.strength)
    prompt_ids = lm.encode([harmful[0]])
    tokens = args.new_tokens

    def hf_generate():
        with torch.inference_mode():
            return model.generate(
                **prompt_ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
            )

    sv = SteeringVector(layer_activations={layer: vector.to(lm.device, model.dtype)}, layer_type="decoder_block")

    def sv_steered():
        with sv.apply(model, multiplier=args.strength):
            return hf_generate()

    def ours(specs, rows=1, decoder="transformers"):
        return lambda: generate_ids(
            lm, [harmful[0]] * rows, specs, max_new_tokens=tokens, fixed_length=True, decoder=decoder
        )

    timings = interleaved(
        clock,
        {
            "transformers_plain": hf_generate,
            "steering_vectors_steered": sv_steered,
            "safesteer_plain": ours([]),
            "safesteer_steered": ours([spec]),
            "safesteer_side_by_side": ours([replace(spec, strength=(0.0, args.strength))], rows=2),
        },
        args.repeats,
    )
    out["generation"] = {name: {**t, "tokens_per_s": tokens / t["median"]} for name, t in timings.items()}
    return out
