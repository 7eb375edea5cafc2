"""The store: SQLAlchemy engine and sessions over the schema in `models`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from patient_delivery.settings import get_settings
from patient_delivery.store.connections import warn_if_short
from patient_delivery.store.schema import create_store_engine, upgrade


class Store:
    """A database holding patients, documents and the delivery ledger."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self._sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


_open_stores: dict[str, Store] = {}
_lock = threading.Lock()


def open_store(url: str | None = None) -> Store:
    """The store at `url` (default: from settings), its schema upgraded; one per URL per process.
    On PostgreSQL, a pool that may open more connections than the server has to spare is
    logged (`connections.warn_if_short`).

    Tasks running in threads share the store's engine and connection pool.
    """
    url = url or get_settings().resolved_store_url()
    with _lock:
        store = _open_stores.get(url)
        if store is None:
            engine = create_store_engine(url)
            upgrade(engine)
            warn_if_short(engine, sum(get_settings().store_pool()))
            store = _open_stores[url] = Store(engine)
        return store


def release_connections() -> None:
    """Close the idle pooled connections of every store on a database server (they reopen when
    next needed): a run gives its connections back to PostgreSQL when its work ends, not when
    its process exits, which can be long after (Prefect flushes its events first). SQLite's
    connections are files of this process, and stay."""
    with _lock:
        for store in _open_stores.values():
            if store.engine.dialect.name != "sqlite":
                store.engine.dispose()


def close_stores() -> None:
    with _lock:
        for store in _open_stores.values():
            store.dispose()
        _open_stores.clear()
