"""Versioned policies: save, list, load, compare, roll back, archive, delete; every change audited.

The store speaks in `safesteer.policy` dataclasses; database rows never leave this module.
Saving a version is one transaction that takes SQLite's write lock first (see `db.engine`), so
concurrent savers get consecutive numbers and a failure part-way leaves nothing behind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from safesteer.errors import SafeSteerError
from safesteer.operations import SteeringOptions
from safesteer.policy import SIDES, PolicyCategory, PolicyVersion, check_name, cosine_by_layer
from safesteer.vectors import CategoryVectors

from .audit import entry_hash, normalised
from .engine import make_engine, migrate
from .records import AuditCheck, AuditEntry, CategoryDiff, PolicySummary, VersionDiff, VersionSummary
from .schema import (
    AuditRow,
    CategoryRow,
    DeletionPermit,
    EvaluationRow,
    ExampleRow,
    Policy,
    PolicyVersionRow,
    utcnow,
)


def _iso(value: Any) -> str:
    return value.isoformat(timespec="seconds") if value is not None else ""


class PolicyStore:
    """The policy store over one database (SQLite file by default); migrates it on open."""

    def __init__(self, url: str | None = None, engine: Engine | None = None) -> None:
        self.engine = engine or make_engine(url)
        migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _session(self) -> Session:
        return self._sessions()

    # --- policies --------------------------------------------------------------------------

    def _policy(self, session: Session, name: str) -> Policy:
        policy = session.scalar(select(Policy).where(Policy.name == name))
        if policy is None:
            raise SafeSteerError(f"no policy named {name!r}")
        return policy

    def record(self, actor: str, action: str, policy: str, version: int | None = None, **detail: Any) -> None:
        """Add an entry to the audit log in a transaction of its own."""
        with self._session() as session, session.begin():
            self._audit(session, actor, action, policy, version, **detail)

    def _audit(self, session: Session, actor: str, action: str, policy: str, version: int | None = None, **detail: Any):
        """Append an entry chained to the previous one (the write lock keeps the chain a line)."""
        previous = session.scalar(select(AuditRow.row_hash).order_by(AuditRow.id.desc()).limit(1)) or ""
        at, actor, detail = utcnow(), actor or "unknown", normalised(detail)
        digest = entry_hash(previous, at, actor, action, policy, version, detail)
        session.add(
            AuditRow(
                at=at,
                actor=actor,
                action=action,
                policy=policy,
                version=version,
                detail=detail,
                prev_hash=previous,
                row_hash=digest,
            )
        )
        session.flush()

    def verify_audit(self) -> AuditCheck:
        """Recompute the audit log's hash chain; the first entry that does not match is named."""
        previous, count = "", 0
        with self._session() as session:
            for row in session.scalars(select(AuditRow).order_by(AuditRow.id)):
                count += 1
                expected = entry_hash(previous, row.at, row.actor, row.action, row.policy, row.version, row.detail)
                if row.prev_hash != previous or row.row_hash != expected:
                    return AuditCheck(ok=False, entries=count, first_bad_id=row.id)
                previous = row.row_hash
        return AuditCheck(ok=True, entries=count)

    def create_policy(self, name: str, description: str = "", actor: str = "") -> PolicySummary:
        name = check_name("policy", name)
        with self._session() as session, session.begin():
            if session.scalar(select(Policy.id).where(Policy.name == name)) is not None:
                raise SafeSteerError(f"a policy named {name!r} already exists")
            session.add(Policy(name=name, description=description, created_by=actor))
            self._audit(session, actor, "create", name, description=description)
        return self.policy(name)

    def policy(self, name: str) -> PolicySummary:
        return next((p for p in self.list_policies(include_archived=True) if p.name == name), None) or self._missing(
            name
        )

    @staticmethod
    def _missing(name: str) -> PolicySummary:
        raise SafeSteerError(f"no policy named {name!r}")

    def list_policies(self, include_archived: bool = False) -> list[PolicySummary]:
        with self._session() as session:
            query = (
                select(Policy, func.count(PolicyVersionRow.id), func.max(PolicyVersionRow.number))
                .outerjoin(PolicyVersionRow)
                .group_by(Policy.id)
                .order_by(Policy.name)
            )
            if not include_archived:
                query = query.where(Policy.archived.is_(False))
            return [
                PolicySummary(p.name, p.description, p.archived, count, latest, _iso(p.created_at), p.created_by)
                for p, count, latest in session.execute(query)
            ]

    def archive_policy(self, name: str, actor: str = "", archived: bool = True) -> None:
        with self._session() as session, session.begin():
            self._policy(session, name).archived = archived
            self._audit(session, actor, "archive" if archived else "unarchive", name)

    def delete_policy(self, name: str, confirm: str, actor: str = "") -> None:
        """Delete a policy and all its versions; `confirm` must repeat the name (there is no undo)."""
        if confirm != name:
            raise SafeSteerError(f"to delete policy {name!r}, confirm by typing its name exactly")
        with self._session() as session, session.begin():
            policy = self._policy(session, name)
            versions = len(policy.versions)
            permit = DeletionPermit()
            session.add(permit)
            session.flush()  # the triggers refuse deletes while no permit exists
            session.delete(policy)
            session.flush()
            session.delete(permit)
            self._audit(session, actor, "delete", name, versions_deleted=versions)

    # --- versions --------------------------------------------------------------------------

    def save_version(
        self,
        policy: str,
        categories: list[PolicyCategory],
        author: str = "",
        note: str = "",
        evaluation: dict[str, Any] | None = None,
        description: str = "",
        create: bool = True,
        restored_from: int | None = None,
        keep_other_categories: bool = False,
        amend: Callable[[list[PolicyCategory]], list[PolicyCategory]] | None = None,
    ) -> int:
        """Store a new immutable version and return its number (the policy is created if needed).

        With `keep_other_categories`, the new version is the latest one with these categories
        added or replaced, read inside the same write transaction, so two authors adding
        different categories at once both end up in the newest version. `amend` then sees the
        version's final categories, in the same transaction, and returns them as they are stored
        (`workflows.save_category` learns the routers among them).
        """
        version = PolicyVersion(policy=policy, categories=categories, note=note, evaluation=evaluation)
        for attempt in range(3):
            try:
                return self._insert_version(
                    version, author, description, create, restored_from, keep_other_categories, amend
                )
            except IntegrityError:  # another writer won a race the write lock should prevent; try again
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _insert_version(
        self,
        version: PolicyVersion,
        author: str,
        description: str,
        create: bool,
        restored_from: int | None,
        keep_other_categories: bool,
        amend: Callable[[list[PolicyCategory]], list[PolicyCategory]] | None = None,
    ) -> int:
        with self._session() as session, session.begin():
            policy = session.scalar(select(Policy).where(Policy.name == version.policy))
            if policy is None:
                if not create:
                    raise SafeSteerError(f"no policy named {version.policy!r}")
                policy = Policy(name=version.policy, description=description, created_by=author)
                session.add(policy)
                session.flush()
                self._audit(session, author, "create", version.policy, description=description)
            if policy.archived:
                raise SafeSteerError(f"policy {version.policy!r} is archived; unarchive it before saving")
            latest = session.scalar(
                select(func.max(PolicyVersionRow.number)).where(PolicyVersionRow.policy_id == policy.id)
            )
            if keep_other_categories and latest:
                merged = self._load(session, version.policy, latest)
                for category in version.categories:
                    merged = replace(merged, categories=merged.with_category(category))
                version = replace(version, categories=merged.categories)  # re-validated by __post_init__
            if amend is not None:
                version = replace(version, categories=amend(list(version.categories)))
            number = (latest or 0) + 1
            row = PolicyVersionRow(
                policy_id=policy.id,
                number=number,
                author=author,
                note=version.note,
                model=version.model.to_dict(),
                evaluation=version.evaluation,
                restored_from=restored_from,
            )
            session.add(row)
            session.flush()
            self._insert_categories(session, row, version.categories)
            self._audit(
                session,
                author,
                "rollback" if restored_from else "save",
                version.policy,
                number,
                categories=[c.name for c in version.categories],
                restored_from=restored_from,
            )
            return number

    @staticmethod
    def _insert_categories(session: Session, row: PolicyVersionRow, categories: list[PolicyCategory]) -> None:
        for position, category in enumerate(categories):
            blob = category.vectors.to_bytes()
            record = CategoryRow(
                version_id=row.id,
                position=position,
                name=category.name,
                description=category.description,
                settings=dict(category.vectors.metadata()["settings"]),
                layer=category.layer,
                strength=category.strength,
                steering=category.options.to_dict(),
                vectors=blob,
                vectors_sha256=hashlib.sha256(blob).hexdigest(),
            )
            session.add(record)
            session.flush()
            for side in SIDES:
                texts = category.harmful if side == "harmful" else category.safe
                session.add_all(
                    ExampleRow(category_id=record.id, side=side, position=i, text=t) for i, t in enumerate(texts)
                )

    def list_versions(self, policy: str) -> list[VersionSummary]:
        with self._session() as session:
            p = self._policy(session, policy)
            rows = session.scalars(
                select(PolicyVersionRow)
                .where(PolicyVersionRow.policy_id == p.id)
                .options(selectinload(PolicyVersionRow.categories))
                .order_by(PolicyVersionRow.number)
            ).all()
            evaluated = set(
                session.scalars(
                    select(EvaluationRow.version_id).where(EvaluationRow.version_id.in_([r.id for r in rows]))
                )
            )
            return [
                VersionSummary(
                    r.number,
                    r.author,
                    _iso(r.created_at),
                    r.note,
                    [c.name for c in r.categories],
                    r.restored_from,
                    r.evaluation is not None or r.id in evaluated,
                    {c.name: (c.layer, c.strength) for c in r.categories},
                )
                for r in rows
            ]

    def load_version(self, policy: str, number: int | None = None) -> PolicyVersion:
        """A saved version (the latest when `number` is None), vectors checked against their hashes."""
        with self._session() as session:
            return self._load(session, policy, number)

    def _load(self, session: Session, policy: str, number: int | None) -> PolicyVersion:
        p = self._policy(session, policy)
        query = select(PolicyVersionRow).where(PolicyVersionRow.policy_id == p.id)
        query = (
            query.where(PolicyVersionRow.number == number) if number else query.order_by(PolicyVersionRow.number.desc())
        )
        row = session.scalars(
            query.options(selectinload(PolicyVersionRow.categories).selectinload(CategoryRow.examples)).limit(1)
        ).first()
        if row is None:
            raise SafeSteerError(
                f"policy {policy!r} has no version {number}" if number else f"policy {policy!r} has no versions yet"
            )
        categories = []
        for c in row.categories:
            if hashlib.sha256(c.vectors).hexdigest() != c.vectors_sha256:
                raise SafeSteerError(f"stored vectors of {policy!r} v{row.number} / {c.name!r} fail their checksum")
            categories.append(
                PolicyCategory(
                    name=c.name,
                    description=c.description,
                    harmful=[e.text for e in c.examples if e.side == "harmful"],
                    safe=[e.text for e in c.examples if e.side == "safe"],
                    vectors=CategoryVectors.from_bytes(c.vectors, f"{policy} v{row.number}"),
                    layer=c.layer,
                    strength=c.strength,
                    options=SteeringOptions.from_dict(c.steering),
                )
            )
        attached = session.scalars(
            select(EvaluationRow).where(EvaluationRow.version_id == row.id).order_by(EvaluationRow.id)
        ).all()
        evaluation = {**(row.evaluation or {}), **{e.kind: e.data for e in attached}} or None
        return PolicyVersion(
            policy=p.name,
            categories=categories,
            number=row.number,
            author=row.author,
            created_at=_iso(row.created_at),
            note=row.note,
            description=p.description,
            evaluation=evaluation,
            restored_from=row.restored_from,
        )

    def add_evaluation(self, policy: str, number: int, kind: str, data: dict[str, Any], author: str = "") -> None:
        """Attach an evaluation (kind: 'sweep' or 'human_review') to a saved version; the newest of a kind counts."""
        if kind not in ("sweep", "human_review"):
            raise SafeSteerError(f"unknown evaluation kind {kind!r}")
        with self._session() as session, session.begin():
            p = self._policy(session, policy)
            version_id = session.scalar(
                select(PolicyVersionRow.id).where(PolicyVersionRow.policy_id == p.id, PolicyVersionRow.number == number)
            )
            if version_id is None:
                raise SafeSteerError(f"policy {policy!r} has no version {number}")
            session.add(EvaluationRow(version_id=version_id, kind=kind, author=author, data=data))
            self._audit(session, author, "evaluate", policy, number, kind=kind)

    def rollback(self, policy: str, number: int, actor: str = "", note: str = "") -> int:
        """Save version `number` again as the newest; history stays complete."""
        old = self.load_version(policy, number)
        return self.save_version(
            policy,
            old.categories,
            author=actor,
            note=note or f"roll back to version {number}",
            evaluation=old.evaluation,
            create=False,
            restored_from=number,
        )

    def diff(self, policy: str, old: int, new: int) -> VersionDiff:
        """What changed between two versions: categories, examples, settings, vector cosine per layer."""
        a, b = self.load_version(policy, old), self.load_version(policy, new)
        diffs = []
        for name in dict.fromkeys([c.name for c in a.categories] + [c.name for c in b.categories]):
            before = next((c for c in a.categories if c.name == name), None)
            after = next((c for c in b.categories if c.name == name), None)
            if before is None or after is None:
                diffs.append(CategoryDiff(name, "added" if before is None else "removed"))
                continue
            settings_before, settings_after = before.operating_point(), after.operating_point()
            change = CategoryDiff(
                name,
                "changed",
                harmful_added=[t for t in after.harmful if t not in set(before.harmful)],
                harmful_removed=[t for t in before.harmful if t not in set(after.harmful)],
                safe_added=[t for t in after.safe if t not in set(before.safe)],
                safe_removed=[t for t in before.safe if t not in set(after.safe)],
                settings_changed={
                    k: (settings_before.get(k), settings_after.get(k))
                    for k in settings_before.keys() | settings_after.keys()
                    if settings_before.get(k) != settings_after.get(k)
                },
                cosine_by_layer=cosine_by_layer(before.vectors, after.vectors),
            )
            examples_changed = (
                change.harmful_added or change.harmful_removed or change.safe_added or change.safe_removed
            )
            if not (examples_changed or change.settings_changed) and min(change.cosine_by_layer) > 0.9999:
                change.status = "unchanged"
            diffs.append(change)
        return VersionDiff(policy=policy, old=old, new=new, categories=diffs)

    def audit_log(self, policy: str | None = None, limit: int = 100) -> list[AuditEntry]:
        with self._session() as session:
            query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
            if policy:
                query = query.where(AuditRow.policy == policy)
            return [
                AuditEntry(_iso(r.at), r.actor, r.action, r.policy, r.version, r.detail) for r in session.scalars(query)
            ]
