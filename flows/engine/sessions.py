"""Destination sessions shared by a run's upload tasks: opened once, reused, bounded.

Opening a session is the expensive part of a delivery (an SSH handshake and login, an STS
AssumeRole), so a run keeps up to `max_connections` sessions per destination and lends them to
its upload batches in turn. The same bound is the per-destination concurrency limit: a batch
waits for a free session. A session that failed is dropped and reopened on next use. Once two
documents in a row have used up their retries on temporary errors, the destination counts as
down for the rest of the run: its other deliveries fail at once and wait for the next run.

Over every destination and run, a process keeps at most its `limits.process().sessions` open
(`SessionBudget`), a run at most its own: a session waiting idle in its pool keeps its place
until another needs it, and is then closed to make room. Sends to this machine's own folders
are bounded apart, by the process's disk writers (`PoolRegistry.writing`).
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress

from patient_delivery.blocks import load_destinations
from patient_delivery.blocks.base import Destination
from patient_delivery.blocks.contract import DeliveryError, DestinationSession
from patient_delivery.flows.engine import limits, retries
from patient_delivery.flows.engine.budget import Closing, Opened, SessionBudget


class Lease:
    """One session lent to one batch; `reset()` drops it after a failure."""

    def __init__(self, pool: SessionPool, opened: Opened | None) -> None:
        self._pool = pool
        self._opened = opened

    def session(self, wait_for_budget: bool = True) -> DestinationSession:
        if self._opened is None:
            self._opened = self._pool.open(wait_for_budget)
        return self._opened[1]

    def reset(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:
            Closing(opened, self._pool.budget).close()

    def gave_up(self, reason: str) -> None:
        """A document used up its retries on a temporary error; drop the session."""
        self.reset()
        self._pool.gave_up(reason)

    def delivered(self) -> None:
        self._pool.delivered()

    def refused(self, reason: str) -> None:
        """The destination refused the session for good (not a temporary failure): it counts
        as down for the rest of the run."""
        self.reset()
        self._pool.down = reason


class SessionPool:
    """At most `destination.max_connections` sessions of one destination, reused across batches."""

    def __init__(
        self,
        destination: Destination,
        budget: SessionBudget | None = None,
        on_idle: Callable[[SessionPool], None] | None = None,
    ) -> None:
        self.destination = destination
        self.budget = budget if budget is not None else process_budget()
        self._on_idle = on_idle
        """Told when a session starts waiting idle here (the registry's list of pools to take
        idle sessions from)."""
        self._limit = destination.max_connections
        self._idle: list[Opened] = []
        self._lent = 0
        self._available = threading.Condition()
        self.down: str | None = None
        """Why the destination is considered down for the rest of the run, once it is."""
        self._given_up = 0
        self._closed = False
        self._first = threading.Lock()
        self._opened_once = False
        self.refusal: DeliveryError | None = None
        """The destination's answer when it refused a session for good (a login, a host key):
        given to every later open in this run instead of asking again."""

    def gave_up(self, reason: str) -> None:
        """Count a document that used up its retries. Two in a row, with no delivery between,
        mark the destination down; one alone may be a document that fails by itself, and must
        not hold back the others in every run."""
        with self._available:
            self._given_up += 1
            if self._given_up >= retries.DOWN_AFTER:
                self.down = reason

    def delivered(self) -> None:
        with self._available:
            self._given_up = 0

    def open(self, wait_for_budget: bool = True) -> Opened:
        """Open a session within the budget. Until one has opened, they open one at a time, the
        others waiting for its outcome; once the destination refused one for good, the others
        get that refusal without asking: a wrong password is tried once per run, not once per
        lane and warm-up (an account lockout policy counts every try)."""
        with nullcontext() if self._opened_once else self._first:
            if self.refusal is not None:
                raise self.refusal.with_traceback(None)
            self.budget.acquire(wait=wait_for_budget)
            try:
                context = self.destination.delivery_session()
                opened = (context, context.__enter__())
            except BaseException as exc:
                self.budget.release()
                if isinstance(exc, DeliveryError) and not exc.retryable:
                    self.refusal = exc
                raise
            self._opened_once = True
            return opened

    @contextmanager
    def lease(self) -> Iterator[Lease]:
        with self._available:
            self._available.wait_for(lambda: self._lent < self._limit)
            self._lent += 1
            opened = self._idle.pop() if self._idle else None
        lease = Lease(self, opened)
        try:
            yield lease
        except BaseException:
            lease.reset()
            raise
        finally:
            self._give_back(lease)

    def _give_back(self, lease: Lease) -> None:
        """End a lease: its session, if it has one, waits idle for the next."""
        with self._available:
            returned, lease._opened = lease._opened, None
            idle = returned is not None and not self._closed
            if idle:
                self._idle.append(returned)  # type: ignore[arg-type]
                returned = None
            self._lent -= 1
            self._available.notify()
        if returned is not None:  # a lease that outlived its pool (a slow warm-up)
            Closing(returned, self.budget).close()
        elif idle and self._on_idle is not None:
            self._on_idle(self)

    def open_one(self) -> bool:
        """Open one more session, where the pool's bound leaves room, and keep it idle for the
        next lease. A failure is left for that lease to meet (and report), so nothing is lost
        by trying early. Whether a session opened."""
        with self._available:
            if self._closed or self._lent + len(self._idle) >= self._limit:
                return False
            self._lent += 1
        lease = Lease(self, None)
        try:
            lease.session(wait_for_budget=False)
        except Exception:
            return False
        finally:
            self._give_back(lease)
        return True

    def open_some(self, count: int) -> None:
        """Open up to `count` sessions for the next leases: the first alone, so that a
        destination refusing it is not asked again by the others at once; then the rest side
        by side."""
        if count < 1 or not self.open_one():
            return
        others = [threading.Thread(target=self.open_one, name="session-warm-up", daemon=True)
                  for _ in range(min(count, self._limit) - 1)]  # fmt: skip
        for thread in others:
            thread.start()
        for thread in others:
            thread.join()

    def take_idle(self) -> tuple[Closing | None, bool]:
        """Hand over one idle session (the longest idle), to be closed by the caller; and
        whether others are still idle."""
        with self._available:
            taken = Closing(self._idle.pop(0), self.budget) if self._idle else None
            return taken, bool(self._idle)

    def idle(self) -> bool:
        """No session is lent out right now."""
        with self._available:
            return self._lent == 0

    def close(self) -> None:
        with self._available:
            idle, self._idle = self._idle, []
            self._closed = True
        for opened in idle:
            Closing(opened, self.budget).close()


IDLE_SECONDS = 120.0
"""A run's pool unused this long is closed when another is asked for: on Dask workers the flow's
`close_run` cannot reach the pools, so they close themselves this way."""


class PoolRegistry:
    """The pools of each running flow, keyed by destination; closed when the run ends (in the
    flow's process) or after `IDLE_SECONDS` unused (in any other, e.g. a Dask worker)."""

    def __init__(self) -> None:
        self._pools: dict[tuple[str, str], SessionPool] = {}
        self._used: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._warming: dict[tuple[str, str], threading.Thread] = {}
        """Each run's warm-up per destination: one, however many pages the run claims."""
        self._budgets: dict[str, SessionBudget] = {}
        self._swept = time.monotonic()
        self._with_idle: dict[SessionPool, str] = {}
        """The pools that may have an idle session, with their run, in the order they had one:
        where a budget takes a session to close, without looking through every pool."""

    def budget(self, run: str, limit: int | None = None) -> SessionBudget:
        """The run's session budget (within the process's), made on first use with `limit`
        (default: the process's own)."""
        with self._lock:
            made = self._budgets.get(run)
            if made is None:
                made = self._budgets[run] = SessionBudget(
                    limit or process_budget().limit,
                    idle=lambda: self.take_idle(run),
                    parent=process_budget(),
                )
            return made

    def get(self, run: str, reference: str, load: Callable[[str], Destination]) -> SessionPool:
        now = time.monotonic()
        with self._lock:
            closing = self._sweep(now)
            pool = self._pools.get((run, reference))
        if pool is None:
            made = self._pool(run, load(reference))
            with self._lock:
                pool = self._pools.setdefault((run, reference), made)
        with self._lock:
            self._used[(run, reference)] = now
        for old in closing:
            old.close()
        return pool

    def on_this_machine(
        self, run: str, references: Iterable[str], load: Callable[[str], Destination]
    ) -> bool:
        """Whether every one of these destinations writes on this machine (none sends over a
        network); False when a block cannot be loaded (its send reports why)."""
        try:
            return all(
                not self.get(run, reference, load).destination.sends_over_network
                for reference in references
            )
        except Exception:
            return False

    def writing(
        self, run: str, references: Iterable[str], load: Callable[[str], Destination]
    ) -> AbstractContextManager[object]:
        """A place among the process's disk writers when every one of these destinations
        writes on this machine; otherwise nothing to wait for. Taken before a lane's slot, so
        writers waiting for the disk never hold places that network sends could use."""
        local = self.on_this_machine(run, references, load)
        return limits.process().disk_slots if local else nullcontext()

    def _sweep(self, now: float) -> list[SessionPool]:
        """Take out the pools unused for `IDLE_SECONDS` (looked for at most every tenth of
        that, so that a run with many destinations does not scan them all on every batch)."""
        if now - self._swept < IDLE_SECONDS / 10:
            return []
        self._swept = now
        stale = [key for key, used in self._used.items()
                 if now - used > IDLE_SECONDS and self._pools[key].idle()]  # fmt: skip
        for key in stale:
            del self._used[key]
        closing = [self._pools.pop(key) for key in stale]
        for pool in closing:
            self._with_idle.pop(pool, None)
        return closing

    def load(self, run: str, references: Iterable[str]) -> dict[str, Destination | Exception]:
        """Each destination of a run, its pool made on first use; those not yet loaded in
        this run are read together (`blocks.load_destinations`: a few API calls however many
        there are). A block that cannot be loaded is returned as its exception, and tried
        again by the next page."""
        found: dict[str, Destination | Exception] = {}
        with self._lock:
            for reference in references:
                pool = self._pools.get((run, reference))
                if pool is not None:
                    found[reference] = pool.destination
        missing = [r for r in references if r not in found]
        loaded = load_destinations(missing) if missing else {}
        budget, now = self.budget(run), time.monotonic()
        with self._lock:
            for reference, destination in loaded.items():
                found[reference] = destination
                if isinstance(destination, Destination):
                    self._pools.setdefault((run, reference), self._pool(run, destination, budget))
                    self._used[(run, reference)] = now
        return found

    def _pool(
        self, run: str, destination: Destination, budget: SessionBudget | None = None
    ) -> SessionPool:
        def had_idle(pool: SessionPool) -> None:
            with self._lock:
                self._with_idle[pool] = run

        if not destination.sends_over_network:  # a folder here: no connection to count
            return SessionPool(destination, FOLDER_SESSIONS)
        return SessionPool(destination, budget or self.budget(run), on_idle=had_idle)

    def take_idle(self, run: str | None = None) -> Closing | None:
        """An idle session of the run's pools (of any pool, without `run`), the pool that had
        one first, handed over to be closed to make room in a budget."""
        while True:
            with self._lock:
                pool = next((p for p, r in self._with_idle.items() if run in (None, r)), None)
                if pool is None:
                    return None
                owner = self._with_idle.pop(pool)
            idle, more = pool.take_idle()
            if more:
                with self._lock:
                    self._with_idle.setdefault(pool, owner)
            if idle is not None:
                return idle

    def warm(
        self, run: str, reference: str, load: Callable[[str], Destination], sessions: int = 1
    ) -> None:
        """Load a destination and open up to `sessions` of its sessions in the background, while
        the run renders paths: its uploads then find their SSH logins or the S3 client (an STS
        call and botocore's models) done instead of waiting for them. Only where uploads run in
        this process; a failure is met again, and reported, by an upload.
        """

        def open_some() -> None:
            with suppress(Exception):
                self.get(run, reference, load).open_some(sessions)

        with self._lock:
            if (run, reference) in self._warming:  # once per run and destination
                return
            thread = threading.Thread(target=open_some, name="session-warm-up", daemon=True)
            self._warming[(run, reference)] = thread
            thread.start()  # under the lock, so close_run never joins one not yet started

    def close_run(self, run: str) -> None:
        with self._lock:
            warming = [t for (r, _), t in self._warming.items() if r == run]
            self._warming = {k: t for k, t in self._warming.items() if k[0] != run}
        for thread in warming:  # before closing, so no session opens after its pool closed
            thread.join()
        with self._lock:
            pools = [p for (r, _), p in self._pools.items() if r == run]
            self._pools = {k: v for k, v in self._pools.items() if k[0] != run}
            self._used = {k: v for k, v in self._used.items() if k[0] != run}
            self._budgets.pop(run, None)
            self._with_idle = {p: r for p, r in self._with_idle.items() if r != run}
        for pool in pools:
            pool.close()


FOLDER_SESSIONS = SessionBudget(sys.maxsize, idle=lambda: None)
"""Sessions of destinations on this machine (local folders) open no connection, so they take no
place in a session budget: they stay open for the run's later batches and its manifests,
and closing one would make no room for a network session. The disk writers bound their sends."""


@functools.cache
def process_budget() -> SessionBudget:
    """The sessions this process may have open at once, over every destination and run."""
    return SessionBudget(limits.process().sessions, idle=lambda: pools.take_idle())


pools = PoolRegistry()
"""The sessions of the runs in this process (the flow's, or a Dask worker's), shared by their
upload tasks. Used through the module (`sessions.pools`), so that the flow and its tasks pickle
for Dask without it: each process has its own."""
