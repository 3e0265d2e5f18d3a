"""One judge interface: a name, what it needs, and a verdict on each answer with the reason for it.

Evaluations report rates over many answers, but a rate is only as good as the verdicts behind it,
so every judge returns one `Judgement` per answer and the evaluation keeps them: a reviewer can
open the answers a judge flagged and read why. The registry (`JUDGES`) is what the sweep, the
report, the plots, the app and the CLI iterate, so a new judge is one module that calls
`register_judge`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from ..registry import register_new

if TYPE_CHECKING:
    from ..models import LoadedModel

AnswerKind = Literal["harmful", "everyday"]


@dataclass(frozen=True)
class Answer:
    """One answer to judge; `unsteered` is the same prompt's answer without steering, when known."""

    prompt: str
    text: str
    kind: AnswerKind = "harmful"
    unsteered: str | None = None


@dataclass(frozen=True)
class Judgement:
    """A judge's verdict on one answer: flagged or not, a score (higher = more so) and why."""

    flagged: bool
    score: float
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {"flagged": self.flagged, "score": round(self.score, 4), "reason": self.reason}


@dataclass
class JudgeContext:
    """What judges may use: the unsteered model that answers, and an unsafe-attempt judge if one was chosen."""

    lm: LoadedModel | None = None
    unsafe_judge: UnsafeJudge | None = None
    notes: dict[str, str] = field(default_factory=dict)  # judge name -> how it judged here


class Judge(Protocol):
    """A per-answer judge. `kinds` says which answers it reads; `needs` what must be there to run."""

    name: str
    title: str
    kinds: tuple[AnswerKind, ...]
    needs: tuple[str, ...]  # "model" (the unsteered model), "embedder", "labels", "guard"

    def available(self, context: JudgeContext) -> bool: ...

    def judge(self, answers: Sequence[Answer], context: JudgeContext) -> list[Judgement]: ...

    def describe(self, context: JudgeContext) -> str: ...


class UnsafeJudge(Protocol):
    """Anything that says whether answers attempt the harmful request: a guard model, a rubric judge, a probe."""

    name: str

    def judge_unsafe(self, answers: Sequence[Answer]) -> list[Judgement]: ...

    def describe(self) -> str: ...


JUDGES: dict[str, Judge] = {}


def register_judge(judge: Judge) -> Judge:
    """Add a judge to every evaluation from now on (its name must be new)."""
    return register_new(JUDGES, judge.name, judge, "judge")


def judge_answers(answers: Sequence[Answer], context: JudgeContext) -> list[dict[str, Judgement]]:
    """Every registered judge's verdict on every answer it applies to: one mapping per answer."""
    verdicts: list[dict[str, Judgement]] = [{} for _ in answers]
    for name, judge in JUDGES.items():
        picked = [i for i, a in enumerate(answers) if a.kind in judge.kinds]
        if not picked or not judge.available(context):
            continue
        for i, judgement in zip(picked, judge.judge([answers[i] for i in picked], context), strict=True):
            verdicts[i][name] = judgement
    return verdicts
