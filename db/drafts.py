"""Drafts in the store: an author's unsaved category, so a page reload or a restart loses no extraction.

A draft is plain data (prompts, notes, text-baseline rates) plus the vectors file when there is
one; the studio turns it back into its working state. One draft per author and category name,
saved over as the author works.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import sessionmaker

from safesteer.errors import SafeSteerError
from safesteer.policy import check_name

from .schema import DraftRow, utcnow

MAX_DRAFTS_PER_AUTHOR = 50


@dataclass(frozen=True)
class StoredDraft:
    author: str
    name: str
    updated_at: datetime
    data: dict[str, Any]
    vectors: bytes | None


class DraftStore:
    """Drafts over the policy store's database (`PolicyStore.engine`; migrations ran when it opened)."""

    def __init__(self, engine: Engine) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def save(self, author: str, name: str, data: dict[str, Any], vectors: bytes | None) -> None:
        """Save over the author's draft of this name (the newest work wins)."""
        name = check_name("category", name)
        with self._sessions.begin() as session:
            row = session.scalar(select(DraftRow).where(DraftRow.author == author, DraftRow.name == name))
            if row is None:
                count = len(session.scalars(select(DraftRow.id).where(DraftRow.author == author)).all())
                if count >= MAX_DRAFTS_PER_AUTHOR:
                    oldest = session.scalar(
                        select(DraftRow).where(DraftRow.author == author).order_by(DraftRow.updated_at).limit(1)
                    )
                    session.delete(oldest)
                row = DraftRow(author=author, name=name, data=data, vectors=vectors)
                session.add(row)
            else:
                row.data, row.vectors, row.updated_at = data, vectors, utcnow()

    def list(self, author: str) -> list[StoredDraft]:
        """The author's drafts, newest first."""
        with self._sessions() as session:
            rows = session.scalars(
                select(DraftRow).where(DraftRow.author == author).order_by(DraftRow.updated_at.desc())
            ).all()
            return [StoredDraft(r.author, r.name, r.updated_at, r.data, r.vectors) for r in rows]

    def load(self, author: str, name: str) -> StoredDraft:
        with self._sessions() as session:
            row = session.scalar(select(DraftRow).where(DraftRow.author == author, DraftRow.name == name))
            if row is None:
                raise SafeSteerError(f"no draft named {name!r}")
            return StoredDraft(row.author, row.name, row.updated_at, row.data, row.vectors)

    def delete(self, author: str, name: str) -> None:
        with self._sessions.begin() as session:
            session.execute(delete(DraftRow).where(DraftRow.author == author, DraftRow.name == name))
