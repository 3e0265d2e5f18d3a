"""Step 2: extract the category's vectors at every layer, with live progress and a separation plot."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import gradio as gr

from safesteer.datasets import edgy_benign_prompts
from safesteer.extraction import distinct_others, extract_vectors, gate_negatives_ready, pool_ready
from safesteer.gates import DEFAULT_FPR
from safesteer.policy import suggested_point
from safesteer.text_gates import baseline_rates
from safesteer.vectors import CategoryVectors, ExtractionSettings
from safesteer.workflows import other_categories_prompts

from .category import Draft, require_draft
from .gating import gate_plot, gate_summary
from .resources import (
    BackgroundTask,
    Pace,
    plain_text,
    preview_model,
    preview_model_if_loaded,
    ready_probe,
    studio_model,
    studio_store,
)

log = logging.getLogger(__name__)


def heldout_per_side(vectors: CategoryVectors) -> int:
    """How many prompts of the smaller side scored each layer (the rest made the vectors)."""
    n = min(vectors.n_harmful, vectors.n_safe)
    return min(n - 2, max(1, round(n * vectors.settings.heldout_fraction)))


NOISY_BELOW = 10
"""Held-out prompts per side under which the separation curve jumps from layer to layer by chance."""


def separation_plot(vectors: CategoryVectors):
    """AUROC and effect size by layer, the recommended and the best-separating layers marked, and why they differ."""
    import matplotlib  # heavy, and only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy, and only plots need it

    layers = [s.layer for s in vectors.layer_stats]
    aurocs = [s.auroc for s in vectors.layer_stats]
    figure, left = plt.subplots(figsize=(7, 3.6), dpi=100)
    left.plot(layers, aurocs, marker="o", color="#4338ca", label="AUROC (held out)")
    left.set_xlabel("layer")
    left.set_ylabel("AUROC", color="#4338ca")
    left.set_ylim(0.4, 1.02)
    right = left.twinx()
    right.plot(layers, [s.effect_size for s in vectors.layer_stats], color="#059669", alpha=0.7, label="effect size")
    right.set_ylabel("effect size (d)", color="#059669")
    chosen = vectors.recommended_layer
    best = max(layers, key=lambda layer: (aurocs[layer], -abs(layer - chosen)))
    left.axvline(chosen, color="#dc2626", linestyle="--")
    left.annotate(f"recommended: {chosen}", (chosen, 0.45), color="#dc2626", xytext=(4, 0), textcoords="offset points")
    if best != chosen:
        left.plot([best], [aurocs[best]], marker="*", markersize=14, color="#f59e0b", zorder=5)
        left.annotate(
            f"separates best: {best}",
            (best, aurocs[best]),
            color="#b45309",
            xytext=(-10, -16),
            textcoords="offset points",
        )
    why = (
        "answer vectors: a measured share of depth steers best; they separate at nearly every layer"
        if vectors.settings.method == "answers"
        else "middle layers steer best; the layer that separates best can break answers"
    )
    n = heldout_per_side(vectors)
    noisy = f"\nonly {n} held-out prompts per side: the curve is noisy" if n < NOISY_BELOW else ""
    left.set_title(f"How well each layer separates '{vectors.category}' from safe prompts\n({why}){noisy}", fontsize=9)
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
    loaded = preview_model_if_loaded()  # not loaded here: the work below loads it, with a progress line
    ready = not settings.gate or (loaded is not None and gate_negatives_ready(loaded, category.safe, settings))
    pooled = settings.gate and loaded is not None and pool_ready(loaded, category.harmful, others, settings)
    planned = _work_seconds(settings, category, others, ready, pooled)

    def work(report: Callable[[float, str], None]) -> CategoryVectors:
        report(0.0, "loading the model (once per start of the studio)")
        lm = studio_model()
        # the gate is read, and answer vectors are written, by the model that answers previews
        gate_lm = preview_model() if settings.gate or settings.method == "answers" else None
        return extract_vectors(
            lm,
            category.harmful,
            category.safe,
            settings,
            category=category.name,
            progress=report,
            others=others,
            gate_lm=gate_lm,
        )

    task = BackgroundTask(work)
    for line in task.lines(progress):
        yield gr.skip(), gr.skip(), f"Extracting: {plain_text(line)}", gr.skip(), gr.skip(), gr.skip()
    vectors = task.result()
    if vectors.gate is not None and mode == "always":
        vectors = vectors.with_gate(vectors.gate.with_mode("always"))
    draft = replace(category, vectors=vectors)
    best = vectors.layer_stats[vectors.recommended_layer]
    elapsed = time.monotonic() - task.started
    _PACE.record(planned, elapsed)
    point = suggested_point(vectors)
    answers = f"\n\nMade from {plain_text(vectors.answers.describe())}." if vectors.answers is not None else ""
    n_heldout = heldout_per_side(vectors)
    noisy = (
        f"\n\nOnly **{n_heldout}** held-out prompts per side scored the layers, so the plot jumps by chance; "
        "more examples make it steadier."
        if n_heldout < NOISY_BELOW
        else ""
    )
    writer = preview_model_if_loaded() if settings.method == "answers" else None
    precision = (writer.identity.precision if writer is not None else vectors.model.precision) + " weights"
    summary = (
        f"Vectors ready for all {vectors.n_layers} layers in {elapsed:.0f} s, made with the model's {precision}. "
        f"Recommended layer "
        f"**{vectors.recommended_layer}** (held-out AUROC {best.auroc:.2f}). {plain_text(vectors.recommendation)}"
        f"{answers}\n\nThe preview starts at strength **{point.strength:g}**, steering "
        f"**{point.options.label()}**. Next: **3 · Preview**.{noisy}"
    )
    _warm_preview_model()
    gate = vectors.gate
    plot = gate_plot(gate) if gate is not None else None
    figure = separation_plot(vectors)
    if gate is None or not gate.routed:
        yield draft, figure, summary, vectors.recommended_layer, plot, gate_summary(gate, ())
        return
    # the plots first; the text classifiers the gate is compared with take a few seconds more
    waiting = gate_summary(gate, ()) + "\n\n*Comparing the gate with simple text classifiers…*"
    yield draft, figure, summary, vectors.recommended_layer, plot, waiting
    distinct = distinct_others(category.harmful, category.safe, others)
    baselines = tuple(
        baseline_rates(category.harmful, category.safe, distinct, seed=settings.seed, fpr=settings.gate_fpr)
    )
    # every output again: an API client reads the last message alone
    yield (
        replace(draft, baselines=baselines),
        figure,
        summary,
        vectors.recommended_layer,
        plot,
        gate_summary(gate, baselines),
    )


# Seconds per unit of work with the embedded model on a 2-core x86 CPU (measured: `make bench`'s
# machine); an extraction in this process replaces the guess with this machine's own pace.
_SECONDS = {"answer": 0.8, "record": 0.025, "gate_record": 0.04, "fixed": 5.0}
_PACE = Pace("extraction")


def _work_seconds(
    settings: ExtractionSettings, category: Draft, others: list[str], negatives_ready: bool, pool_ready: bool = False
) -> float:
    """What an extraction costs at the reference pace: answers, recordings, the gate's recordings, training."""
    seconds = _SECONDS["fixed"]
    if settings.method == "answers":
        seconds += min(settings.answer_prompts, len(set(category.harmful))) * _SECONDS["answer"]
    else:
        seconds += (len(category.harmful) + len(category.safe)) * _SECONDS["record"]
    if settings.gate:
        if not pool_ready:
            pool = len(set(category.harmful) | set(others))
            seconds += 2 * pool * _SECONDS["gate_record"]
        if not negatives_ready:
            negatives = 2 * len(set(category.safe)) + len(edgy_benign_prompts(part="training"))
            seconds += negatives * _SECONDS["gate_record"]
    return seconds


def extraction_estimate(draft: Draft | None, method: str, mode: str, policy: str | None = None) -> str:
    """One line before the author clicks: about how long extraction will take here, and why."""
    if draft is None:
        return ""
    settings = ExtractionSettings(method=method, gate=mode != "none")  # type: ignore[arg-type]
    others = other_categories_prompts(studio_store(), policy, draft.name) if settings.gate else []
    gate_lm = preview_model_if_loaded()
    ready = gate_lm is not None and gate_negatives_ready(gate_lm, draft.safe, settings)
    pooled = settings.gate and gate_lm is not None and pool_ready(gate_lm, draft.harmful, others, settings)
    text = f"Extraction will take {_PACE.about(_work_seconds(settings, draft, others, ready, pooled))}"
    if settings.gate and not ready:
        text += "; the gate's safe and edgy examples are recorded once per model, later extractions skip them"
    if others:
        text += (
            f"; the gate also learns from the other categories of the policy **{plain_text(policy or '')}** "
            f"chosen in step 4 ({len(set(others))} prompts)"
        )
    elif settings.gate and not policy and studio_store().list_policies():
        text += "; to add this category to a saved policy, choose the policy in step 4 first: its gate then learns"
        text += " to tell this category from the policy's others"
    return text + "."


def method_controls(method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Show only the settings the chosen method reads: pruning for `pruned`, the target for `answers`."""
    return gr.update(visible=method == "pruned"), gr.update(visible=method == "answers")


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
