"""Exports keep their losses: the trial's, the file's as loaded back, and before and after
refinement and repair, on the evaluation and test splits.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mpsearch_exports") as batch:  # SQLite alters a table by copying it
        batch.add_column(sa.Column("losses", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mpsearch_exports") as batch:
        batch.drop_column("losses")
