"""Judges of answers: one interface (`base.Judge`), one registry (`JUDGES`), one module per judge.

- `degenerate`: loops, repetition, symbol runs, empty answers, boilerplate (text rules);
- `off_topic`: relevance to the prompt below what unsteered answers reach (embeddings);
- `refusal`: refusal phrases and soft deflections;
- `unsafe_attempt`: a guard model (`guard.GuardJudge`), a rubric judge (`rubric.RubricJudge`) or,
  offline, the response probe (`probe`), whichever the evaluation was given.

Each judge's agreement with blind reader labels is measured on the reference set (`reference`,
docs/judges.md) and guarded by tests.
"""

from .base import JUDGES, Answer, Judge, JudgeContext, Judgement, UnsafeJudge, judge_answers, register_judge
from .degenerate import DegenerateJudge
from .guard import GuardJudge, Verdict, llama_guard_prompt, load_guard, parse_guard_output
from .off_topic import OffTopicJudge
from .probe import UnsafeAttemptJudge, UnsafeProbe
from .refusal import REFUSAL_PHRASES, RefusalJudge, is_refusal, refusal_rate

__all__ = [
    "JUDGES",
    "REFUSAL_PHRASES",
    "Answer",
    "DegenerateJudge",
    "GuardJudge",
    "Judge",
    "JudgeContext",
    "Judgement",
    "OffTopicJudge",
    "RefusalJudge",
    "UnsafeAttemptJudge",
    "UnsafeJudge",
    "UnsafeProbe",
    "Verdict",
    "is_refusal",
    "judge_answers",
    "llama_guard_prompt",
    "load_guard",
    "parse_guard_output",
    "refusal_rate",
    "register_judge",
]
