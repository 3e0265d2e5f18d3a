"""Step 2: extract the category's vectors at every layer, with live progress and a separation plot."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import gradio as gr

from safesteer.extraction import distinct_others, extract_vectors
from safesteer.gates import DEFAULT_FPR
from safesteer.policy import suggested_point
from safesteer.text_gates import BaselineRates, baseline_rates
from safesteer.vectors import CategoryVectors, ExtractionSettings
from safesteer.workflows import other_categories_prompts

from .category import Draft, require_draft
from .gating import gate_plot, gate_summary
from .resources import BackgroundTask, plain_text, preview_model, ready_probe, studio_model, studio_store

log = logging.getLogger(__name__)


def separation_plot(vectors: CategoryVectors):
    """AUROC and effect size by layer, the recommended layer marked: where the category is most visible."""
    import matplotlib  # heavy, and only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy, and only plots need it

    layers = [s.layer for s in vectors.layer_stats]
    figure, left = plt.subplots(figsize=(7, 3.2), dpi=100)
    left.plot(layers, [s.auroc for s in vectors.layer_stats], marker="o", color="#4338ca", label="AUROC (held out)")
    left.set_xlabel("layer")
    left.set_ylabel("AUROC", color="#4338ca")
    left.set_ylim(0.4, 1.02)
    right = left.twinx()
    right.plot(layers, [s.effect_size for s in vectors.layer_stats], color="#059669", alpha=0.7, label="effect size")
    right.set_ylabel("effect size (d)", color="#059669")
    left.axvline(vectors.recommended_layer, color="#dc2626", linestyle="--")
    left.annotate(
        f"recommended: {vectors.recommended_layer}",
        (vectors.recommended_layer, 0.45),
        color="#dc2626",
        xytext=(4, 0),
        textcoords="offset points",
    )
    left.set_title(f"How well each layer separates '{vectors.category}' from safe prompts")
    figure.tight_layout()
    plt.close(figure)
    return figure


def extract(
    draft: Draft | None,
    method: str,
    site: str,
    token: str,
    prune_fraction: float,
    mode: str = "gated",
    gate_fpr: float = DEFAULT_FPR,
    policy: str | None = None,
    target: str = "refuse",
    progress: gr.Progress | None = None,
) -> Iterator[tuple[Any, ...]]:
    """Compute the category's vectors at every layer and its gate, streaming progress; recommend a layer."""
    category = require_draft(draft)
    settings = ExtractionSettings(
        site=site,  # type: ignore[arg-type]
        token=token,  # type: ignore[arg-type]
        method=method,  # type: ignore[arg-type]
        prune_fraction=float(prune_fraction),
        gate=mode != "none",
        gate_fpr=float(gate_fpr),
        target=target,  # type: ignore[arg-type]
    )
    settings.validate()
    others = other_categories_prompts(studio_store(), policy, category.name) if settings.gate else []
    task = BackgroundTask(
        lambda report: extract_vectors(
            studio_model(),
            category.harmful,
            category.safe,
            settings,
            category=category.name,
            progress=report,
            others=others,
            # the gate is read, and answer vectors are written, by the model that answers previews
            gate_lm=preview_model() if settings.gate or settings.method == "answers" else None,
        )
    )
    for line in task.lines(progress):
        yield gr.skip(), gr.skip(), f"Extracting: {plain_text(line)}", gr.skip(), gr.skip(), gr.skip()
    vectors = task.result()
    if vectors.gate is not None and mode == "always":
        vectors = vectors.with_gate(vectors.gate.with_mode("always"))
    baselines: tuple[BaselineRates, ...] = ()
    if vectors.gate is not None and vectors.gate.routed:
        yield gr.skip(), gr.skip(), "Extracting: comparing the gate with simple text classifiers", *(gr.skip(),) * 3
        distinct = distinct_others(category.harmful, category.safe, others)
        baselines = tuple(
            baseline_rates(category.harmful, category.safe, distinct, seed=settings.seed, fpr=settings.gate_fpr)
        )
    draft = replace(category, vectors=vectors, baselines=baselines)
    best = vectors.layer_stats[vectors.recommended_layer]
    elapsed = time.monotonic() - task.started
    point = suggested_point(vectors)
    answers = f"\n\nMade from {plain_text(vectors.answers.describe())}." if vectors.answers is not None else ""
    summary = (
        f"Vectors ready for all {vectors.n_layers} layers in {elapsed:.0f} s. Recommended layer "
        f"**{vectors.recommended_layer}** (held-out AUROC {best.auroc:.2f}). {plain_text(vectors.recommendation)}"
        f"{answers}\n\nThe preview starts at strength **{point.strength:g}**, steering "
        f"**{point.options.label()}**. Next: **3 · Preview**."
    )
    _warm_preview_model()
    gate = vectors.gate
    plot = gate_plot(gate) if gate is not None else None
    yield draft, separation_plot(vectors), summary, vectors.recommended_layer, plot, gate_summary(gate, baselines)


def layer_slider(draft: Draft | None) -> gr.Slider:
    """The layer slider's range for the extracted model, at the recommended layer."""
    if draft is None or draft.vectors is None:
        return gr.Slider()
    return gr.Slider(minimum=0, maximum=draft.vectors.n_layers - 1, value=draft.vectors.recommended_layer, step=1)


def suggested_controls(draft: Draft | None) -> tuple[Any, ...]:
    """The preview's strength and options set to where the extracted vectors' method starts (`suggested_point`)."""
    if draft is None or draft.vectors is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    point = suggested_point(draft.vectors)
    return point.strength, point.options.where, point.options.how, point.options.spread


def _warm_preview_model() -> None:
    """Load the preview model in the background while the author reads the plot, so the first preview is quick."""

    def load() -> None:
        try:
            preview_model()
            ready_probe()  # the preview's unsafe-attempt judge trains while the author reads the plot
        except Exception:  # the preview itself reports the problem when it is asked for
            log.warning("could not load the preview model in advance", exc_info=True)

    threading.Thread(target=load, name="warm-preview-model", daemon=True).start()
