"""Jobs and their state history.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mpsearch_jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("study", sa.String(255), nullable=False),
        sa.Column("spec_toml", sa.Text(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("ray_job_id", sa.String(255), nullable=True),
        sa.CheckConstraint("state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f("ck_mpsearch_jobs_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mpsearch_jobs")),
    )
    op.create_index(op.f("ix_mpsearch_jobs_study"), "mpsearch_jobs", ["study"])
    op.create_table(
        "mpsearch_job_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["mpsearch_jobs.id"], name=op.f("fk_mpsearch_job_events_job_id_mpsearch_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mpsearch_job_events")),
    )
    op.create_index(op.f("ix_mpsearch_job_events_job_id"), "mpsearch_job_events", ["job_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_mpsearch_job_events_job_id"), table_name="mpsearch_job_events")
    op.drop_table("mpsearch_job_events")
    op.drop_index(op.f("ix_mpsearch_jobs_study"), table_name="mpsearch_jobs")
    op.drop_table("mpsearch_jobs")
