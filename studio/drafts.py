"""Drafts that survive: the category in progress is kept in the store after every step, and resumed by name.

An extraction takes minutes on a CPU; a page reload (or a restart of the app) used to lose it. Each
author's drafts are stored under their name (`db.drafts`), newest first in step 1's list.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import gradio as gr

from db.drafts import DraftStore
from safesteer.errors import SafeSteerError
from safesteer.text_gates import BaselineRates
from safesteer.vectors import CategoryVectors

from .category import Draft
from .resources import author_of, studio_store


def draft_store() -> DraftStore:
    return DraftStore(studio_store().engine)


def draft_record(draft: Draft) -> tuple[dict[str, Any], bytes | None]:
    """A draft as plain data and its vectors file (what the store keeps)."""
    data = {
        "description": draft.description,
        "harmful": draft.harmful,
        "safe": draft.safe,
        "heldout": draft.heldout,
        "notes": draft.notes,
        "baselines": [asdict(b) for b in draft.baselines],
    }
    return data, draft.vectors.to_bytes() if draft.vectors is not None else None


def draft_from_record(name: str, data: dict[str, Any], vectors: bytes | None) -> Draft:
    try:
        return Draft(
            name=name,
            description=str(data.get("description", "")),
            harmful=[str(p) for p in data["harmful"]],
            safe=[str(p) for p in data["safe"]],
            heldout=[str(p) for p in data.get("heldout", [])],
            vectors=CategoryVectors.from_bytes(vectors, f"draft {name!r}") if vectors is not None else None,
            notes=[str(n) for n in data.get("notes", [])],
            baselines=tuple(BaselineRates(**b) for b in data.get("baselines", [])),
        )
    except SafeSteerError:
        raise
    except Exception as exc:
        raise SafeSteerError(
            f"the stored draft {name!r} cannot be read ({type(exc).__name__}); start it again"
        ) from exc


def _label(name: str, extracted: bool) -> str:
    return f"{name} (vectors extracted)" if extracted else f"{name} (prompts read)"


def draft_choices(request: gr.Request | None = None) -> gr.Dropdown:
    """The author's drafts, newest first, for step 1's resume list."""
    drafts = draft_store().list(author_of(request))
    return gr.Dropdown(choices=[(_label(d.name, d.vectors is not None), d.name) for d in drafts], value=None)


def remember_draft(draft: Draft | None, request: gr.Request | None = None) -> gr.Dropdown:
    """Keep the draft in the store (after reading prompts, extracting, moving the gate) and refresh the list."""
    if draft is not None:
        data, vectors = draft_record(draft)
        draft_store().save(author_of(request), draft.name, data, vectors)
    return draft_choices(request)


def resume_draft(name: str | None, request: gr.Request | None = None) -> tuple[Any, ...]:
    """The chosen draft back as the working category, with what step 1 and step 2 showed."""
    if not name:
        raise SafeSteerError("pick a draft to resume")
    stored = draft_store().load(author_of(request), name)
    draft = draft_from_record(stored.name, stored.data, stored.vectors)
    done = "with its vectors: go on at **3 · Preview**" if draft.vectors is not None else "go on at **2 · Extract**"
    said = (
        f"Resumed **{draft.name}** ({len(draft.harmful)} harmful, {len(draft.safe)} safe prompts, "
        f"{len(draft.heldout)} held out; saved {stored.updated_at:%Y-%m-%d %H:%M} UTC), {done}."
    )
    return draft, said, gr.Dropdown(choices=draft.heldout, value=None)
