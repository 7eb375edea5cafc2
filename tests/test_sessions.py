"""Session pools: sessions are reused across batches and bounded per destination."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from blocks.local import LocalDestination
from flows.sessions import PoolRegistry, SessionPool


def test_a_returned_session_is_lent_again(tmp_path: Path) -> None:
    pool = SessionPool(LocalDestination(root=tmp_path, max_connections=2))
    with pool.lease() as first:
        session = first.session()
    with pool.lease() as second:
        assert second.session() is session
    pool.close()


def test_a_reset_session_is_replaced(tmp_path: Path) -> None:
    pool = SessionPool(LocalDestination(root=tmp_path))
    with pool.lease() as lease:
        broken = lease.session()
        lease.reset()
        assert lease.session() is not broken


def test_no_more_than_max_connections_are_lent_at_once(tmp_path: Path) -> None:
    pool = SessionPool(LocalDestination(root=tmp_path, max_connections=2))
    active, peak, lock = 0, 0, threading.Lock()

    def batch() -> None:
        nonlocal active, peak
        with pool.lease() as lease:
            lease.session()
            with lock:
                active += 1
                peak = max(peak, active)
            time.sleep(0.05)
            with lock:
                active -= 1

    threads = [threading.Thread(target=batch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak == 2


def test_registry_keeps_one_pool_per_run_and_destination(tmp_path: Path) -> None:
    registry = PoolRegistry()
    loads: list[str] = []

    def load(reference: str) -> LocalDestination:
        loads.append(reference)
        return LocalDestination(root=tmp_path)

    first = registry.get("run-1", "local-destination/a", load)
    assert registry.get("run-1", "local-destination/a", load) is first
    assert registry.get("run-2", "local-destination/a", load) is not first
    registry.close_run("run-1")
    assert registry.get("run-1", "local-destination/a", load) is not first
    assert loads == ["local-destination/a"] * 3


def test_pools_unused_for_a_while_close_themselves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a Dask worker nobody calls close_run: idle pools of finished runs must not linger."""
    import flows.sessions

    registry = PoolRegistry()
    old = registry.get("run-1", "local-destination/a", lambda _: LocalDestination(root=tmp_path))
    with old.lease() as lease:
        lease.session()
    busy = registry.get("run-2", "local-destination/a", lambda _: LocalDestination(root=tmp_path))
    monkeypatch.setattr(flows.sessions, "IDLE_SECONDS", 0.0)
    with busy.lease():
        time.sleep(0.01)
        registry.get("run-3", "local-destination/a", lambda _: LocalDestination(root=tmp_path))
        assert old._idle == []  # closed: it was idle
        assert registry.get("run-2", "local-destination/a", lambda _: 1 / 0) is busy  # kept: lent


def test_a_destination_counts_as_down_after_two_documents_in_a_row_gave_up(
    tmp_path: Path,
) -> None:
    pool = SessionPool(LocalDestination(root=tmp_path))
    with pool.lease() as lease:
        lease.gave_up("timed out")
        lease.delivered()  # one document failing alone: the others go on
        lease.gave_up("timed out")
        assert pool.down is None
        lease.gave_up("connection refused")
    assert pool.down == "connection refused"
