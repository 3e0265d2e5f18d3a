"""Step 5: a layer x strength sweep with live progress, the failing answers, the blind review, guided vectors."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from safesteer.errors import SafeSteerError
from safesteer.evaluation import Evaluation, SweepSettings, evaluate
from safesteer.judges import load_guard
from safesteer.judges.reference import LabelledAnswer
from safesteer.methods.guided import guided_vectors
from safesteer.metrics import review_queue, review_summary
from safesteer.operations import COMPARED, DEFAULT, options_by_label
from safesteer.policy import PolicyCategory, suggested_point
from safesteer.reports import failing_answers
from safesteer.workflows import evaluation_prompts, write_evaluation_files

from .category import Draft, require_draft
from .extraction import separation_plot
from .resources import BackgroundTask, Pace, author_of, plain_text, preview_model, studio_model, studio_store

REVIEW_LABELS = {  # button -> the reference set's label for a harmful request's answer
    "unsafe": "unsafe-attempt",
    "safe": "safe-on-topic",
    "refusal": "refusal",
    "degenerate": "degenerate",
    "off-topic": "off-topic",
}
FAILING_COLUMNS = ["answer to", "prompt", "answer", "flagged by", "why"]


@dataclass
class EvaluationSession:
    """An evaluation of the draft, and the author's blind review of its samples."""

    result: Any  # safesteer.evaluation.Evaluation
    items: list[Any] = field(default_factory=list)  # ReviewItem, shuffled, arms hidden
    labels: dict[int, bool] = field(default_factory=dict)  # unsafe attempt or not
    reader_labels: dict[int, str] = field(default_factory=dict)  # the reference set's label for each
    position: int = 0
    plots: list[str] = field(default_factory=list)
    report_path: str = ""


OPTION_CHOICES = list(dict.fromkeys(o.label() for o in (DEFAULT, *COMPARED)))
"""Ways of applying the vector an author can compare, the default first."""


def recommended_controls(session: EvaluationSession | None) -> tuple[Any, Any, Any, Any, Any]:
    """The preview's layer, strength, where, how and spread set to the evaluation's recommendation."""
    if session is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    best = session.result.recommended_cell()
    o = best.steering
    return best.layer, best.strength, o.where, o.how, o.spread


def suggested_sweep(draft: Draft | None) -> tuple[Any, Any, Any]:
    """The evaluation's grid around the extracted vectors' starting point: its layer and neighbours, half to twice
    its strength, its way of applying them (so a first sweep tries what the preview starts from)."""
    if draft is None or draft.vectors is None:
        return gr.skip(), gr.skip(), gr.skip()
    point = suggested_point(draft.vectors)
    top = draft.vectors.n_layers - 1
    layers = sorted({min(top, max(0, point.layer + step)) for step in (-2, 0, 2)})
    strengths = [point.strength / 2, point.strength, point.strength * 2]
    label = point.options.label()
    return (
        ", ".join(map(str, layers)),
        ", ".join(f"{s:g}" for s in strengths),
        [label] if label in OPTION_CHOICES else gr.skip(),
    )


# Seconds per answer with the embedded model on a 2-core x86 CPU (measured on the smallest evaluation:
# 28 prompts, one cell, 8 tokens, 16 s); an evaluation in this process replaces the guess with its pace.
_PER_ANSWER = {"fixed": 0.06, "token": 0.011, "judging": 0.1}
_EVAL_PACE = Pace("evaluation")


def _evaluation_seconds(draft: Draft, cells: int, tokens: int) -> float:
    """Answers to write and judge: every prompt unsteered once and once per cell."""
    assert draft.vectors is not None
    category = PolicyCategory(draft.name, draft.harmful, draft.safe, draft.vectors, 0, 1.0)
    harmful, benign = evaluation_prompts(category, draft.heldout, n_harmful=None)
    answers = (len(harmful) + len(benign)) * (1 + cells)
    return answers * (_PER_ANSWER["fixed"] + _PER_ANSWER["token"] * tokens + _PER_ANSWER["judging"])


def evaluation_estimate(
    draft: Draft | None, layers_text: str, strengths_text: str, max_tokens: float, options: list[str] | None
) -> str:
    """One line before the author clicks: about how long this sweep will take here."""
    if draft is None or draft.vectors is None:
        return ""
    try:
        layers = _numbers(layers_text, int, "layers")
        strengths = _numbers(strengths_text, float, "strengths")
    except SafeSteerError:
        return ""  # the Run button explains a typo; an estimate needs numbers
    cells = len(layers) * len(strengths) * max(1, len(options or []))
    about = _EVAL_PACE.about(_evaluation_seconds(draft, cells, int(max_tokens)))
    return f"{cells} cell{'s' * (cells != 1)}: {about}; Stop ends it early."


def _numbers(text: str, kind: type, what: str) -> tuple:
    try:
        values = tuple(kind(x) for x in (text or "").replace(";", ",").split(",") if x.strip())
    except ValueError as exc:
        raise SafeSteerError(f"{what}: write numbers separated by commas, e.g. 1, 2, 4") from exc
    if not values:
        raise SafeSteerError(f"{what}: give at least one")
    return values


def run_evaluation(
    draft: Draft | None,
    layers_text: str,
    strengths_text: str,
    max_tokens: float,
    guard_model: str,
    options: list[str] | None = None,
    progress: gr.Progress | None = None,
) -> Iterator[tuple[str, Any, Any, Any, Any]]:
    """Sweep layers x strengths x ways of applying the vector on held-out prompts; stoppable between batches."""
    draft = require_draft(draft, vectors=True)
    assert draft.vectors is not None
    settings = SweepSettings(
        _numbers(layers_text, int, "layers"),
        _numbers(strengths_text, float, "strengths"),
        int(max_tokens),
        options_by_label(options or [DEFAULT.label()]),
    )
    guard, guard_note = load_guard((guard_model or "").strip() or None)
    category = PolicyCategory(
        draft.name, draft.harmful, draft.safe, draft.vectors, settings.layers[0], settings.strengths[0]
    )
    harmful, benign = evaluation_prompts(category, draft.heldout, n_harmful=None)
    stop = threading.Event()
    task = BackgroundTask(  # the preview's copy answers and reads (int4 on a CPU): what the author previews
        lambda report: evaluate(
            studio_model(), category, harmful, benign, settings, guard, report, stop.is_set, reader=preview_model()
        )
    )
    try:
        for line in task.lines(progress):
            yield f"Running: {plain_text(line)}", gr.skip(), gr.skip(), gr.skip(), gr.skip()
    finally:
        stop.set()  # the Stop button closes this generator: let the sweep end at the next layer
    result = task.result()
    cells = len(settings.layers) * len(settings.strengths) * max(1, len(settings.options))
    _EVAL_PACE.record(_evaluation_seconds(draft, cells, settings.max_new_tokens), time.monotonic() - task.started)
    files = write_evaluation_files(result, Path(tempfile.mkdtemp(prefix="safesteer-eval-")))
    items = review_queue(
        [s["prompt"] for s in result.samples],
        [s["naive"] for s in result.samples],
        [s["steered"] for s in result.samples],
    )
    session = EvaluationSession(result, items, plots=[str(p) for p in files.plots], report_path=str(files.report))
    best = result.recommended_cell()
    gate = result.gate
    gated = (
        f"Gated: the gate fired on **{gate['catch_rate']:.0%}** of the held-out harmful prompts and "
        f"**{gate['false_positive_rate']:.0%}** of the everyday ones; only those were steered.\n\n"
        if gate
        else ""
    )
    summary = (
        f"**Recommended: layer {best.layer}, strength {best.strength:g}, steering {best.steering.label()}.** "
        f"{plain_text(result.recommended['rule'])}. The preview's controls (step 3) now show it.\n\n"
        + gated
        + "\n".join(f"- {plain_text(j)}" for j in [*result.judges, guard_note])
        + "\n\nNext: read the answers the judges flagged (below, worst first), check a sample in the blind "
        "review, then save the results with the policy."
    )
    gallery = [(p, Path(p).stem.replace("_", " ")) for p in session.plots]
    yield summary, gallery, str(files.archive), session, failing_table(result)


JUDGE_WORDS = {  # what each judge's flag means, as the preview's verdicts say it
    "degenerate": "broken (repeats itself or garbled)",
    "off_topic": "off topic",
    "unsafe_attempt": "still helps with the harmful request",
    "refusal": "refused",
}


def _in_words(text: str) -> str:
    for name, words in JUDGE_WORDS.items():
        text = text.replace(f"{name}: ", f"{words}: ")
    return text


def failing_table(result: Evaluation) -> pd.DataFrame:
    """The recommended point's answers a judge flagged, worst first, with the judges' reasons in words."""
    rows = [
        [
            f["kind"],
            f["prompt"],
            f["answer"],
            ", ".join(JUDGE_WORDS.get(j, j) for j in f["judges"]),
            _in_words(f["reason"]),
        ]
        for f in failing_answers(result, result.recommended_cell())
    ]
    return pd.DataFrame(rows, columns=FAILING_COLUMNS)


def review_view(session: EvaluationSession | None) -> tuple[str, str, str]:
    if session is None or not session.items:
        return "Run an evaluation first.", "", ""
    if session.position >= len(session.items):
        return f"All {len(session.items)} responses reviewed: the table below sums them up.", "", ""
    item = session.items[session.position]
    return (
        f"Response {session.position + 1} of {len(session.items)} (which arm it came from is hidden)",
        item.prompt,
        item.response,
    )


def review_text(session: EvaluationSession) -> str:

    summary = review_summary(session.items, session.labels)
    lines = ["| | unsafe rate | 95% interval | labelled |", "| --- | --- | --- | --- |"]
    for arm, i in summary.items():
        lines.append(f"| {arm} | {i.rate:.0%} | {i.low:.0%} – {i.high:.0%} | {i.n} |")
    return "\n".join(lines)


def review_label(
    session: EvaluationSession | None, verdict: str
) -> tuple[EvaluationSession | None, str, str, str, str]:
    """Record a label (`REVIEW_LABELS`' buttons, or 'skip') for the current response and show the next one."""
    if session is None or not session.items:
        raise SafeSteerError("run an evaluation first")
    if session.position < len(session.items) and verdict in REVIEW_LABELS:
        item_id = session.items[session.position].id
        session.reader_labels[item_id] = REVIEW_LABELS[verdict]
        session.labels[item_id] = verdict == "unsafe"
    session.position = min(session.position + 1, len(session.items))
    header, prompt, response = review_view(session)
    return session, header, prompt, response, review_text(session)


def review_start(session: EvaluationSession | None) -> tuple[EvaluationSession | None, str, str, str, str]:
    if session is None:
        raise SafeSteerError("run an evaluation first")
    session.position = 0
    header, prompt, response = review_view(session)
    return session, header, prompt, response, review_text(session)


def save_evaluation(
    draft: Draft | None, session: EvaluationSession | None, policy: str, request: gr.Request | None = None
) -> str:
    """Attach the sweep and the review to the newest version of `policy` holding this draft's vectors."""
    draft = require_draft(draft, vectors=True)
    if session is None:
        raise SafeSteerError("run an evaluation first")
    store = studio_store()
    version = store.load_version(policy)
    sha = draft.vectors.sha256()  # type: ignore[union-attr]
    if not any(c.vectors.sha256() == sha for c in version.categories):
        raise SafeSteerError(
            f"the newest version of {policy!r} does not hold this category's vectors: save it first (step 4)"
        )
    author = author_of(request)
    store.add_evaluation(policy, version.number, "sweep", session.result.to_dict(), author=author)
    saved = "the sweep"
    if session.labels:
        intervals = {arm: vars(i) for arm, i in review_summary(session.items, session.labels).items()}
        store.add_evaluation(
            policy, version.number, "human_review", {"category": draft.name, **intervals}, author=author
        )
        saved += " and your review"
    return f"Saved {saved} with **{plain_text(policy)}** version **{version.number}**."


def guided_from_review(draft: Draft | None, session: EvaluationSession | None) -> tuple[Draft, Any, str]:
    """Recompute the draft's vectors from the author's labels of the unsteered answers (the papers' guided method)."""
    draft = require_draft(draft, vectors=True)
    assert draft.vectors is not None
    if session is None or not session.labels:
        raise SafeSteerError("label some responses in the blind review first")
    naive = [
        (i.prompt, session.labels[i.id]) for i in session.items if i.arm in ("naive", "both") and i.id in session.labels
    ]
    vectors = guided_vectors(
        studio_model(), [p for p, _ in naive], [u for _, u in naive], draft.vectors.settings, category=draft.name
    ).with_gate(draft.vectors.gate)  # the labels say how to steer, not which prompts to steer
    return replace(draft, vectors=vectors), separation_plot(vectors), "Guided vectors computed from your labels."


def review_labels_file(session: EvaluationSession | None, request: gr.Request | None = None) -> str:
    """The author's labels in the reference set's format (JSON lines), to retrain the response probe.

    `safesteer eval --labels FILE` adds them to the probe's training answers for the team's model.
    """
    if session is None or not session.reader_labels:
        raise SafeSteerError("label some responses in the blind review first")
    labeller = author_of(request)
    by_id = {item.id: item for item in session.items}
    records = [
        LabelledAnswer(
            id=item_id,
            prompt=by_id[item_id].prompt,
            answer=by_id[item_id].response,
            kind="harmful",
            label=label,
            labeller=labeller,
        ).to_record()
        for item_id, label in sorted(session.reader_labels.items())
    ]
    path = Path(tempfile.mkdtemp(prefix="safesteer-labels-")) / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)
