"""Tables of the policy store (SQLAlchemy 2 typed models).

A policy has versions; a version has categories; a category has example prompts and its
vectors (safetensors bytes with their sha256). Versions, categories and examples are never
updated once written, nor deleted except with their whole policy, and audit entries never change
(triggers in the migrations enforce it): a change is a new version.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, ForeignKey, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Policy(Base):
    __tablename__ = "policies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    archived: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(100), default="")
    versions: Mapped[list[PolicyVersionRow]] = relationship(
        back_populates="policy", cascade="all, delete-orphan", passive_deletes=True, order_by="PolicyVersionRow.number"
    )


class PolicyVersionRow(Base):
    __tablename__ = "policy_versions"
    __table_args__ = (UniqueConstraint("policy_id", "number", name="uq_policy_version_number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id", ondelete="CASCADE"), index=True)
    number: Mapped[int]
    author: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    note: Mapped[str] = mapped_column(Text, default="")
    model: Mapped[dict[str, Any]]
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    restored_from: Mapped[int | None] = mapped_column(nullable=True)
    policy: Mapped[Policy] = relationship(back_populates="versions")
    categories: Mapped[list[CategoryRow]] = relationship(
        back_populates="version", cascade="all, delete-orphan", passive_deletes=True, order_by="CategoryRow.position"
    )


class CategoryRow(Base):
    __tablename__ = "categories"

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("policy_versions.id", ondelete="CASCADE"), index=True)
    position: Mapped[int]
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, default="")
    settings: Mapped[dict[str, Any]]
    layer: Mapped[int]
    strength: Mapped[float]
    steering: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # NULL: saved before options
    vectors: Mapped[bytes] = mapped_column(LargeBinary)
    vectors_sha256: Mapped[str] = mapped_column(String(64))
    version: Mapped[PolicyVersionRow] = relationship(back_populates="categories")
    examples: Mapped[list[ExampleRow]] = relationship(
        back_populates="category", cascade="all, delete-orphan", passive_deletes=True, order_by="ExampleRow.position"
    )


class ExampleRow(Base):
    __tablename__ = "examples"

    id: Mapped[int] = mapped_column(primary_key=True)
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id", ondelete="CASCADE"), index=True)
    side: Mapped[str] = mapped_column(String(8))  # "harmful" or "safe"
    position: Mapped[int]
    text: Mapped[str] = mapped_column(Text)
    category: Mapped[CategoryRow] = relationship(back_populates="examples")


class AuditRow(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(40))
    policy: Mapped[str] = mapped_column(String(100), index=True)
    version: Mapped[int | None] = mapped_column(nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64), default="")
    row_hash: Mapped[str] = mapped_column(String(64), default="")


class DeletionPermit(Base):
    """Present only inside `PolicyStore.delete_policy`'s transaction: the one path allowed to delete history."""

    __tablename__ = "deletion_permits"

    id: Mapped[int] = mapped_column(primary_key=True)


class EvaluationRow(Base):
    """A sweep or a human review of one version; several may accumulate, the newest of a kind counts."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("policy_versions.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    author: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    data: Mapped[dict[str, Any]]


class DraftRow(Base):
    """An author's category in progress (the studio's steps 1-3): kept so a reload or restart loses nothing.

    Unlike versions, drafts are working copies: saved over, and deleted when the author is done.
    """

    __tablename__ = "drafts"
    __table_args__ = (UniqueConstraint("author", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    author: Mapped[str] = mapped_column(String(100), default="")
    name: Mapped[str] = mapped_column(String(100))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    data: Mapped[dict[str, Any]]  # description, harmful, safe, held-out prompts, notes, text baselines
    vectors: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # safetensors, once extracted
