"""The schema of mpsearch's tables: which revision a database is at, and upgrading it.

The migration scripts are the top-level ``alembic/`` folder of the repository, shipped
inside the package as ``mpsearch/storage/migrations`` so that ``mpsearch db upgrade``
works from an installed wheel too.

A brand-new database (no mpsearch tables yet) is created at the newest revision on first
use, so a first run needs no set-up step. A database at an older revision is refused
until ``mpsearch db upgrade`` is run on it; one at a revision this mpsearch does not
know (written by a newer mpsearch) is refused too.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Connection, Engine

from mpsearch.errors import StorageError

VERSION_TABLE = "mpsearch_alembic_version"
# One key for every mpsearch process: PostgreSQL holds it while a schema change runs.
_LOCK_KEY = zlib.crc32(b"mpsearch schema") & 0x7FFFFFFF


def migrations_dir() -> Path:
    return Path(__file__).resolve().parent / "migrations"


def alembic_config(url: URL | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


@lru_cache(maxsize=1)
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    return _scripts().get_current_head()


def current(connection: Connection) -> str | None:
    """The revision the database is at, ``None`` when it has no mpsearch tables yet."""
    return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()


def is_known(revision: str) -> bool:
    try:
        return _scripts().get_revision(revision) is not None
    except Exception:
        return False


def migration_lock(connection: Connection) -> None:
    """Serialize schema changes between processes (SQLite's BEGIN IMMEDIATE already does)."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Upgrade mpsearch's tables to ``revision``; returns (before, after)."""
    with engine.begin() as connection:
        before = current(connection)
        if before is not None and not is_known(before):
            raise newer_schema(engine.url, before)
        config = alembic_config(engine.url)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        after = current(connection)
    return before, after


def check(engine: Engine, create_if_new: bool = True) -> str:
    """Make sure the database is at the head revision (creating a brand-new one); return it."""
    with engine.connect() as connection:
        revision = current(connection)
    target = head()
    if revision == target:
        return revision
    if revision is None and create_if_new:
        return upgrade(engine)[1]
    from mpsearch.storage.database import shown

    fix = f"run `mpsearch db upgrade --storage {engine.url.render_as_string(hide_password=True)}`"
    if revision is None:
        raise StorageError(f"the database at {shown(engine.url)} has no mpsearch tables; {fix}")
    if not is_known(revision):
        raise newer_schema(engine.url, revision)
    raise StorageError(
        f"the database at {shown(engine.url)} has mpsearch schema {revision}, this mpsearch needs {target}; "
        f"{fix} (back it up first)"
    )


def newer_schema(url: URL, revision: str) -> StorageError:
    from mpsearch.storage.database import shown

    return StorageError(
        f"the database at {shown(url)} has mpsearch schema {revision}, newer than this mpsearch knows (its newest is {head()}); "
        "upgrade mpsearch (pip install -U mpsearch) to use it"
    )
