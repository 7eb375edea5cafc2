"""Session pools: sessions are reused across batches and bounded per destination."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from patient_delivery.blocks.contract import DeliveryError, TerminalDeliveryError
from patient_delivery.blocks.local import LocalDestination
from patient_delivery.flows.engine import runs as engine_run
from patient_delivery.flows.engine.limits import RunLimits
from patient_delivery.flows.engine.runs import Run
from patient_delivery.flows.engine.sessions import SessionPool


def loader(make: Callable[[str], object]) -> Callable[[Iterable[str]], dict[str, object]]:
    """A run's block reader from one that makes a destination by reference (or raises)."""

    def load(references: Iterable[str]) -> dict[str, object]:
        found: dict[str, object] = {}
        for reference in references:
            try:
                found[reference] = make(reference)
            except Exception as exc:
                found[reference] = exc
        return found

    return load


def a_run(make: Callable[[str], object], sessions: int = 32, name: str = "run-1") -> Run:
    return Run(name, RunLimits(sessions), load=loader(make))  # type: ignore[arg-type]


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


def test_a_run_keeps_one_pool_per_destination_and_another_run_its_own(tmp_path: Path) -> None:
    loads: list[str] = []

    def make(reference: str) -> LocalDestination:
        loads.append(reference)
        return LocalDestination(root=tmp_path)

    first_run, second_run = a_run(make), a_run(make, name="run-2")
    first = first_run.pool("local-destination/a")
    assert first_run.pool("local-destination/a") is first
    assert second_run.pool("local-destination/a") is not first
    assert loads == ["local-destination/a"] * 2
    first_run.close(), second_run.close()


def test_a_run_joined_on_a_worker_closes_itself_once_unused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a Dask worker nobody ends the run: what a finished run opened there must not linger,
    and a run still sending keeps its sessions."""
    monkeypatch.setattr(engine_run, "load_destinations",
                        loader(lambda _: LocalDestination(root=tmp_path)))  # fmt: skip
    limits = RunLimits(2)
    old = engine_run.joined("run-1", limits)
    old_pool = old.pool("local-destination/a")
    with old_pool.lease() as lease:
        lease.session()
    busy = engine_run.joined("run-2", limits)
    assert engine_run.joined("run-2", limits) is busy  # one per run in a process
    monkeypatch.setattr(engine_run, "IDLE_SECONDS", 0.0)
    with busy.pool("local-destination/a").lease():
        time.sleep(0.01)
        engine_run.joined("run-3", limits).close()
        assert old_pool._idle == [] and engine_run.joined("run-1", limits) is not old  # closed
        assert engine_run.joined("run-2", limits) is busy  # kept: a session is lent
    for run in (old, busy):
        run.close()


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
    door = Doorman()
    loads: list[str] = []

    def load(reference: str) -> Doorman:
        loads.append(reference)
        return door

    run = a_run(load)
    run.destinations({"doorman/a": [1]})
    wait_for(lambda: len(door.opened) == 1)
    with run.pool("doorman/a").lease() as lease:
        assert lease.session() is door.opened[0]
    assert loads == ["doorman/a"] and len(door.opened) == 1  # one load, one login
    run.close()
    assert door.closed == door.opened


def test_a_warm_up_opens_a_session_per_lane_to_come_within_the_bound() -> None:
    door = Doorman()  # at most 2 connections
    run = a_run(lambda _: door)
    run.destinations({"doorman/a": range(40)})  # 5 lanes' worth
    wait_for(lambda: len(door.opened) == 2)
    pool = run.pool("doorman/a")
    with pool.lease() as first, pool.lease() as second:  # two lanes at once: both ready
        assert {id(first.session()), id(second.session())} == {id(s) for s in door.opened}
    assert door.attempts == 2
    run.close()
    assert door.closed == door.opened


def test_a_warm_up_whose_first_login_is_refused_tries_no_more() -> None:
    """A wrong password is tried once, not by every lane's warm-up at once."""
    door = Doorman(refusal=TerminalDeliveryError("login refused"))
    run = a_run(lambda _: door)
    run.destinations({"doorman/a": range(16)})  # 2 lanes' worth
    run.close()
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
    door = Doorman()
    run = a_run(lambda _: door)
    door.hold.clear()  # the first warm-up is still logging in when the next page comes
    for _page in range(3):
        run.destinations({"doorman/a": [1]})
    door.hold.set()
    run.close()
    assert len(door.opened) == 1 and door.closed == door.opened


def test_a_failed_warm_up_leaves_the_failure_for_the_upload_to_report() -> None:
    door = Doorman(refusal=TerminalDeliveryError("login refused"))
    run = a_run(lambda ref: door if ref == "doorman/a" else 1 / 0)
    found = run.destinations({"doorman/a": [1], "doorman/b": [2]})
    assert isinstance(found["doorman/b"], ZeroDivisionError)  # told, not raised
    wait_for(lambda: door.attempts == 1)
    pool = run.pool("doorman/a")
    with pytest.raises(TerminalDeliveryError, match="login refused"), pool.lease() as lease:
        lease.session()
    assert door.attempts == 1  # the refusal is remembered for the run
    with pytest.raises(ZeroDivisionError):
        run.pool("doorman/b")
    run.close()


def test_a_run_ends_only_after_its_warm_up_and_closes_what_it_opened() -> None:
    door = Doorman()
    run = a_run(lambda _: door)
    door.hold.clear()  # the server is slow to let us in
    run.destinations({"doorman/a": [1]})
    wait_for(lambda: door.attempts == 1)
    ending = threading.Thread(target=run.close)
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
    doors = {name: Doorman() for name in ("a", "b", "c")}
    run = a_run(doors.__getitem__, sessions=2)
    budget = run.budget
    first, second, third = (run.pool(name) for name in doors)
    for pool in (first, second):
        with pool.lease() as lease:
            lease.session()
    assert (budget.open, first.idle(), len(first._idle)) == (2, True, 1)
    with third.lease() as lease:  # no place left: an idle session is closed for this one
        lease.session()
    assert budget.open == 2 and budget.peak == 2
    assert len(first._idle) + len(second._idle) == 1
    run.close()
    assert budget.open == 0


def test_sessions_in_use_are_never_closed_for_another_which_waits_instead() -> None:
    doors = {name: Doorman() for name in ("a", "b")}
    run = a_run(doors.__getitem__, sessions=1)
    budget = run.budget
    busy, waiting = (run.pool(name) for name in doors)
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
    run.close()


def test_folder_sessions_take_no_place_in_the_budget_and_stay_open_for_the_run(
    tmp_path: Path,
) -> None:
    """A local folder opens no connection: its sessions neither wait for the network budget nor
    are closed to make room in it, so a run's later batches and manifests reuse them."""
    door = Doorman()
    run = a_run(lambda name: door if name == "a" else LocalDestination(root=tmp_path / name),
                sessions=1)  # fmt: skip
    budget = run.budget
    remote = run.pool("a")
    folders = [run.pool(name) for name in ("b", "c", "d")]
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
    run.close()
    assert budget.open == 0 and door.closed == door.opened
