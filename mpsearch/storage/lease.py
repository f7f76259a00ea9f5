"""One driver per study: a lease in the database, kept alive by a heartbeat.

A driver takes the study's lease before any work and gives it back when it ends. While a
driver holds it, a second driver on the same study is refused with one line naming the
holder; the API answers 409. A lease whose driver is dead is taken over:

* on the holder's own host, at once, when its process no longer exists (a SIGKILL, a crash);
* from anywhere, once its heartbeat is older than ``$MPSEARCH_LEASE_STALE_S`` (60 s), for a
  driver on a host that went away. The heartbeat is written every ``stale / 6`` seconds.

Taking and handing over are single statements (an INSERT on the study's primary key, an
UPDATE conditional on the old holder and heartbeat), so two drivers racing for one lease
cannot both win. Times are the drivers' UTC clocks: hosts whose clocks differ by more than
the stale time should not share a study.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from mpsearch.errors import MPSearchError, StorageError
from mpsearch.storage.models import StudyLease, utcnow

log = logging.getLogger(__name__)

STALE_ENV = "MPSEARCH_LEASE_STALE_S"
DEFAULT_STALE_S = 60.0


class StudyBusy(MPSearchError):
    """The study is being searched by a live driver (a 409 in the API)."""


def stale_s() -> float:
    try:
        value = float(os.environ.get(STALE_ENV, DEFAULT_STALE_S))
    except ValueError:
        raise StorageError(f"${STALE_ENV} must be a number of seconds, got {os.environ[STALE_ENV]!r}") from None
    return max(value, 1.0)


class Lease:
    """This driver's lease on ``study``; a context manager that heartbeats until it exits."""

    def __init__(self, storage, study: str):
        self.storage, self.study = storage, study
        self.token = uuid.uuid4().hex
        self.stale_s = stale_s()
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Lease":
        self.storage.retrying(self._take, "writing to")
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.study}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            with self.storage.engine.begin() as c:
                c.execute(sa.delete(StudyLease).where(StudyLease.study == self.study, StudyLease.holder == self.token))
        except Exception as e:  # noqa: BLE001 - on the way out: a lease left behind is taken over later
            log.warning("could not give back the lease on study %r (%s); the next driver takes it over", self.study, e)

    # -- taking it ---------------------------------------------------------------------

    def _take(self) -> None:
        now = utcnow()
        row = {"study": self.study, "holder": self.token, "host": socket.gethostname()[:255], "pid": os.getpid(), "since": now, "heartbeat_at": now}
        try:
            with self.storage.engine.begin() as c:
                c.execute(sa.insert(StudyLease).values(**row))
            return
        except IntegrityError:
            pass  # held, or left by a dead driver
        with self.storage.engine.begin() as c:
            held = c.execute(sa.select(StudyLease).where(StudyLease.study == self.study)).one_or_none()
        if held is None:  # given back between the two statements
            return self._take()
        if not self._dead(held):
            raise StudyBusy(busy_message(held))
        with self.storage.engine.begin() as c:
            taken = c.execute(
                sa.update(StudyLease)
                .where(StudyLease.study == self.study, StudyLease.holder == held.holder, StudyLease.heartbeat_at == held.heartbeat_at)
                .values(**{k: v for k, v in row.items() if k != "study"})
            ).rowcount
        if taken != 1:  # another driver took it over first
            return self._take()
        log.warning("took over the lease on study %r from a dead driver (%s, pid %s)", self.study, held.host, held.pid)

    def _dead(self, held) -> bool:
        if held.host == socket.gethostname()[:255] and not pid_alive(held.pid):
            return True
        return _age_s(held.heartbeat_at) > self.stale_s

    # -- keeping it --------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_s / 6):
            try:
                with self.storage.engine.begin() as c:
                    kept = c.execute(
                        sa.update(StudyLease).where(StudyLease.study == self.study, StudyLease.holder == self.token).values(heartbeat_at=utcnow())
                    ).rowcount
            except Exception as e:  # noqa: BLE001 - a database restart: the next beat tries again
                log.info("lease heartbeat for study %r failed (%s); trying again", self.study, e)
                continue
            if kept != 1 and not self.lost:
                self.lost = True
                log.warning("the lease on study %r was taken over by another driver; this one's heartbeat had stopped for too long", self.study)


def holder(storage, study: str) -> StudyLease | None:
    """The live lease on ``study``, if a driver holds one."""
    with storage.engine.begin() as c:
        held = c.execute(sa.select(StudyLease).where(StudyLease.study == study)).one_or_none()
    if held is None or _age_s(held.heartbeat_at) > stale_s():
        return None
    return held


def busy_message(held) -> str:
    since = _aware(held.since).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"study {held.study!r} is being searched by another driver (host {held.host}, pid {held.pid}, since {since}, "
        f"last heartbeat {_age_s(held.heartbeat_at):.0f} s ago); wait for it to end or stop it, then run with --resume"
    )


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)  # SQLite gives naive datetimes back


def _age_s(at: datetime) -> float:
    return (utcnow() - _aware(at)) / timedelta(seconds=1)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie, exited but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: what kill said
