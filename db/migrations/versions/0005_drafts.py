"""Drafts: an author's category in progress, kept across reloads and restarts.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drafts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("author", sa.String(100), nullable=False, server_default=""),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("vectors", sa.LargeBinary(), nullable=True),
        sa.UniqueConstraint("author", "name"),
    )


def downgrade() -> None:
    op.drop_table("drafts")
