"""Engines for one storage URL: SQLite with WAL and a busy timeout, PostgreSQL with pings,
bounded retries on connection errors, and one-line errors for everything a user can fix.

SQLite notes. Several processes may write one file (the search driver, job updates, the
API). In WAL mode readers never block writers; writers queue on the file lock, waiting
up to the busy timeout. Every transaction starts with ``BEGIN IMMEDIATE`` (it takes the
write lock up front), because a transaction that starts as a reader and later writes
can fail at once with "database is locked" when another writer got in between: SQLite
does not wait in that case, since waiting could deadlock.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from mpsearch.errors import StorageError, first_line

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///mpsearch.db"
SQLITE_BUSY_TIMEOUT_S = 60
CONNECT_ATTEMPTS = 3
RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 5.0
RETRY_ENV = "MPSEARCH_DB_RETRY_S"
DEFAULT_RETRY_S = 120.0
URL_HELP = "use sqlite:///FILE.db or postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DATABASE"

T = TypeVar("T")


def parse_url(url: str) -> URL:
    """The URL as SQLAlchemy reads it, with ``postgresql://`` given the psycopg 3 driver.

    >>> parse_url("postgresql://postgres@127.0.0.1:5432/test").drivername
    'postgresql+psycopg'
    >>> parse_url("mysql:/x")
    Traceback (most recent call last):
    ...
    mpsearch.errors.StorageError: storage URL 'mysql:/x' is malformed; use sqlite:///FILE.db or postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DATABASE
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise StorageError(f"storage URL {url!r} is malformed; {URL_HELP}") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        elif parsed.drivername != "postgresql+psycopg":
            raise StorageError(f"storage URL {shown(parsed)} asks for driver {parsed.drivername!r}; mpsearch uses postgresql+psycopg")
        if not parsed.database:
            raise StorageError(f"storage URL {shown(parsed)} names no database; add /DATABASE at the end")
    elif backend == "sqlite":
        if parsed.drivername != "sqlite":
            raise StorageError(f"storage URL {shown(parsed)} asks for driver {parsed.drivername!r}; use plain sqlite:///FILE.db")
        if not parsed.database or parsed.database == ":memory:":
            raise StorageError(f"storage URL {shown(parsed)} is not a file; results must outlive the process, {URL_HELP}")
    else:
        raise StorageError(f"storage URL {shown(parsed)} uses {backend!r}, which mpsearch does not support; {URL_HELP}")
    return parsed


def shown(url: URL | str) -> str:
    """The URL for messages, password hidden."""
    if isinstance(url, str):
        return repr(url)
    return repr(url.render_as_string(hide_password=True))


def engine_options(url: URL) -> dict:
    """``create_engine`` keyword arguments for ``url`` (also handed to Optuna's storage)."""
    if url.get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 5}}


def create_engine(url: URL) -> Engine:
    try:
        engine = sa.create_engine(url, **engine_options(url))
    except (NoSuchModuleError, ArgumentError, ImportError) as e:
        raise StorageError(f"storage URL {shown(url)} cannot be used ({e}); {URL_HELP}") from None
    if url.get_backend_name() == "sqlite":
        sqlite_writers(engine)
    return engine


def sqlite_writers(engine: Engine) -> None:
    """WAL, a busy timeout and ``BEGIN IMMEDIATE`` on every connection ``engine`` opens.

    Connections already pooled are dropped first, so none escapes the settings.
    """
    engine.dispose()

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, below
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def check_sqlite_path(url: URL) -> None:
    folder = Path(url.database).expanduser().resolve().parent
    if not folder.is_dir():
        raise StorageError(f"cannot create the SQLite file {url.database!r}: folder {str(folder)!r} does not exist; create it or pick another path")


# -- errors a user can act on, and retries for the ones that pass ------------------------

_AUTH = re.compile(r"password authentication failed|role \"[^\"]*\" does not exist|no password supplied|authentication failed", re.I)
_NO_DB = re.compile(r"database \"([^\"]*)\" does not exist", re.I)
_UNREACHABLE = re.compile(
    r"connection refused|could not connect|could not translate host name|timeout expired|connection timed out|"
    r"server closed the connection|terminating connection|connection is closed|the database system is (starting up|shutting down)|"
    r"no route to host|network is unreachable|connection reset|unable to open database file|database is locked",
    re.I,
)


def database_error(error: BaseException) -> DBAPIError | None:
    """The driver error behind ``error``: itself, or the cause Optuna (``StorageInternalError``) or
    SQLAlchemy wrapped it in."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, DBAPIError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def is_transient(error: BaseException) -> bool:
    """A connection that failed or dropped, or a busy SQLite file: worth another try."""
    found = database_error(error)
    if found is None:
        return False
    text = str(found.orig) if found.orig is not None else str(found)
    if _AUTH.search(text) or _NO_DB.search(text):
        return False
    return bool(found.connection_invalidated or _UNREACHABLE.search(text))


def where(url: URL) -> str:
    """The database, for messages: ``HOST:PORT`` for a server, the file for SQLite (no password)."""
    if url.get_backend_name() == "postgresql":
        return f"{url.host or 'localhost'}:{url.port or 5432}"
    return str(url.database)


def explain(error: BaseException, url: URL, attempts: int | None = CONNECT_ATTEMPTS, window_s: float | None = None) -> StorageError:
    """A one-line :class:`StorageError` for a database error a user can fix."""
    found = database_error(error) or error
    text = first_line(getattr(found, "orig", None) or found)
    at = where(url)
    if _AUTH.search(text):
        return StorageError(f"cannot log in to PostgreSQL at {at} as {url.username!r} ({text}); check the user and password in the storage URL")
    if m := _NO_DB.search(text):
        return StorageError(f"PostgreSQL at {at} has no database {m.group(1)!r}; create it (createdb {m.group(1)}) or fix the storage URL")
    if not is_transient(error):
        return StorageError(f"the database at {at} refused the operation ({text}); this is not a connection problem, so it was not retried")
    if url.get_backend_name() == "sqlite":
        return StorageError(f"cannot use the SQLite file {at!r} ({text}); check the path and its permissions")
    if window_s is not None:
        return StorageError(
            f"lost the database at {at} for {window_s:.0f} s ({text}); nothing complete is lost: once it is back, run the same command with --resume"
        )
    return StorageError(f"cannot reach the database at {at} after {attempts} tries ({text}); start the server or fix the storage URL")


def retry_window_s() -> float:
    """How long an operation waits out a database that went away mid-run: ``$MPSEARCH_DB_RETRY_S``, default 120 s."""
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)))
    except ValueError:
        raise StorageError(f"${RETRY_ENV} must be a number of seconds, got {os.environ[RETRY_ENV]!r}") from None


def with_retries(fn: Callable[[], T], url: URL, what: str = "the database", attempts: int = CONNECT_ATTEMPTS, window_s: float | None = None) -> T:
    """Run ``fn``; on a transient error (a connection refused or dropped) try again with a growing
    pause: ``attempts`` times, or with ``window_s`` for as long as that (a server that restarts
    mid-run). Any other error is reported at once, not retried."""
    deadline = None if window_s is None else time.monotonic() + window_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - Optuna wraps driver errors; database_error() finds them
            if database_error(e) is None:
                raise
            exhausted = attempt >= attempts if deadline is None else time.monotonic() >= deadline
            if not is_transient(e) or exhausted:
                raise explain(e, url, attempts, window_s) from None
            delay = min(RETRY_DELAY_S * 2 ** (attempt - 1), MAX_RETRY_DELAY_S)
            if deadline is not None:
                delay = max(0.0, min(delay, deadline - time.monotonic()))
            # Waiting out a database that went away mid-run is worth a line on stderr; the first
            # contact's few retries are not (a wrong URL ends in one line of its own).
            log.log(logging.INFO if deadline is None else logging.WARNING, "%s at %s: %s; retrying in %.1f s", what, where(url), first_line(database_error(e).orig or e), delay)
            time.sleep(delay)
