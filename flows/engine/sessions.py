"""A destination's sessions within a run: opened once, reused, bounded.

Opening a session is the expensive part of a delivery (an SSH handshake and login, an STS
AssumeRole), so a run keeps up to `max_connections` sessions per destination and lends them to
its upload batches in turn. The same bound is the per-destination concurrency limit: a batch
waits for a free session. Until one session has opened, the others wait for it, so a
destination that refuses (a wrong password, a changed host key) is asked once per run. A
session that failed is dropped and reopened on next use. Once two documents in a row have used
up their retries on temporary errors, the destination counts as down for the rest of the run:
its other deliveries fail at once and wait for the next run.

Every session opens within a budget (`budget.SessionBudget`: the run's, within the process's);
sessions of folders on this machine open no connection and take no place in one.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

from patient_delivery.blocks.base import Destination
from patient_delivery.blocks.contract import DeliveryError, DestinationSession
from patient_delivery.flows.engine import retries
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
    """At most `destination.max_connections` sessions of one destination, reused across batches,
    each opened within `budget` (none: `FOLDER_SESSIONS`, no bound)."""

    def __init__(
        self,
        destination: Destination,
        budget: SessionBudget | None = None,
        on_idle: Callable[[SessionPool], None] | None = None,
    ) -> None:
        self.destination = destination
        self.budget = budget if budget is not None else FOLDER_SESSIONS
        self._on_idle = on_idle
        """Told when a session starts waiting idle here (the run's list of pools to take idle
        sessions from)."""
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


FOLDER_SESSIONS = SessionBudget(sys.maxsize, idle=lambda: None)
"""Sessions of destinations on this machine (local folders) open no connection, so they take no
place in a session budget: they stay open for the run's later batches and its manifests,
and closing one would make no room for a network session. The disk writers bound their sends."""
