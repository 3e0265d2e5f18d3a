"""The gate of the category in progress: its held-out rates, a score plot, and the author's threshold and mode."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import gradio as gr

from safesteer.errors import SafeSteerError
from safesteer.gates import Gate, check_mode
from safesteer.generation import GateVerdict
from safesteer.metrics import Interval, wilson_interval
from safesteer.text_gates import BaselineRates

from .category import Draft, require_draft

THRESHOLD_LIMIT = 100.0  # the threshold slider's outer bounds (app.py); scores beyond it fire always or never
GROUPS = (
    ("harmful", "this category (held out)", "#dc2626"),
    ("other", "other categories (held out)", "#d97706"),
    ("safe", "safe prompts (held out)", "#059669"),
)


def gate_plot(gate: Gate):
    """Held-out score distributions by group, the threshold marked: how far apart they are and where it cuts."""
    import matplotlib  # heavy, and only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy, and only plots need it

    figure, axes = plt.subplots(figsize=(7, 3.0), dpi=100)
    values = [v for name, _, _ in GROUPS for v in gate.scores.get(name, [])]
    low, high = (min(values), max(values)) if values else (-1.0, 1.0)
    bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 10
    for name, label, color in GROUPS:
        scores = gate.scores.get(name) or []
        if scores:
            axes.hist(scores, bins=bins, alpha=0.55, color=color, label=f"{label}: {len(scores)}")
    axes.axvline(gate.threshold, color="#111827", linestyle="--")
    # above the bars, in the axes' top margin, so the label never covers a bar
    axes.annotate(
        f"threshold {gate.threshold:.2f}",
        (gate.threshold, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(0, 3),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=8,
    )
    axes.set_xlabel("gate score (fires at or above the threshold)")
    axes.set_ylabel("prompts")
    axes.legend(fontsize=8)
    axes.set_title(f"Gate at layer {gate.layer}: scores of prompts it never trained on", pad=16)
    figure.tight_layout()
    plt.close(figure)
    return figure


def baselines_text(rates: Sequence[BaselineRates], gate: Gate) -> str:
    """The gate's held-out rates beside simple text classifiers' on the same prompts: what the gate adds."""
    if not rates:
        return ""
    own = gate.rates()
    lines = [
        "",
        "| on the same held-out prompts | catches harmful | fires on safe |",
        "| --- | --- | --- |",
        f"| **this gate** (the model's own reading) | **{own.catch_rate:.0%}** | **{own.false_positive_rate:.0%}** |",
    ]
    lines += [
        f"| {r.name}, trained on the same examples | {r.catch_rate:.0%} | {r.false_positive_rate:.0%} |" for r in rates
    ]
    lines.append(
        "\nHeld-out prompts come from the same files as the examples, where simple classifiers do well; on requests "
        "from other sources the gate's lead is larger (docs/gates.md)."
    )
    return "\n".join(lines)


def gate_summary(gate: Gate | None, baselines: Sequence[BaselineRates] = ()) -> str:
    """The gate's held-out rates at its threshold, in words an author can act on."""
    if gate is None:
        return "No gate: this category steers **every** prompt."
    rates = gate.rates()
    other = (
        f", {'steers' if gate.routed else 'fires on'} **{rates.other_categories_rate:.0%}** of other categories' "
        f"prompts ({rates.n_other})"
        if rates.other_categories_rate is not None
        else ""
    )
    mode = (
        "**gated**: only prompts the gate fires on are steered"
        if gate.mode == "gated"
        else "**always**: every prompt is steered (the gate is kept but not used)"
    )
    reads = ""
    if gate.routed:
        chooser = (
            "the one its router (the policy's categories told apart from each other) claims most"
            if gate.route is not None
            else "the closest one"
        )
        reads = (
            " It reads the whole prompt and recognises any of the policy's categories, plain or dressed up in"
            f" role-play; among the categories that recognise a prompt, {chooser} steers it."
        )
    caught = wilson_interval(round(rates.catch_rate * rates.n_harmful), rates.n_harmful)
    false = wilson_interval(round(rates.false_positive_rate * rates.n_safe), rates.n_safe)
    return (
        f"Gate (layer {gate.layer}, threshold {gate.threshold:.2f}): catches **{rates.catch_rate:.0%}** of held-out "
        f"harmful prompts ({rates.n_harmful}; 95% interval {caught.low:.0%}–{caught.high:.0%}), fires on "
        f"**{rates.false_positive_rate:.0%}** of held-out safe prompts ({rates.n_safe}; {false.low:.0%}–"
        f"{false.high:.0%}){other}: a split of the examples the gate did not learn from, apart from the prompts"
        f" step 1 kept for previews.{reads} Mode: {mode}."
        + target_text(gate.target_fpr, rates.false_positive_rate, false)
    ) + baselines_text(baselines, gate)


def target_text(target: float, measured: float, interval: Interval) -> str:
    """Why the held-out false-positive rate can miss the asked-for one, and why step 5 measures another."""
    if measured <= target + 1e-9:
        missed = ""
    elif interval.low <= target:
        missed = (
            f" The threshold was set for **{target:.0%}** false positives on the gate's own calibration prompts; "
            f"{measured:.0%} on these held-out ones is within sampling noise of it."
        )
    else:
        missed = (
            f" The threshold was set for **{target:.0%}** false positives on the gate's own calibration prompts; "
            f"these held-out prompts are harder for it ({measured:.0%}, beyond sampling noise): move the threshold "
            "up, or add safe examples like the ones it fires on."
        )
    return missed + (
        " An evaluation (step 5) measures the gate again on other prompts (held-out everyday requests, fewer "
        "of them), so its rates differ from these; compare them with their intervals."
    )


def _gate(draft: Draft | None) -> tuple[Draft, Gate]:
    draft = require_draft(draft, vectors=True)
    assert draft.vectors is not None
    if draft.vectors.gate is None:
        raise SafeSteerError("these vectors have no gate: extract again to train one")
    return draft, draft.vectors.gate


def threshold_slider(draft: Draft | None) -> Any:
    """The threshold slider spanning the held-out scores, at the calibrated threshold."""
    if draft is None or draft.vectors is None or draft.vectors.gate is None:
        return gr.Slider(visible=False)
    gate = draft.vectors.gate
    values = [v for name, _, _ in GROUPS for v in gate.scores.get(name, [])] + [gate.threshold]
    return gr.Slider(
        minimum=max(-THRESHOLD_LIMIT, round(min(values) - 0.5, 2)),
        maximum=min(THRESHOLD_LIMIT, round(max(values) + 0.5, 2)),
        value=round(gate.threshold, 2),
        step=0.01,
        visible=True,
    )


def move_threshold(draft: Draft | None, threshold: float) -> tuple[Draft, Any, str]:
    """Set the gate's threshold; the held-out rates and the plot follow."""
    draft, gate = _gate(draft)
    moved = gate.with_threshold(float(threshold))
    assert draft.vectors is not None
    return (
        replace(draft, vectors=draft.vectors.with_gate(moved)),
        gate_plot(moved),
        gate_summary(moved, draft.baselines),
    )


def set_mode(draft: Draft | None, mode: str) -> tuple[Draft, str]:
    """Gated (steer only what the gate fires on) or always (every prompt, as in the papers)."""
    if draft is None or draft.vectors is None or draft.vectors.gate is None:
        return gr.skip(), gr.skip()  # nothing extracted yet: the choice applies at extraction
    draft, gate = _gate(draft)
    changed = gate.with_mode(check_mode(mode))
    assert draft.vectors is not None
    return replace(draft, vectors=draft.vectors.with_gate(changed)), gate_summary(changed, draft.baselines)


def verdict_lines(
    names: Sequence[str], verdicts: Sequence[GateVerdict | None], idle: Sequence[bool] | None = None
) -> str:
    """One line per category for the preview: its gate's score and whether it steered this prompt.

    `idle`: per category, whether it steers nothing at all (strength 0), whatever its gate says.
    """
    lines = []
    for i, (name, verdict) in enumerate(zip(names, verdicts, strict=True)):
        if idle is not None and idle[i]:
            lines.append(f"- **{name}**: strength 0: not steered, so the answer is the naive one")
        elif verdict is None:
            lines.append(f"- **{name}**: always on (no gate in use): steered")
        elif verdict.fired:
            lines.append(f"- **{name}**: gate **fired** (score {verdict.score:.2f} ≥ {verdict.threshold:.2f}): steered")
        elif verdict.score >= verdict.threshold:
            lines.append(
                f"- **{name}**: the policy's gate recognised the prompt (score {verdict.score:.2f} ≥ "
                f"{verdict.threshold:.2f}), but it fits another category better: steered by that one, not this"
            )
        else:
            lines.append(
                f"- **{name}**: gate **did not fire** (score {verdict.score:.2f} < {verdict.threshold:.2f}): "
                "not steered, so the answer is the naive one"
            )
    return "\n".join(lines)
