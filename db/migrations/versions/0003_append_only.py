"""Append-only history: no deletes outside the delete-policy path, a hash-chained audit log, finite settings.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

- Versions, categories, examples and evaluations can be deleted only while a row exists in
  `deletion_permits`, which `PolicyStore.delete_policy` writes and removes inside its own write
  transaction (writes are serialised, so no other transaction ever sees a permit).
- Audit entries can never be updated or deleted, and each carries `prev_hash` and `row_hash`.
- A category's strength must be a finite number in 0..32 and its layer a non-negative integer.

The triggers are SQLite's; on other databases the store's own checks and the hash chain apply.
"""

import sqlalchemy as sa
from alembic import op

from db.audit import entry_hash

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

GUARDED = ("policies", "policy_versions", "categories", "examples", "evaluations")


def upgrade() -> None:
    op.create_table("deletion_permits", sa.Column("id", sa.Integer(), primary_key=True))
    op.add_column("audit_log", sa.Column("prev_hash", sa.String(64), nullable=False, server_default=""))
    op.add_column("audit_log", sa.Column("row_hash", sa.String(64), nullable=False, server_default=""))
    bind = op.get_bind()
    rows = bind.execute(
        sa.text("SELECT id, at, actor, action, policy, version, detail FROM audit_log ORDER BY id")
    ).fetchall()
    previous = ""
    for row in rows:
        digest = entry_hash(previous, row.at, row.actor, row.action, row.policy, row.version, row.detail)
        bind.execute(
            sa.text("UPDATE audit_log SET prev_hash = :p, row_hash = :h WHERE id = :i"),
            {"p": previous, "h": digest, "i": row.id},
        )
        previous = digest
    if bind.dialect.name != "sqlite":
        return
    for table in GUARDED:
        op.execute(
            f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
            "WHEN NOT EXISTS (SELECT 1 FROM deletion_permits) "
            "BEGIN SELECT RAISE(ABORT, 'saved history cannot be deleted; delete the whole policy instead'); END"
        )
    op.execute(
        "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
    )
    op.execute(
        "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
        "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
    )
    op.execute(
        "CREATE TRIGGER categories_settings_checked BEFORE INSERT ON categories "
        "WHEN NEW.strength IS NULL OR typeof(NEW.strength) NOT IN ('real', 'integer') "
        "OR NOT (NEW.strength BETWEEN 0 AND 32) OR typeof(NEW.layer) != 'integer' OR NEW.layer < 0 "
        "BEGIN SELECT RAISE(ABORT, 'a category needs a finite strength in 0..32 and a whole-number layer'); END"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table in GUARDED:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
        for name in ("audit_log_no_update", "audit_log_no_delete", "categories_settings_checked"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("row_hash")
        batch.drop_column("prev_hash")
    op.drop_table("deletion_permits")
