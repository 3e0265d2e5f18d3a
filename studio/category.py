"""Step 1: read a category's harmful and safe prompts, clean them, hold some out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import gradio as gr
import pandas as pd

from safesteer import datasets
from safesteer.errors import SafeSteerError
from safesteer.operations import DEFAULT, How, SteeringOptions, Where
from safesteer.policy import check_name
from safesteer.prompts import MAX_FILE_BYTES, PromptReport, clean_prompts, parse_prompts
from safesteer.text_gates import BaselineRates
from safesteer.vectors import MIN_PROMPTS_PER_SIDE, CategoryVectors

from .resources import OWN_PROMPTS, builtin_area, example_sources, heldout_count, plain_text


@dataclass
class Draft:
    """One author's category in progress (kept per browser session)."""

    name: str
    description: str
    harmful: list[str]
    safe: list[str]
    heldout: list[str]  # harmful prompts kept out of extraction, for previews
    vectors: CategoryVectors | None = None
    notes: list[str] = field(default_factory=list)
    baselines: tuple[BaselineRates, ...] = ()  # simple text classifiers on the gate's held-out prompts


def _read_side(file_path: str | None, pasted: str | None, side: str) -> PromptReport:
    raw: list[str] = []
    if file_path:
        path = Path(file_path)
        if path.stat().st_size > MAX_FILE_BYTES:
            raise SafeSteerError(f"the {side} file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB")
        raw += parse_prompts(path.read_bytes(), path.name)
    if pasted:
        raw += pasted.splitlines()
    return clean_prompts(raw)


def name_for_source(source: str, name: str) -> str:
    """The category's name when the author picks another source of examples.

    A built-in data set names the category after itself unless the author typed a name of their
    own: a name left at another data set's would save the new category over that one.
    """
    area = builtin_area(source)
    typed = (name or "").strip()
    automatic = not typed or typed in {builtin_area(s) for s in example_sources()}
    return area if area is not None and automatic else name


def cleared_extraction() -> tuple[None, str, None, str]:
    """What step 2 shows once a new category is read: nothing extracted yet."""
    return None, "", None, ""


def read_category(
    name: str,
    description: str,
    source: str,
    harmful_file: str | None,
    safe_file: str | None,
    harmful_text: str,
    safe_text: str,
) -> tuple[Draft, pd.DataFrame, str, gr.Dropdown]:
    """Read both sides, clean them, hold some harmful prompts out, and summarise what was read."""
    name = check_name("category", name or "")
    notes: list[str] = []
    if source == OWN_PROMPTS:
        harmful_report = _read_side(harmful_file, harmful_text, "harmful")
        harmful = harmful_report.prompts
        notes += [f"harmful: {p}" for p in harmful_report.problems()]
    elif (area := builtin_area(source)) is not None:
        harmful = datasets.harmful_prompts(area)
        notes.append(f"harmful prompts: {datasets.ATTRIBUTION[datasets.source_of(area)]}")
    else:
        raise SafeSteerError(f"unknown example source {source!r}")
    safe_report = _read_side(safe_file, safe_text, "safe")
    safe = safe_report.prompts
    notes += [f"safe: {p}" for p in safe_report.problems()]
    if not safe:
        safe = datasets.benign_prompts()
        notes.append(f"safe prompts: SafeSteer's {len(safe)} everyday requests (none were given)")
    n_heldout = heldout_count(len(harmful))
    dropped = f" (dropped: {'; '.join(notes)})" if notes else ""
    if len(harmful) - n_heldout < MIN_PROMPTS_PER_SIDE:
        raise SafeSteerError(
            f"need at least {MIN_PROMPTS_PER_SIDE + 2} harmful prompts ({MIN_PROMPTS_PER_SIDE} to learn from and 2 "
            f"held out for previews), got {len(harmful)}{dropped}"
        )
    if len(safe) < MIN_PROMPTS_PER_SIDE:
        raise SafeSteerError(f"need at least {MIN_PROMPTS_PER_SIDE} safe prompts, got {len(safe)}{dropped}")
    train, heldout = datasets.split_heldout(harmful, n_heldout)
    draft = Draft(name=name, description=description or "", harmful=train, safe=safe, heldout=heldout, notes=notes)
    table = pd.DataFrame(
        [{"side": "harmful", "prompt": p} for p in train]
        + [{"side": "held out (preview)", "prompt": p} for p in heldout]
        + [{"side": "safe", "prompt": p} for p in safe]
    )
    summary = (
        f"**{len(train)} harmful** prompts to learn from, **{len(heldout)} held out** for previews, "
        f"**{len(safe)} safe** prompts."
    )
    if notes:
        summary += "\n\n" + "\n".join(f"- {plain_text(n)}" for n in notes)
    summary += "\n\nNext: **2 · Extract**."
    return draft, table, summary, gr.Dropdown(choices=heldout, value=heldout[0])


def require_draft(draft: Draft | None, vectors: bool = False) -> Draft:
    if draft is None:
        raise SafeSteerError("start at step 1: read a category's prompts first")
    if vectors and draft.vectors is None:
        raise SafeSteerError("run step 2 (extract) first")
    return draft


MAX_STRENGTH = 8.0


def within_strength(value: float | None) -> float:
    """The strength box's value within the slider's range, said when it was not: a typed 100 is shown as the 8 used."""
    strength = float(value or 0.0)
    kept = min(max(strength, 0.0), MAX_STRENGTH)
    if kept != strength:
        gr.Warning(f"Strength goes from 0 to {MAX_STRENGTH:g}; {strength:g} is shown and used as {kept:g}.")
    return kept


def steering_options(where: str | None, how: str | None, spread: float | None) -> SteeringOptions:
    """The preview's three controls as options; left empty (an API call without them), the default."""
    return SteeringOptions(
        where=cast(Where, where or DEFAULT.where),
        how=cast(How, how or DEFAULT.how),
        spread=int(spread or DEFAULT.spread),
    )
