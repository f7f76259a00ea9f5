"""Alembic environment for mpsearch's tables (see mpsearch/storage/schema.py).

mpsearch passes an open connection in ``config.attributes["connection"]``; Alembic's own
CLI passes a URL with ``-x url=...``. Either way the history is kept in
``mpsearch_alembic_version``, apart from Optuna's ``alembic_version`` in the same database.
"""

from alembic import context

from mpsearch.storage.database import create_engine, parse_url
from mpsearch.storage.models import Base
from mpsearch.storage.schema import VERSION_TABLE, migration_lock

config = context.config


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            migration_lock(connection)
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    engine = create_engine(parse_url(url))
    with engine.connect() as connection:
        _configure(connection)
        with context.begin_transaction():
            migration_lock(connection)
            context.run_migrations()


def run_offline() -> None:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    context.configure(url=str(parse_url(url)), target_metadata=Base.metadata, version_table=VERSION_TABLE, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
