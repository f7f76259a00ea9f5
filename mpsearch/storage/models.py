"""mpsearch's own tables. Trials are not here: they live in Optuna's tables, same database.

Every table name starts with ``mpsearch_`` and the migration history is kept in
``mpsearch_alembic_version``, so nothing collides with Optuna's tables or its own
``alembic_version``. Changing a model means adding an Alembic revision under ``alembic/``.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = ("succeeded", "failed", "cancelled")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


class Base(DeclarativeBase):
    metadata = sa.MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {dict[str, Any]: sa.JSON, datetime: sa.DateTime(timezone=True)}


class Job(Base):
    """One search job: the spec it was submitted with and where it stands."""

    __tablename__ = "mpsearch_jobs"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_job_id)
    study: Mapped[str] = mapped_column(sa.String(255), index=True)
    spec_toml: Mapped[str] = mapped_column(sa.Text)
    spec: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(sa.String(16), default="queued")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    error: Mapped[str | None] = mapped_column(sa.Text)
    host: Mapped[str | None] = mapped_column(sa.String(255))
    ray_job_id: Mapped[str | None] = mapped_column(sa.String(255))

    events: Mapped[list["JobEvent"]] = relationship(back_populates="job", order_by="JobEvent.id", cascade="all, delete-orphan")

    __table_args__ = (sa.CheckConstraint(f"state IN ({', '.join(repr(s) for s in JOB_STATES)})", name="state"),)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "study": self.study,
            "state": self.state,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "error": self.error,
            "host": self.host,
            "ray_job_id": self.ray_job_id,
        }


class JobEvent(Base):
    """Each state a job entered, when, and why: the job's history, append-only."""

    __tablename__ = "mpsearch_job_events"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("mpsearch_jobs.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(sa.String(16))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    message: Mapped[str | None] = mapped_column(sa.Text)

    job: Mapped[Job] = relationship(back_populates="events")


class SensitivityProfile(Base):
    """Per-layer (and per (layer, bits)) sensitivity, valid only for the keys it was computed on.

    ``model_key``, ``data_key`` and ``scheme_key`` are hashes of the model's tensors, the
    calibration batches and the quantization scheme; ``params`` are the estimator's own
    settings (probes, seed, ...). A profile is reused only when all of them match.
    """

    __tablename__ = "mpsearch_sensitivity_profiles"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    method: Mapped[str] = mapped_column(sa.String(32))
    model_key: Mapped[str] = mapped_column(sa.String(64))
    data_key: Mapped[str] = mapped_column(sa.String(64))
    scheme_key: Mapped[str] = mapped_column(sa.String(64))
    params_key: Mapped[str] = mapped_column(sa.String(64))
    params: Mapped[dict[str, Any]]
    values: Mapped[dict[str, Any]]
    study: Mapped[str | None] = mapped_column(sa.String(255))
    seconds: Mapped[float | None] = mapped_column(sa.Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (sa.UniqueConstraint("method", "model_key", "data_key", "scheme_key", "params_key", name="uq_mpsearch_profile_keys"),)


class Export(Base):
    """A plan written to disk: which trial it came from, its bytes, and a checksum per file."""

    __tablename__ = "mpsearch_exports"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    study: Mapped[str] = mapped_column(sa.String(255), index=True)
    trial: Mapped[int]
    plan: Mapped[dict[str, Any]]
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    bpw: Mapped[float] = mapped_column(sa.Float)
    out_dir: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # {"loss", "test_loss", "verified_loss", "refinement"?, "repair"?}: the trial's losses, the file's as
    # loaded back, and each step's before and after on evaluation and test (schema 0004; older rows: None)
    losses: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON, nullable=True)

    files: Mapped[list["ExportFile"]] = relationship(back_populates="export", order_by="ExportFile.path", cascade="all, delete-orphan")


class ExportFile(Base):
    __tablename__ = "mpsearch_export_files"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    export_id: Mapped[int] = mapped_column(sa.ForeignKey("mpsearch_exports.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(sa.Text)
    size: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))

    export: Mapped[Export] = relationship(back_populates="files")


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes; they were written in UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


class StudyLease(Base):
    """The one driver searching a study: who holds it, since when, and its last heartbeat.

    A row exists while a driver runs; it is taken by an atomic INSERT (the study is the primary
    key) and handed over only by a conditional UPDATE on a lease whose driver is dead.
    """

    __tablename__ = "mpsearch_study_leases"

    study: Mapped[str] = mapped_column(sa.String(512), primary_key=True)
    holder: Mapped[str] = mapped_column(sa.String(64))  # this lease's own token
    host: Mapped[str] = mapped_column(sa.String(255))
    pid: Mapped[int]
    since: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
