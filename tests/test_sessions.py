"""Session pools: sessions are reused across batches and bounded per destination."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from patient_delivery.blocks.contract import DeliveryError, TerminalDeliveryError
from patient_delivery.blocks.local import LocalDestination
from patient_delivery.flows.engine.sessions import PoolRegistry, SessionPool


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
    from patient_delivery.flows.engine import sessions

    registry = PoolRegistry()
    old = registry.get("run-1", "local-destination/a", lambda _: LocalDestination(root=tmp_path))
    with old.lease() as lease:
        lease.session()
    busy = registry.get("run-2", "local-destination/a", lambda _: LocalDestination(root=tmp_path))
    monkeypatch.setattr(sessions, "IDLE_SECONDS", 0.0)
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


class Doorman:
    """A destination whose sessions are only counted: opened, closed, and the door held shut
    (`hold`) or refused (`refusal`) while the test wants."""

    max_connections = 2
    sends_over_network = True

    def __init__(self, refusal: DeliveryError | None = None) -> None:
        self.attempts = 0
        self.opened: list[object] = []
        self.closed: list[object] = []
        self.hold = threading.Event()
        self.hold.set()
        self.refusal = refusal

    @contextmanager
    def delivery_session(self) -> Iterator[object]:
        """What a session pool opens (a destination's `open_session`, sealed when it encrypts)."""
        self.attempts += 1
        self.hold.wait(10)
        if self.refusal is not None:
            raise self.refusal
        session = object()
        self.opened.append(session)
        try:
            yield session
        finally:
            self.closed.append(session)


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_warm_up_opens_the_session_the_first_upload_gets() -> None:
    registry, door = PoolRegistry(), Doorman()
    loads: list[str] = []

    def load(reference: str) -> Doorman:
        loads.append(reference)
        return door

    registry.warm("run-1", "doorman/a", load)  # type: ignore[arg-type]
    wait_for(lambda: len(door.opened) == 1)
    pool = registry.get("run-1", "doorman/a", load)  # type: ignore[arg-type]
    with pool.lease() as lease:
        assert lease.session() is door.opened[0]
    assert loads == ["doorman/a"] and len(door.opened) == 1  # one load, one login
    registry.close_run("run-1")
    assert door.closed == door.opened


def test_a_warm_up_opens_a_session_per_lane_to_come_within_the_bound() -> None:
    registry, door = PoolRegistry(), Doorman()  # at most 2 connections
    registry.warm("run-1", "doorman/a", lambda _: door, sessions=5)  # type: ignore[arg-type,return-value]
    wait_for(lambda: len(door.opened) == 2)
    pool = registry.get("run-1", "doorman/a", lambda _: door)  # type: ignore[arg-type,return-value]
    with pool.lease() as first, pool.lease() as second:  # two lanes at once: both ready
        assert {id(first.session()), id(second.session())} == {id(s) for s in door.opened}
    assert door.attempts == 2
    registry.close_run("run-1")
    assert door.closed == door.opened


def test_a_warm_up_whose_first_login_is_refused_tries_no_more() -> None:
    """A wrong password is tried once, not by every lane's warm-up at once."""
    registry, door = PoolRegistry(), Doorman(refusal=TerminalDeliveryError("login refused"))
    registry.warm("run-1", "doorman/a", lambda _: door, sessions=2)  # type: ignore[arg-type,return-value]
    registry.close_run("run-1")
    assert door.attempts == 1 and door.opened == []


def test_a_session_opened_ahead_never_takes_the_pool_past_its_bound() -> None:
    door = Doorman()
    pool = SessionPool(door)  # type: ignore[arg-type]
    with pool.lease() as lease:
        lease.session()
    assert pool.open_one()  # one idle, one opened ahead: the bound of 2
    with pool.lease() as lease:
        lease.session()
        assert not pool.open_one()  # one lent, one idle
    assert door.attempts == 2
    pool.close()
    assert not pool.open_one() and door.attempts == 2  # nor after it closed


def test_a_destination_is_warmed_once_per_run_however_many_pages_it_claims() -> None:
    registry, door = PoolRegistry(), Doorman()
    door.hold.clear()  # the first warm-up is still logging in when the next page comes
    for _page in range(3):
        registry.warm("run-1", "doorman/a", lambda _: door)  # type: ignore[arg-type,return-value]
    door.hold.set()
    registry.close_run("run-1")
    assert len(door.opened) == 1 and door.closed == door.opened


def test_a_failed_warm_up_leaves_the_failure_for_the_upload_to_report() -> None:
    registry, door = PoolRegistry(), Doorman(refusal=TerminalDeliveryError("login refused"))
    registry.warm("run-1", "doorman/a", lambda _: door)  # type: ignore[arg-type,return-value]
    registry.warm("run-1", "doorman/b", lambda _: 1 / 0)  # type: ignore[arg-type,return-value]
    registry.close_run("run-1")  # waits for both warm-ups; neither raised
    pool = registry.get("run-2", "doorman/a", lambda _: door)  # type: ignore[arg-type,return-value]
    with pytest.raises(TerminalDeliveryError, match="login refused"), pool.lease() as lease:
        lease.session()
    with pytest.raises(ZeroDivisionError):
        registry.get("run-2", "doorman/b", lambda _: 1 / 0)  # type: ignore[arg-type,return-value]


def test_a_run_ends_only_after_its_warm_up_and_closes_what_it_opened() -> None:
    registry, door = PoolRegistry(), Doorman()
    door.hold.clear()  # the server is slow to let us in
    registry.warm("run-1", "doorman/a", lambda _: door)  # type: ignore[arg-type,return-value]
    ending = threading.Thread(target=registry.close_run, args=("run-1",))
    ending.start()
    time.sleep(0.05)
    assert ending.is_alive()  # it waits for the login on its way
    door.hold.set()
    ending.join(10)
    assert len(door.opened) == 1 and door.closed == door.opened


def test_a_session_returned_after_its_pool_closed_is_closed_not_kept() -> None:
    """A run that crashed closes its pools while uploads may still hold sessions."""
    door = Doorman()
    pool = SessionPool(door)  # type: ignore[arg-type]
    with pool.lease() as lease:
        lease.session()
        pool.close()
        assert door.closed == []
    assert door.closed == door.opened and pool._idle == []


def test_a_runs_budget_closes_idle_sessions_of_other_destinations_to_make_room() -> None:
    registry = PoolRegistry()
    budget = registry.budget("run", limit=2)
    doors = {name: Doorman() for name in ("a", "b", "c")}
    first, second, third = (registry.get("run", name, doors.get) for name in doors)  # type: ignore[arg-type]
    for pool in (first, second):
        with pool.lease() as lease:
            lease.session()
    assert (budget.open, first.idle(), len(first._idle)) == (2, True, 1)
    with third.lease() as lease:  # no place left: an idle session is closed for this one
        lease.session()
    assert budget.open == 2 and budget.peak == 2
    assert len(first._idle) + len(second._idle) == 1
    registry.close_run("run")
    assert budget.open == 0


def test_sessions_in_use_are_never_closed_for_another_which_waits_instead() -> None:
    registry = PoolRegistry()
    budget = registry.budget("run", limit=1)
    doors = {name: Doorman() for name in ("a", "b")}
    busy, waiting = (registry.get("run", name, doors.get) for name in doors)  # type: ignore[arg-type]
    opened = threading.Event()

    def second() -> None:
        with waiting.lease() as lease:
            lease.session()
            opened.set()

    with busy.lease() as lease:
        lease.session()
        thread = threading.Thread(target=second)
        thread.start()
        assert not opened.wait(0.3)  # the budget is spent by a session in use
    thread.join(timeout=5)  # once it is idle, it is closed for the waiting one
    assert opened.is_set() and budget.peak == 1
    registry.close_run("run")


def test_folder_sessions_take_no_place_in_the_budget_and_stay_open_for_the_run(
    tmp_path: Path,
) -> None:
    """A local folder opens no connection: its sessions neither wait for the network budget nor
    are closed to make room in it, so a run's later batches and manifests reuse them."""
    registry = PoolRegistry()
    budget = registry.budget("run", limit=1)
    door = Doorman()
    remote = registry.get("run", "doorman/a", lambda _: door)  # type: ignore[arg-type,return-value]
    folders = [registry.get("run", name, lambda name: LocalDestination(root=tmp_path / name))
               for name in ("b", "c", "d")]  # fmt: skip
    opened: list[object] = []

    def open_folders() -> None:
        for pool in folders:
            with pool.lease() as folder:
                opened.append(folder.session())

    with remote.lease() as lease:
        lease.session()  # the budget's one place, in use
        thread = threading.Thread(target=open_folders, daemon=True)
        thread.start()
        thread.join(5)
        assert len(opened) == len(folders), "a folder session waited for the network budget"
    assert budget.open == 1
    with remote.lease() as lease:
        lease.session()  # the idle network session, lent again
    for pool, session in zip(folders, opened, strict=True):
        with pool.lease() as folder:
            assert folder.session() is session  # none closed to make room
    assert door.attempts == 1
    registry.close_run("run")
    assert budget.open == 0 and door.closed == door.opened
