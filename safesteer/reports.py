"""An evaluation for people: heatmaps, the trade-off and frontier plots, the flagged answers, a Markdown report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .evaluation import Cell, Evaluation
from .measures import MEASURES
from .recommendation import EVERYDAY_DEGRADATION_MARGIN, HARMFUL_DEGRADATION_MARGIN, frontier, harmful_degradation


def write_plots(result: Evaluation, folder: Path) -> list[Path]:
    """A heatmap per judged rate (layer x strength) and the safety-vs-degradation trade-off, as PNG.

    A heatmap is drawn only when its rate varies across the sweep or differs from naive: a flat
    plot carries no information.
    """
    import matplotlib  # heavy, and only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy, and only plots need it

    folder.mkdir(parents=True, exist_ok=True)
    layers, strengths = list(result.settings.layers), list(result.settings.strengths)
    option = result.recommended_cell().steering  # with several options swept, the recommended one's grid
    paths = []
    for metric, measure in MEASURES.items():
        if not measure.plotted or result.baseline.measures.get(metric) is None:
            continue
        grid = np.array(
            [[result.cell(layer, s, option).measures.get(metric) for s in strengths] for layer in layers], dtype=float
        )
        if np.all(np.isclose(grid, result.baseline.value(metric))):
            continue
        figure, axes = plt.subplots(figsize=(1.2 + 1.1 * len(strengths), 1.0 + 0.5 * len(layers)), dpi=100)
        image = axes.imshow(grid, cmap="magma_r", aspect="auto", vmin=0.0, vmax=1.0)
        axes.set_xticks(range(len(strengths)), [f"{s:g}" for s in strengths])
        axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        axes.set_xlabel("strength")
        axes.set_ylabel("layer")
        for (i, j), value in np.ndenumerate(grid):
            # dark text on the pale end of the scale, white on the dark end: readable on every cell
            ink = "#111827" if np.isnan(value) or value < 0.5 else "white"
            axes.text(j, i, measure.format(value), ha="center", va="center", color=ink, fontsize=8)
        title = f"{measure.label}" + (f" ({option.label()})" if len(result.option_sets()) > 1 else "")
        axes.set_title(f"{title}\nunsteered: {measure.format(result.baseline.value(metric))}", fontsize=9)
        figure.colorbar(image, ax=axes)
        figure.tight_layout()
        path = folder / f"heatmap_{metric}.png"
        figure.savefig(path, bbox_inches="tight")  # long titles widen the image instead of being cut
        plt.close(figure)
        paths.append(path)
    if result.baseline.measures.get("unsafe_attempt_rate") is not None:
        paths.append(_tradeoff_plot(result, folder, plt))
        if len(result.option_sets()) > 1:
            paths.append(frontier_plot(result, folder, plt))
    return paths


def frontier_plot(result: Evaluation, folder: Path, plt: Any) -> Path:
    """Unsafe attempts against harmful answers' degradation: one frontier per steering option."""
    base = result.baseline
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
    for option in result.option_sets():
        line = frontier([c for c in result.cells if c.steering == option])
        xs = [harmful_degradation(base), *[harmful_degradation(c) for c in line]]
        ys = [base.value("unsafe_attempt_rate"), *[c.value("unsafe_attempt_rate") for c in line]]
        axes.step(xs, ys, where="post", marker="o", label=option.label(), alpha=0.8)
    axes.scatter([harmful_degradation(base)], [base.value("unsafe_attempt_rate")], color="#dc2626", zorder=5)
    axes.axvline(
        harmful_degradation(base) + 2 * HARMFUL_DEGRADATION_MARGIN,
        color="#9ca3af",
        linestyle="--",
        label="naive + 2x10 points",
    )
    axes.set_xlabel("harmful answers degenerate or off-topic (lower is better)")
    axes.set_ylabel("unsafe attempts (lower is better)")
    axes.set_xlim(-0.03, 1.03)
    axes.set_ylim(-0.03, 1.03)
    axes.legend(fontsize=7)
    axes.set_title(f"Best trade-off per steering option, '{result.category}' (red: unsteered)", fontsize=10)
    figure.tight_layout()
    path = folder / "frontier.png"
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    return path


def _tradeoff_plot(result: Evaluation, folder: Path, plt: Any) -> Path:
    """Unsafe attempts against degradation, one point per cell, with the recommendation's limits drawn."""
    base = result.baseline
    figure, panels = plt.subplots(1, 2, figsize=(10, 4), dpi=100, sharey=True)
    views = (
        ("harmful answers degenerate or off-topic", lambda c: c.value("degenerate_rate") + c.value("off_topic_rate")),
        ("everyday answers degraded", lambda c: c.value("everyday_degraded")),
    )
    limit_x = (
        base.value("degenerate_rate") + base.value("off_topic_rate") + 2 * HARMFUL_DEGRADATION_MARGIN,
        base.value("everyday_degraded") + EVERYDAY_DEGRADATION_MARGIN,
    )
    for axes, (title, x_of), limit in zip(panels, views, limit_x, strict=True):
        for c in result.cells:
            axes.scatter(x_of(c), c.value("unsafe_attempt_rate"), color="#4338ca", alpha=0.6, zorder=3)
            axes.annotate(c.label, (x_of(c), c.value("unsafe_attempt_rate")), fontsize=6)
        axes.scatter(x_of(base), base.value("unsafe_attempt_rate"), color="#dc2626", label="unsteered", zorder=4)
        best = result.recommended_cell()
        axes.scatter(
            x_of(best),
            best.value("unsafe_attempt_rate"),
            s=140,
            facecolors="none",
            edgecolors="#16a34a",
            linewidths=2.5,
            label="recommended",
            zorder=5,
        )
        axes.axvline(limit, color="#9ca3af", linestyle="--", label="quality limit (naive + margins)")
        axes.set_xlabel(f"{title} (lower is better)")
        axes.set_xlim(-0.03, 1.03)
        axes.set_ylim(-0.03, 1.03)
    panels[0].set_ylabel("unsafe attempts (lower is better)")
    panels[0].legend(fontsize=8)
    figure.suptitle(
        f"Trade-off for '{result.category}' (recommended, circled: {result.recommended_cell().label})", fontsize=10
    )
    figure.tight_layout()
    path = folder / "tradeoff.png"
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    return path


def failing_answers(result: Evaluation, cell: Cell, limit: int | None = None) -> list[dict[str, Any]]:
    """A cell's answers that a judge flagged, worst first: degenerate, off-topic, unsafe attempt, refusal."""
    order = ("degenerate", "off_topic", "unsafe_attempt", "refusal")
    failed = []
    for answer in cell.answers:
        flagged = [name for name in order if answer["verdicts"].get(name, {}).get("flagged")]
        if not flagged:
            continue
        prompts = result.harmful_prompts if answer["kind"] == "harmful" else result.benign_prompts
        failed.append(
            {
                "kind": answer["kind"],
                "prompt": prompts[answer["index"]] if answer["index"] < len(prompts) else "",
                "answer": answer["text"],
                "judges": flagged,
                "reason": "; ".join(f"{name}: {answer['verdicts'][name]['reason']}" for name in flagged),
                "rank": order.index(flagged[0]),
            }
        )
    failed.sort(key=lambda f: (f["rank"], f["kind"] != "everyday"))
    return failed[:limit] if limit is not None else failed


def _with_interval(measure: Any, value: float | None, result: Evaluation) -> str:
    interval = measure.interval(value, result.n_harmful, result.n_benign)
    if interval is None:
        return measure.format(value)
    return f"{measure.format(value)} ({interval.low:.0%}–{interval.high:.0%})"


def report_markdown(result: Evaluation, plots: list[Path] | None = None) -> str:
    b, r = result.baseline, result.recommended
    best = result.recommended_cell()
    every = [m for name, m in MEASURES.items() if any(c.measures.get(name) is not None for c in [b, *result.cells])]
    rates = [m for m in every if m.rate_of is not None]
    lines = [
        f"# Evaluation of '{result.category}'",
        "",
        f"{result.n_harmful} held-out harmful prompts, {result.n_benign} everyday prompts, "
        f"{result.settings.max_new_tokens} new tokens, greedy decoding. {result.created_at}.",
        "",
        f"**Recommended: layer {r['layer']}, strength {r['strength']:g}, steering {best.steering.label()}.** "
        f"Rule: {r['rule']}.",
    ]
    if r.get("runners_up"):
        lines.append(
            "Runners-up: "
            + ", ".join(c.get("label", f"L{c['layer']}/{c['strength']:g}") for c in r["runners_up"])
            + "."
        )
    lines += [
        "",
        "Rates are shares of answers a judge flagged, with 95% Wilson intervals.",
        "",
        "| | " + " | ".join(m.title for m in rates) + " |",
        "| --- |" + " --- |" * len(rates),
    ]
    for label, c in (("unsteered", b), (best.label, best)):
        lines.append(
            f"| {label} | " + " | ".join(_with_interval(m, c.measures.get(m.name), result) for m in rates) + " |"
        )
    if result.gate is not None:
        g = result.gate
        lines += [
            "",
            f"**Gated** (gate at layer {g['layer']}): it fired on {g['catch_rate']:.0%} of the held-out harmful "
            f"prompts and {g['false_positive_rate']:.0%} of the everyday prompts; only those were steered, so "
            "every figure below is measured with gating on.",
        ]
    lines += ["", "## Judges", "", *[f"- {j}" for j in result.judges], "", "## All cells", ""]
    lines += [
        "| layer | strength | steering | " + " | ".join(m.title for m in every) + " |",
        "| --- | --- | --- |" + " --- |" * len(every),
    ]
    for c in result.cells:
        lines.append(
            f"| {c.layer} | {c.strength:g} | {c.steering.label()} | "
            + " | ".join(m.format(c.measures.get(m.name)) for m in every)
            + " |"
        )
    failed = failing_answers(result, best, limit=12)
    if failed:
        lines += ["", "## Answers the judges flagged at the recommended point (worst first)", ""]
        for f in failed:
            lines += [
                f"- **{f['kind']}**: {f['prompt'][:120]}",
                f"  - answer: {f['answer'][:300]!r}",
                f"  - {f['reason']}",
            ]
    if plots:
        lines += ["", "## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots]]
    return "\n".join(lines) + "\n"
