"""Step 3: naive and steered answers side by side, streamed, for one prompt or a batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import gradio as gr
import pandas as pd

from safesteer.answer_verdicts import describe_answer, steering_effect
from safesteer.errors import SafeSteerError
from safesteer.gates import GateReading
from safesteer.generation import GateVerdict, generate, generate_stream, verdicts
from safesteer.identity import check_compatible
from safesteer.judges.base import AnswerKind
from safesteer.operations import DEFAULT, SteeringOptions
from safesteer.policy import category_spec
from safesteer.steering import SteeringSpec

from .category import Draft, require_draft, steering_options
from .gating import verdict_lines
from .resources import MAX_BATCH_PROMPTS, preview_model, ready_probe, studio_model, studio_store


def draft_spec(
    draft: Draft,
    layer: float,
    strength: float,
    rows: tuple[float, ...] | None = None,
    options: SteeringOptions = DEFAULT,
) -> SteeringSpec:
    vectors = draft.vectors
    assert vectors is not None
    return category_spec(vectors, int(layer), rows if rows is not None else float(strength), options)


def _saved_specs(
    draft: Draft, policy: str | None, names: list[str] | None, steered_rows: list[bool]
) -> tuple[list[str], list[SteeringSpec]]:
    """Names and specs of saved categories active together with the draft (the draft wins over a same-named one)."""
    if not policy or not names:
        return [], []
    version = studio_store().load_version(policy)
    check_compatible(version.model, studio_model().identity)
    chosen = [c for c in version.categories if c.name in names and c.name != draft.name]
    specs = [c.steering_spec(tuple(c.strength if steered else 0.0 for steered in steered_rows)) for c in chosen]
    return [c.name for c in chosen], specs


def preview(
    draft: Draft | None,
    prompt: str,
    layer: float,
    strength: float,
    max_tokens: float,
    policy: str | None = None,
    also_apply: list[str] | None = None,
    where: str | None = None,
    how: str | None = None,
    spread: float | None = None,
) -> Iterator[tuple[str, str, str]]:
    """Naive and steered answers side by side, streamed, from one batched generation; what each gate said.

    Saved categories of `policy` named in `also_apply` steer the second row too, each at its
    saved layer and strength (and gate): several categories active at once.
    """
    draft = require_draft(draft, vectors=True)
    prompt = (prompt or "").strip()
    if not prompt:
        raise SafeSteerError("type a prompt (or pick a held-out example)")
    names, saved = _saved_specs(draft, policy, also_apply, [False, True])
    options = steering_options(where, how, spread)
    own = draft_spec(draft, layer, strength, rows=(0.0, float(strength)), options=options)
    names, specs = [draft.name, *names], [own, *saved]
    readings: list[GateReading] = []
    stream = generate_stream(
        preview_model(), [prompt, prompt], specs, max_new_tokens=int(max_tokens), gate_readings=readings
    )
    gated = any(spec.gated and not spec.is_noop() for spec in specs)
    idle = [spec.is_noop() for spec in specs]
    naive = steered = ""
    said = ""
    for naive, steered in stream:
        ready = readings or not gated  # gates are read before the first token; without gates nothing to wait for
        said = (
            verdict_lines(names, verdicts(specs, readings[0] if readings else None, row=1), idle)
            if ready
            else gr.skip()
        )
        yield naive, steered, said
    gate_said = verdicts(specs, readings[0] if readings else None, row=1)
    yield naive, steered, f"{said}\n\n{judged_lines(prompt, naive, steered, gate_said)}"


def judged_lines(prompt: str, naive: str, steered: str, gate_said: Sequence[GateVerdict | None]) -> str:
    """The judges' verdict on each answer in words, and whether steering helped (`answer_verdicts`)."""
    known = [v for v in gate_said if v is not None]
    kind: AnswerKind = "everyday" if known and all(v.score < v.threshold for v in known) else "harmful"
    probe = ready_probe() if kind == "harmful" else None
    reader = preview_model() if probe is not None else None
    before = describe_answer(prompt, naive, kind, probe, reader)
    after = describe_answer(prompt, steered, kind, probe, reader)
    request = "a harmful request (a gate recognised it)" if known and kind == "harmful" else f"an {kind} request"
    if not known:
        request = "a harmful request (no gate decides here; read as one)"
    note = "" if probe is not None or kind == "everyday" else " The unsafe-attempt judge is still being trained."
    return (
        f"**The judges read this as {request}.** Naive answer: **{before.words}**. Steered answer: "
        f"**{after.words}**. {steering_effect(before, after, naive == steered, kind)}{note}"
    )


def preview_batch(
    draft: Draft | None,
    prompts_text: str,
    layer: float,
    strength: float,
    max_tokens: float,
    policy: str | None = None,
    also_apply: list[str] | None = None,
    where: str | None = None,
    how: str | None = None,
    spread: float | None = None,
) -> pd.DataFrame:
    """Test prompts (default: the held-out ones), naive vs steered in one batched call, and which gates fired."""
    draft = require_draft(draft, vectors=True)
    prompts = [p.strip() for p in (prompts_text or "").splitlines() if p.strip()] or draft.heldout
    prompts = prompts[:MAX_BATCH_PROMPTS]
    steered_rows = [False] * len(prompts) + [True] * len(prompts)
    names, saved = _saved_specs(draft, policy, also_apply, steered_rows)
    names = [draft.name, *names]
    rows = tuple(float(strength) if r else 0.0 for r in steered_rows)
    specs = [draft_spec(draft, layer, strength, rows=rows, options=steering_options(where, how, spread))]
    specs += saved
    readings: list[GateReading] = []
    texts = generate(preview_model(), prompts + prompts, specs, max_new_tokens=int(max_tokens), gate_readings=readings)
    steered_by = []
    for row in range(len(prompts), 2 * len(prompts)):
        said = verdicts(specs, readings[0] if readings else None, row)
        steered_by.append(", ".join(n for n, v in zip(names, said, strict=True) if v is None or v.fired) or "none")
    return pd.DataFrame(
        {
            "prompt": prompts,
            "steered by": steered_by,
            "naive": texts[: len(prompts)],
            "steered": texts[len(prompts) :],
        }
    )
