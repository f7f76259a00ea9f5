"""The :class:`Storage`: one URL, mpsearch's records and Optuna's trials in one database."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import socket
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from mpsearch.errors import MPSearchError, NotFoundError, StorageError, first_line
from mpsearch.storage import schema
from mpsearch.storage.database import (
    DEFAULT_URL,
    check_sqlite_path,
    create_engine,
    engine_options,
    parse_url,
    retry_window_s,
    shown,
    sqlite_writers,
    with_retries,
)
from mpsearch.storage.models import FINAL_STATES, JOB_STATES, Export, ExportFile, Job, JobEvent, SensitivityProfile, utcnow

# Which state a job may go to from which.
_NEXT = {
    "queued": {"running", "cancelled", "failed"},
    "running": {"succeeded", "failed", "cancelled", "queued"},  # back to queued: retried elsewhere
    "succeeded": set(),
    "failed": {"queued"},  # resubmitted
    "cancelled": {"queued"},
}


@dataclass(frozen=True)
class ProfileKey:
    """What a sensitivity profile is valid for: it is reused only if every part matches."""

    method: str
    model_key: str
    data_key: str
    scheme_key: str
    params: Mapping[str, Any]

    @property
    def params_key(self) -> str:
        return hashlib.sha256(json.dumps(dict(self.params), sort_keys=True).encode()).hexdigest()


_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
SQLITE_HEADER = b"SQLite format 3\x00"


def _existing_sqlite(url) -> None:
    """Refuse, for a command that only reads, a SQLite file that is missing or not a database:
    opening it would create (or, for an empty file, silently initialise) one."""
    path = Path(url.database).expanduser()
    if not path.exists():
        raise StorageError(
            f"there is no database file {url.database!r} yet (nothing was stored there); "
            "run `mpsearch search` first or point --storage at an existing database"
        )
    try:
        with path.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as e:
        raise StorageError(f"cannot read the database file {url.database!r} ({e.strerror}); check the path and its permissions") from None
    if header != SQLITE_HEADER:
        what = "is empty" if not header else "is not a SQLite database"
        raise StorageError(f"the file {url.database!r} {what}; point --storage at a database that `mpsearch search` wrote (this command only reads)")


class Storage:
    """mpsearch's database at ``url`` (default ``sqlite:///mpsearch.db``).

    Opening it checks the schema (creating a brand-new database, refusing an old or newer
    one with the command to run; ``create=False``, for commands that only read, refuses a missing
    or empty SQLite file, or a database without mpsearch tables, rather than creating one). Until the database has answered once, a connection failure is
    retried a few times and then reported as one :class:`StorageError` line (a wrong URL fails
    fast); after that, every operation waits out a database that went away (a restart, a
    failover) for ``$MPSEARCH_DB_RETRY_S`` (120 s), then says to resume. Other database errors
    are never retried.
    """

    def __init__(self, url: str | None = None, *, check_schema: bool = True, create: bool = True):
        self.url = parse_url(url or DEFAULT_URL)
        if self.url.get_backend_name() == "sqlite":
            check_sqlite_path(self.url)
            if not create:
                _existing_sqlite(self.url)
        self.engine = create_engine(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._optuna = None
        self._reached = False
        self.window_s = retry_window_s()
        if check_schema:
            self.revision = self._retry(lambda: schema.check(self.engine, create_if_new=create), "opening")
        else:
            self._retry(self._ping, "connecting to")

    def __repr__(self) -> str:
        return f"Storage({shown(self.url)})"

    @property
    def url_string(self) -> str:
        """The URL with its password, for handing to Optuna or a worker; never print it."""
        return self.url.render_as_string(hide_password=False)

    def close(self) -> None:
        self.engine.dispose()
        if self._optuna is not None:
            self._optuna.engine.dispose()

    # -- plumbing ----------------------------------------------------------------------

    def _ping(self) -> None:
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    def _retry(self, fn, what: str):
        result = with_retries(fn, self.url, what=f"{what} the database", window_s=self.window_s if self._reached else None)
        self._reached = True
        return result

    def retrying(self, fn, what: str = "using"):
        """``fn()``, with a transient database error waited out (see the class docstring)."""
        return self._retry(fn, what)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction, committed on success."""
        with self._sessions.begin() as session:
            yield session

    def upgrade(self) -> tuple[str | None, str]:
        """Upgrade mpsearch's tables to the newest revision, and Optuna's to its own."""
        before, after = self._retry(lambda: schema.upgrade(self.engine), "upgrading")
        self.optuna(upgrade=True)
        return before, after

    def optuna(self, upgrade: bool = False):
        """Optuna's ``RDBStorage`` on the same database (its tables created if missing)."""
        if self._optuna is None or upgrade:
            from optuna.storages import RDBStorage

            def make():
                with self._schema_lock():
                    storage = RDBStorage(self.url_string, engine_kwargs=engine_options(self.url), skip_compatibility_check=upgrade)
                    if upgrade:
                        logging.disable(logging.INFO)  # Optuna's migration env turns Alembic's INFO chatter on
                        try:
                            storage.upgrade()
                        finally:
                            logging.disable(logging.NOTSET)
                if self.url.get_backend_name() == "sqlite":
                    sqlite_writers(storage.engine)
                return storage

            try:
                self._optuna = self._retry(make, "opening Optuna's tables in")
            except RuntimeError as e:  # Optuna's own schema check
                raise StorageError(f"Optuna's tables at {shown(self.url)} need an upgrade ({first_line(e)}); run `mpsearch db upgrade`") from None
        return self._optuna

    @contextlib.contextmanager
    def _schema_lock(self):
        """Hold the schema lock on PostgreSQL while Optuna creates its tables."""
        if self.url.get_backend_name() != "postgresql":
            yield
            return
        with self.engine.begin() as connection:
            schema.migration_lock(connection)
            yield

    # -- jobs --------------------------------------------------------------------------

    def create_job(self, study: str, spec_toml: str, spec: Mapping[str, Any], host: str | None = None, state: str = "queued") -> str:
        def run():
            with self.session() as s:
                job = Job(study=study, spec_toml=spec_toml, spec=dict(spec), state=state, host=host or socket.gethostname())
                s.add(job)
                s.flush()
                s.add(JobEvent(job_id=job.id, state=state, at=job.created_at))
                return job.id

        return self._retry(run, "writing to")

    def set_job_state(self, job_id: str, state: str, message: str | None = None, *, ray_job_id: str | None = None) -> None:
        """Move a job to ``state`` and append the event; a move the job cannot make is refused."""
        if state not in JOB_STATES:
            raise MPSearchError(f"job state {state!r} is not one of {', '.join(JOB_STATES)}")

        def run():
            with self.session() as s:
                job = s.get(Job, job_id, with_for_update=True)
                if job is None:
                    raise NotFoundError(f"no job {job_id!r}; `mpsearch jobs` lists them")
                if state != job.state and state not in _NEXT[job.state]:
                    raise MPSearchError(f"job {job_id} is {job.state} and cannot become {state}")
                now = utcnow()
                job.state, job.updated_at = state, now
                if state == "running" and job.started_at is None:
                    job.started_at = now
                if state in FINAL_STATES:
                    job.finished_at = now
                if state == "failed":
                    job.error = message
                if ray_job_id is not None:
                    job.ray_job_id = ray_job_id
                s.add(JobEvent(job_id=job_id, state=state, at=now, message=message))

        self._retry(run, "writing to")

    def job(self, job_id: str) -> Job:
        if not _JOB_ID.fullmatch(job_id):  # a NUL or other junk would reach the driver as a bad query
            raise NotFoundError(f"no job {job_id!r}; `mpsearch jobs` lists them")

        def run():
            with self.session() as s:
                job = s.get(Job, job_id)
                if job is None:
                    raise NotFoundError(f"no job {job_id!r}; `mpsearch jobs` lists them")
                job.events  # load the history while the session is open
                return job

        return self._retry(run, "reading")

    def jobs(self, limit: int = 100, study: str | None = None) -> list[Job]:
        def run():
            with self.session() as s:
                query = sa.select(Job).order_by(Job.created_at.desc()).limit(limit)
                if study is not None:
                    query = query.where(Job.study == study)
                return list(s.scalars(query))

        return self._retry(run, "reading")

    def job_events(self, job_id: str) -> list[JobEvent]:
        def run():
            with self.session() as s:
                return list(s.scalars(sa.select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))

        return self._retry(run, "reading")

    # -- sensitivity profiles ----------------------------------------------------------

    def save_profile(self, key: ProfileKey, values: Mapping[str, Any], study: str | None = None, seconds: float | None = None) -> int:
        """Store a profile for ``key``, replacing an older one with the same key."""

        def run():
            with self.session() as s:
                old = s.scalar(self._profile_query(key))
                if old is not None:
                    s.delete(old)
                    s.flush()
                row = SensitivityProfile(
                    method=key.method,
                    model_key=key.model_key,
                    data_key=key.data_key,
                    scheme_key=key.scheme_key,
                    params_key=key.params_key,
                    params=dict(key.params),
                    values=dict(values),
                    study=study,
                    seconds=seconds,
                )
                s.add(row)
                s.flush()
                return row.id

        return self._retry(run, "writing to")

    def find_profile(self, key: ProfileKey) -> SensitivityProfile | None:
        """The profile computed for exactly ``key``, if any."""

        def run():
            with self.session() as s:
                return s.scalar(self._profile_query(key))

        return self._retry(run, "reading")

    @staticmethod
    def _profile_query(key: ProfileKey):
        return sa.select(SensitivityProfile).where(
            SensitivityProfile.method == key.method,
            SensitivityProfile.model_key == key.model_key,
            SensitivityProfile.data_key == key.data_key,
            SensitivityProfile.scheme_key == key.scheme_key,
            SensitivityProfile.params_key == key.params_key,
        )

    # -- exports -----------------------------------------------------------------------

    def record_export(
        self, study: str, trial: int, plan: Mapping[str, Any], nbytes: int, bpw: float, out_dir: str, files: Sequence[tuple[str, int, str]],
        losses: Mapping[str, Any] | None = None,
    ) -> int:
        """Record an export, each file written: (path, size, sha256), and its ``losses``."""

        def run():
            with self.session() as s:
                row = Export(study=study, trial=trial, plan=dict(plan), bytes=nbytes, bpw=bpw, out_dir=out_dir, losses=dict(losses) if losses else None)
                row.files = [ExportFile(path=p, size=size, sha256=digest) for p, size, digest in files]
                s.add(row)
                s.flush()
                return row.id

        return self._retry(run, "writing to")

    def export(self, export_id: int) -> Export:
        def run():
            with self.session() as s:
                row = s.get(Export, export_id)
                if row is None:
                    raise NotFoundError(f"no export {export_id}")
                row.files  # loaded while the session is open
                return row

        return self._retry(run, "reading")

    def exports(self, study: str | None = None) -> list[Export]:
        def run():
            with self.session() as s:
                query = sa.select(Export).order_by(Export.id)
                if study is not None:
                    query = query.where(Export.study == study)
                rows = list(s.scalars(query))
                for row in rows:
                    row.files  # loaded while the session is open
                return rows

        return self._retry(run, "reading")

