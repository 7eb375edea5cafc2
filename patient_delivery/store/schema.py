"""Opening the store: engine settings per database, and in-place schema upgrades with Alembic."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from patient_delivery import private
from patient_delivery.settings import get_settings
from patient_delivery.store.connections import WaitingPool

MIGRATIONS = Path(__file__).parent / "migrations"


def create_store_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, foreign keys and a busy timeout for concurrent runs.

    The pool holds `store_connections`: by default room for every upload lane the process may
    run at once, each reading the documents it sends over a connection of its own, beside the
    connections that start and record batches. A lane waits for the pool up to
    `store_wait_seconds`, and so does a connection PostgreSQL refuses for want of room."""
    parsed = make_url(url)
    settings = get_settings()
    kept, more = settings.store_pool()
    pooling = {"pool_size": kept, "max_overflow": more, "pool_timeout": settings.store_wait_seconds}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            database = Path(parsed.database)
            if not private.warn_if_shared(database, "the store"):
                private.warn_if_shared(database.parent, "the store's folder")
            private.make_file(database)
        in_memory = parsed.database in (None, "", ":memory:")  # one connection per thread
        engine = create_engine(url, connect_args={"timeout": 30}, **({} if in_memory else pooling))

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, poolclass=WaitingPool, **pooling)


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the store's schema to `revision` in place; a no-op when it is already there."""
    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
