"""Sensitivity profiles, exports and their files.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mpsearch_sensitivity_profiles",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("model_key", sa.String(64), nullable=False),
        sa.Column("data_key", sa.String(64), nullable=False),
        sa.Column("scheme_key", sa.String(64), nullable=False),
        sa.Column("params_key", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("values", sa.JSON(), nullable=False),
        sa.Column("study", sa.String(255), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mpsearch_sensitivity_profiles")),
        sa.UniqueConstraint("method", "model_key", "data_key", "scheme_key", "params_key", name="uq_mpsearch_profile_keys"),
    )
    op.create_table(
        "mpsearch_exports",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study", sa.String(255), nullable=False),
        sa.Column("trial", sa.Integer(), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("bpw", sa.Float(), nullable=False),
        sa.Column("out_dir", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mpsearch_exports")),
    )
    op.create_index(op.f("ix_mpsearch_exports_study"), "mpsearch_exports", ["study"])
    op.create_table(
        "mpsearch_export_files",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("export_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["export_id"], ["mpsearch_exports.id"], name=op.f("fk_mpsearch_export_files_export_id_mpsearch_exports"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mpsearch_export_files")),
    )
    op.create_index(op.f("ix_mpsearch_export_files_export_id"), "mpsearch_export_files", ["export_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_mpsearch_export_files_export_id"), table_name="mpsearch_export_files")
    op.drop_table("mpsearch_export_files")
    op.drop_index(op.f("ix_mpsearch_exports_study"), table_name="mpsearch_exports")
    op.drop_table("mpsearch_exports")
    op.drop_table("mpsearch_sensitivity_profiles")
