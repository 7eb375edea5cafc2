"""A PostgreSQL store with no connection to spare: work waits for one rather than fails.

PostgreSQL refuses a connection past `max_connections` at once. Every delivery process opens its
own pool, so a deployment can ask for more than the server allows (nine runs on a server of 40
once failed 8 of 9). These tests run a server of their own with a few slots, take every slot
the server gives, and give them back while the work waits.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from loopback.servers import PostgresServer
from patient_delivery import ingest
from patient_delivery.seed import seed_project
from patient_delivery.settings import get_settings
from patient_delivery.store import close_stores, open_store
from patient_delivery.store.connections import refused_for_room, room
from patient_delivery.store.schema import create_store_engine
from tests.faults import check_invariant
from tests.test_deliver_flow import save_local
from tests.test_local_destination import FolderRemote

WAITING = "PostgreSQL has no connection to spare"
SHORT = "the store's pool may open"


@pytest.fixture(scope="module")
def narrow() -> Iterator[PostgresServer]:
    """A PostgreSQL that allows 12 connections (3 of them kept for superusers)."""
    server = PostgresServer(max_connections=12)
    yield server
    server.stop()


def take_every_slot(server: PostgresServer) -> list[psycopg.Connection]:
    """Connections until the server refuses one, held by the caller (as a superuser, so the
    reserved slots are taken too)."""
    held: list[psycopg.Connection] = []
    while True:
        try:
            held.append(psycopg.connect(server.dsn("postgres")))
        except psycopg.OperationalError as exc:
            assert refused_for_room(exc), exc
            assert held, "the server refused the first connection"
            return held


def give_back(held: list[psycopg.Connection]) -> None:
    for connection in held:
        connection.close()


@pytest.fixture
def wait_seconds(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def set_to(seconds: int) -> None:
        monkeypatch.setenv("PATIENT_DELIVERY_STORE_WAIT_SECONDS", str(seconds))
        get_settings.cache_clear()

    yield set_to  # type: ignore[misc]
    monkeypatch.delenv("PATIENT_DELIVERY_STORE_WAIT_SECONDS")
    get_settings.cache_clear()


def take_the_roles_slots(url: str, limit: int) -> list[psycopg.Connection]:
    """Every connection a role with a CONNECTION LIMIT may hold, as that role."""
    held = [psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) for _ in range(limit)]
    with pytest.raises(psycopg.OperationalError, match="too many connections for role") as more:
        psycopg.connect(url.replace("postgresql+psycopg", "postgresql"))
    assert refused_for_room(more.value)
    return held


@pytest.mark.parametrize("limit", ["max_connections", "role"])
def test_a_connection_refused_for_want_of_room_waits_for_one(
    narrow: PostgresServer, wait_seconds, caplog: pytest.LogCaptureFixture, limit: str
) -> None:  # type: ignore[no-untyped-def]
    """The server full, or the store's role at its CONNECTION LIMIT (which keeps room for
    Prefect's server on the same PostgreSQL): the connection waits until one is given back."""
    wait_seconds(60)
    if limit == "role":
        url = narrow.database(connection_limit=2)
        held = take_the_roles_slots(url, 2)
    else:
        url = narrow.database()
        held = take_every_slot(narrow)
    engine = create_store_engine(url)
    threading.Timer(1.5, give_back, [held]).start()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "patient_delivery"), engine.connect() as connection:
        assert connection.execute(text("SELECT 1")).scalar() == 1
    waited = time.monotonic() - started
    engine.dispose()
    assert 1.4 < waited < 30, waited
    told = [r.getMessage() for r in caplog.records if WAITING in r.getMessage()]
    assert len(told) == 1, caplog.text  # once, however many tries
    assert "max_connections" in told[0] and "docs/operations.md" in told[0]


def test_the_wait_ends_with_the_servers_own_refusal_after_store_wait_seconds(
    narrow: PostgresServer, wait_seconds
) -> None:  # type: ignore[no-untyped-def]
    wait_seconds(1)
    engine = create_store_engine(narrow.database())
    held = take_every_slot(narrow)
    try:
        started = time.monotonic()
        with pytest.raises(OperationalError, match="too many clients already"):
            engine.connect().close()
        assert 0.9 < time.monotonic() - started < 10
    finally:
        give_back(held)
        engine.dispose()


def test_a_pool_larger_than_the_server_has_to_spare_is_named_at_start(
    narrow: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = narrow.database()
    with caplog.at_level(logging.WARNING, "patient_delivery"):
        store = open_store(url)
    slots = room(store.engine)
    close_stores()
    assert slots is not None and (slots.most, slots.reserved) == (12, 3)
    [line] = [r.getMessage() for r in caplog.records if SHORT in r.getMessage()]
    most = sum(get_settings().store_pool())
    assert f"may open {most} connections in this process" in line
    assert f"PostgreSQL has {slots.spare} to spare (max_connections 12, " in line
    assert "PATIENT_DELIVERY_STORE_CONNECTIONS" in line and "role's limit" not in line
    assert url.split("@")[-1] not in line  # no address, no credentials
    with caplog.at_level(logging.WARNING, "patient_delivery"):
        roomy = create_store_engine(url)
        from patient_delivery.store.connections import warn_if_short

        assert not warn_if_short(roomy, 4)  # a pool the server can hold is not named
        roomy.dispose()


@pytest.mark.usefixtures("prefect_api")
def test_runs_in_processes_wait_for_the_roles_connections_and_deliver_each_document_once(
    narrow: PostgresServer, tmp_path: Path
) -> None:
    """The store's role may hold 4 connections, all taken when two runs start: both wait, both
    end 0 once they are given back, sharing the 4 between pools of 42 (each thread waits its
    turn, and takes a connection its own process gave back)."""
    from prefect.settings import PREFECT_API_URL

    url = narrow.database(connection_limit=4)
    store = open_store(url)
    ingest.add_organization(store, "Acme", "acme")
    project = ingest.add_project(store, "acme", "Study", "study")
    root = tmp_path / "org-folder"
    reference = save_local(root)
    ingest.subscribe(store, project, reference)
    seed_project(store, project, 150, size_scale=0.2)  # 300 documents
    close_stores()
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PATIENT_DELIVERY_STORE_URL": url,
        "PATIENT_DELIVERY_STORE_WAIT_SECONDS": "120",
    }
    command = [str(Path(sys.executable).parent / "patient-delivery"), "deliver",
               "--batch-size", "5", "--page-size", "40"]  # fmt: skip
    held = take_the_roles_slots(url, 4)
    logs = [tmp_path / f"run-{n}.log" for n in range(2)]
    runs = []
    try:
        for log in logs:
            with log.open("wb") as out:
                runs.append(
                    subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
                )
        deadline = time.monotonic() + 90
        while not all(WAITING in log.read_text() for log in logs):
            assert all(run.poll() is None for run in runs), [
                log.read_text()[-2000:] for log in logs
            ]
            assert time.monotonic() < deadline, "the runs never waited for a connection"
            time.sleep(0.2)
    finally:
        give_back(held)
    for run, log in zip(runs, logs, strict=True):
        assert run.wait(timeout=240) == 0, log.read_text()[-3000:]
        said = log.read_text()
        assert said.count(WAITING) >= 1 and "the role's limit 4" in said, said[-3000:]
        assert "Traceback" not in said, said[-3000:]

    store = open_store(url)
    figures = check_invariant(store, {reference: FolderRemote(root)})
    close_stores()
    assert (figures.rows, figures.delivered, figures.owed) == (300, 300, 0), figures
    assert (figures.lost, figures.duplicated, figures.partial, figures.leftovers) == (0, 0, 0, 0)
