"""What the store hands back: plain, immutable summaries of policies, versions, diffs and the audit log."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class PolicySummary:
    name: str
    description: str
    archived: bool
    versions: int
    latest: int | None
    created_at: str
    created_by: str


@dataclass(frozen=True)
class VersionSummary:
    number: int
    author: str
    created_at: str
    note: str
    categories: list[str]
    restored_from: int | None
    has_evaluation: bool
    operating_points: dict[str, tuple[int, float]] = field(default_factory=dict)  # category -> (layer, strength)


@dataclass(frozen=True)
class AuditCheck:
    """The result of recomputing the audit log's hash chain."""

    ok: bool
    entries: int
    first_bad_id: int | None = None


@dataclass(frozen=True)
class AuditEntry:
    at: str
    actor: str
    action: str
    policy: str
    version: int | None
    detail: dict[str, Any]


@dataclass
class CategoryDiff:
    name: str
    status: str  # "added", "removed" or "changed"/"unchanged"
    harmful_added: list[str] = field(default_factory=list)
    harmful_removed: list[str] = field(default_factory=list)
    safe_added: list[str] = field(default_factory=list)
    safe_removed: list[str] = field(default_factory=list)
    settings_changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    cosine_by_layer: list[float] = field(default_factory=list)


@dataclass
class VersionDiff:
    policy: str
    old: int
    new: int
    categories: list[CategoryDiff]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
