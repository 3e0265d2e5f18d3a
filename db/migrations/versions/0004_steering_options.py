"""Steering options per category: where, how and over how many layers its vector is applied.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

Rows written before this revision keep NULL, which reads as the papers' operation (add at every
position of one layer), so saved versions steer exactly as they did.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("categories", sa.Column("steering", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("categories", "steering")  # SQLite 3.35+ drops it in place, keeping the table's triggers
