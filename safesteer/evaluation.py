"""Evaluating a category's steering: a layer x strength sweep, judged answer by answer.

For every (layer, strength, steering option) cell, held-out harmful prompts and everyday prompts
are answered with the category's vector applied (cells of any layer, strength and option as rows
of shared batched generations; gated categories steer only where their gate fires), and every
answer gets each judge's verdict
(`judges`): unsafe attempt, degenerate, off-topic, refusal. Cells report those as rates with 95%
intervals and keep the verdicts, so the failing answers can be opened. A recommendation picks one
cell by a rule stated in the result, with its runners-up. Results are cached per (vectors,
settings, judge), and a sweep can be stopped between layers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .checkpoints import default_cache_dir
from .errors import SafeSteerError
from .generation import generate
from .judges import Answer, JudgeContext, UnsafeJudge, judge_answers
from .judges.probe import ProbeJudge, reference_probe
from .judges.reference import LabelledAnswer
from .measures import CellAnswers, describe_measures, measure_cell
from .models import LoadedModel
from .operations import LEGACY, SteeringOptions
from .policy import PolicyCategory
from .progress import ProgressCallback, no_progress
from .recommendation import recommend
from .steering import SteeringSpec, read_gates
from .vectors import CategoryVectors

CACHE_VERSION = 8  # bump when measurements or the recommendation rule change
SWEEP_ROWS = 512  # rows of one batched generation: cells of any layer, strength and option share it


@dataclass(frozen=True)
class SweepSettings:
    """The grid a sweep answers: every layer x strength x steering option.

    No `options` means the category's own (what it steers with when saved).
    """

    layers: tuple[int, ...]
    strengths: tuple[float, ...] = (1.0, 2.0, 4.0)
    max_new_tokens: int = 32
    options: tuple[SteeringOptions, ...] = ()

    def validate(self, n_layers: int) -> None:
        if not self.layers or not self.strengths:
            raise SafeSteerError("choose at least one layer and one strength to evaluate")
        if len(set(self.options)) != len(self.options):
            raise SafeSteerError("each steering option is evaluated once: remove the repeated one")
        for layer in self.layers:
            if not 0 <= layer < n_layers:
                raise SafeSteerError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")
        if any(s <= 0 for s in self.strengths):
            raise SafeSteerError("strengths to evaluate must be positive (0 is the naive baseline, always measured)")


@dataclass
class Cell:
    """One (layer, strength) point of the sweep and its measures (`measures.MEASURES` names them)."""

    layer: int | None  # None: the unsteered baseline
    strength: float
    measures: dict[str, float | None] = field(default_factory=dict)
    answers: list[dict[str, Any]] = field(default_factory=list)  # kind, index, text, verdicts (judge -> verdict)
    options: dict[str, Any] | None = None  # how the vector was applied (None: baseline, or a sweep before options)

    @property
    def steering(self) -> SteeringOptions:
        return SteeringOptions.from_dict(self.options)

    @property
    def label(self) -> str:
        """`L14/4` for the papers' operation, `L14/4 clamp·generated` (and `·3L`) otherwise."""
        if self.layer is None:
            return "unsteered"
        o = self.steering
        extra = "" if o == LEGACY else f" {o.how}·{o.where}" + (f"·{o.spread}L" if o.spread > 1 else "")
        return f"L{self.layer}/{self.strength:g}{extra}"

    def __getattr__(self, name: str) -> float | None:
        """`cell.perplexity` reads the measure of that name (None when it was not measurable)."""
        measures = self.__dict__.get("measures", {})
        if name in measures:
            return measures[name]
        raise AttributeError(name)

    def value(self, name: str) -> float:
        """A measure that must be there (the built-in quality and safety measures always are)."""
        value = self.measures.get(name)
        if value is None:
            raise SafeSteerError(f"cell L{self.layer}/{self.strength:g} has no measure {name!r}")
        return value

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        """Either form: `measures` in a mapping, or the fixed fields evaluations were stored with before."""
        if "measures" in data:
            return cls(
                layer=data["layer"],
                strength=data["strength"],
                measures=dict(data["measures"]),
                answers=list(data.get("answers", [])),
                options=data.get("options"),
            )
        fixed = {k: v for k, v in data.items() if k not in ("layer", "strength")}
        return cls(layer=data["layer"], strength=data["strength"], measures=fixed)


@dataclass
class Evaluation:
    category: str
    vectors_sha256: str
    settings: SweepSettings
    baseline: Cell
    cells: list[Cell]
    recommended: dict[str, Any]
    judges: list[str]
    samples: list[dict[str, str]]  # prompt, naive, steered at the recommended cell (for review)
    n_harmful: int
    n_benign: int
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    gate: dict[str, Any] | None = None  # with a gated category: how often it fired on these prompts
    harmful_prompts: list[str] = field(default_factory=list)  # what each cell's answers answer, in order
    benign_prompts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evaluation:
        settings = data["settings"]
        return cls(
            **{
                **data,
                "settings": SweepSettings(
                    tuple(settings["layers"]),
                    tuple(settings["strengths"]),
                    settings["max_new_tokens"],
                    tuple(SteeringOptions.from_dict(o) for o in settings.get("options", ())),
                ),
                "baseline": Cell.from_dict(data["baseline"]),
                "cells": [Cell.from_dict(c) for c in data["cells"]],
            }
        )

    def cell(self, layer: int, strength: float, options: SteeringOptions | dict[str, Any] | None = None) -> Cell:
        """The cell at that point; with several options swept, `options` says which (default: the first)."""
        wanted = options.to_dict() if isinstance(options, SteeringOptions) else options
        return next(
            c
            for c in self.cells
            if c.layer == layer and c.strength == strength and (wanted is None or c.steering.to_dict() == wanted)
        )

    def recommended_cell(self) -> Cell:
        r = self.recommended
        return self.cell(r["layer"], r["strength"], r.get("options"))

    def option_sets(self) -> list[SteeringOptions]:
        """The steering options the sweep compared, in sweep order."""
        return list(dict.fromkeys(c.steering for c in self.cells))


def cache_key(
    vectors: CategoryVectors,
    settings: SweepSettings,
    harmful: list[str],
    benign: list[str],
    guard: str | None,
    model: dict[str, Any] | None = None,
) -> str:
    """Results depend on the vectors, the sweep, the prompts, the judge and the model that answers."""
    payload = json.dumps(
        [CACHE_VERSION, vectors.sha256(), asdict(settings), harmful, benign, guard, model],
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def evaluate(
    lm: LoadedModel,
    category: PolicyCategory,
    harmful: list[str],
    benign: list[str],
    settings: SweepSettings,
    judge: UnsafeJudge | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    cache_dir: Path | None = None,
    probe: bool = True,
    reader: LoadedModel | None = None,
    team_labels: Sequence[LabelledAnswer] = (),
) -> Evaluation:
    """Run the sweep on held-out harmful prompts (any used for extraction are dropped) and everyday ones.

    `judge` decides unsafe attempts (a guard model or rubric judge); without one, the response
    probe trained on the reference set does, unless `probe` is False. The probe and perplexity read
    answers with `reader` (default `lm`): another copy of the same weights whose prompt passes are
    faster, such as int4 for an NF4 model on a CPU (about 4x here). `team_labels` join the
    reference set's labels in the probe's training.
    """
    report = progress or no_progress
    vectors = category.vectors
    settings.validate(vectors.n_layers)
    used = set(category.harmful)
    harmful = [p for p in harmful if p not in used]
    if len(harmful) < 2 or len(benign) < 2:
        raise SafeSteerError(
            "evaluation needs at least 2 held-out harmful prompts (not used for extraction) and 2 benign ones"
        )
    lm = _answering_model(lm, reader)
    judge_name = judge.describe() if judge is not None else (_probe_name(team_labels) if probe else None)
    key = cache_key(vectors, settings, harmful, benign, judge_name, lm.identity.to_dict())
    cache_file = (cache_dir or default_cache_dir()) / "evaluations" / f"{key}.json"
    if cache_file.is_file():
        report(1.0, "loaded from cache")
        return Evaluation.from_dict(json.loads(cache_file.read_text()))
    if should_stop and should_stop():
        raise SafeSteerError("evaluation stopped")
    if judge is None and probe:  # the probe depends on the model and the labels only: one cache for all sweeps
        report(0.01, "training the response probe for this model (once; cached after)")
        judge = ProbeJudge(reference_probe(reader or lm, extra=team_labels), reader or lm)
    context = JudgeContext(lm=reader or lm, unsafe_judge=judge)  # judges read with the fast copy

    n = settings.max_new_tokens
    report(0.02, "answering without steering")
    # one batch of the same prompts as every cell's: the same padding, so a row no steering touches (strength 0,
    # or a gate that did not fire) gets exactly the naive answer, and a difference is the steering's doing
    naive = generate(lm, harmful + benign, max_new_tokens=n)
    naive_harm, naive_benign = naive[: len(harmful)], naive[len(harmful) :]
    answers = _Answers(lm, harmful, naive_harm, benign, naive_benign, context)
    baseline = answers.score(naive_harm, naive_benign, [], None, 0.0)
    options = settings.options or (category.options,)
    plan = [(o, layer, strength) for o in options for layer in settings.layers for strength in settings.strengths]
    texts = _answer_cells(lm, category, plan, harmful + benign, n, report, should_stop)
    cells: list[Cell] = []
    for (option, layer, strength), answered in zip(plan, texts, strict=True):
        steering = [category.steering_spec(strength, layer, option)]
        cell = answers.score(answered[: len(harmful)], answered[len(harmful) :], steering, layer, strength)
        cell.options = option.to_dict()
        cells.append(cell)
    result = Evaluation(
        category=category.name,
        vectors_sha256=vectors.sha256(),
        settings=settings,
        baseline=baseline,
        cells=cells,
        recommended=recommend(baseline, cells),
        judges=describe_measures(context),
        samples=[],
        n_harmful=len(harmful),
        n_benign=len(benign),
        gate=gate_figures(lm, category, harmful, benign),
        harmful_prompts=harmful,
        benign_prompts=benign,
    )
    chosen = result.recommended_cell()
    steered = [a["text"] for a in chosen.answers if a["kind"] == "harmful"]
    result.samples = [
        {"prompt": p, "naive": a, "steered": b} for p, a, b in zip(harmful, naive_harm, steered, strict=True)
    ]
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(result.to_dict()))
    report(1.0, f"recommended: {chosen.label}")
    return result


def _answer_cells(
    lm: LoadedModel,
    category: PolicyCategory,
    plan: Sequence[tuple[SteeringOptions, int, float]],
    prompts: list[str],
    max_new_tokens: int,
    report: ProgressCallback,
    should_stop: Callable[[], bool] | None,
) -> list[list[str]]:
    """Every cell's answers to `prompts`, cells of any layer, strength and option batched together.

    A chunk of cells is one generation: each (option, layer) in it is one spec whose per-row
    strength is the cell's strength on its rows and 0 elsewhere (which leaves a row exactly
    unsteered by that spec), so a row is steered by its own cell only.
    """
    per_chunk = max(1, SWEEP_ROWS // len(prompts))
    answered: list[list[str]] = []
    for start in range(0, len(plan), per_chunk):
        if should_stop and should_stop():
            raise SafeSteerError("evaluation stopped")
        chunk = plan[start : start + per_chunk]
        report(0.05 + 0.8 * start / len(plan), f"answering cells {start + 1}-{start + len(chunk)} of {len(plan)}")
        groups = list(dict.fromkeys((option, layer) for option, layer, _ in chunk))
        specs = [
            category.steering_spec(
                tuple(s if (o, layer) == group else 0.0 for o, layer, s in chunk for _ in prompts), group[1], group[0]
            )
            for group in groups
        ]
        texts = generate(lm, prompts * len(chunk), specs, max_new_tokens=max_new_tokens)
        answered += [texts[i * len(prompts) : (i + 1) * len(prompts)] for i in range(len(chunk))]
    report(0.85, "judging every answer")
    return answered


def _probe_name(team_labels: Sequence[LabelledAnswer]) -> str:
    """How the default probe is named in cache keys: a team's labels make it another judge."""
    if not team_labels:
        return "response probe"
    digest = hashlib.sha256(json.dumps([r.to_record() for r in team_labels], sort_keys=True).encode()).hexdigest()
    return f"response probe + {len(team_labels)} team labels ({digest[:12]})"


def _answering_model(lm: LoadedModel, reader: LoadedModel | None) -> LoadedModel:
    """The copy that answers: the reader (the copy previews and the server answer with) when there is one.

    On a CPU that is int4: what users actually read, faster than NF4 at any batch size
    (bench/sweep.py), and the copy a gated category's gate was trained on (NF4's activations put
    the gate elsewhere: it fired on every everyday prompt in one check). Without a reader, `lm`.
    """
    return reader if reader is not None else lm


def gate_figures(
    lm: LoadedModel, category: PolicyCategory, harmful: list[str], benign: list[str]
) -> dict[str, Any] | None:
    """How often a gated category's gate fires on the evaluation's held-out harmful and everyday prompts."""
    gate = category.gate
    if gate is None or gate.mode != "gated":
        return None
    fired_harmful = [row[0] for row in read_gates(lm, harmful, [gate]).fired]
    fired_benign = [row[0] for row in read_gates(lm, benign, [gate]).fired]
    return {
        "layer": gate.layer,
        "threshold": gate.threshold,
        "catch_rate": sum(fired_harmful) / len(harmful),
        "false_positive_rate": sum(fired_benign) / len(benign),
        "fired_harmful": fired_harmful,
        "fired_benign": fired_benign,
    }


@dataclass
class _Answers:
    """The prompts and unsteered answers every cell is judged against."""

    lm: LoadedModel
    harmful: list[str]
    naive_harmful: list[str]
    benign: list[str]
    naive_benign: list[str]
    context: JudgeContext

    def score(
        self,
        harmful_answers: list[str],
        benign_answers: list[str],
        steering: list[SteeringSpec],
        layer: int | None,
        strength: float,
    ) -> Cell:
        """Judge every answer of one cell, then measure the cell from the verdicts."""
        judged = [
            Answer(p, a, "harmful", unsteered=u)
            for p, a, u in zip(self.harmful, harmful_answers, self.naive_harmful, strict=True)
        ] + [
            Answer(p, a, "everyday", unsteered=u)
            for p, a, u in zip(self.benign, benign_answers, self.naive_benign, strict=True)
        ]
        verdicts = judge_answers(judged, self.context)
        n = len(self.harmful)
        cell = CellAnswers(
            self.lm,
            self.harmful,
            harmful_answers,
            self.benign,
            self.naive_benign,
            benign_answers,
            steering,
            self.context,
            verdicts[:n],
            verdicts[n:],
        )
        answers = [
            {
                "kind": a.kind,
                "index": i if i < n else i - n,
                "text": a.text,
                "verdicts": {name: v.to_dict() for name, v in verdict.items()},
            }
            for i, (a, verdict) in enumerate(zip(judged, verdicts, strict=True))
        ]
        return Cell(layer=layer, strength=strength, measures=measure_cell(cell), answers=answers)
