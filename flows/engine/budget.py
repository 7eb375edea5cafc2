"""The session budget: how many destination sessions may be open at once.

A run has one within its process's. A session that waits idle in its pool keeps its place until
another session needs one; then an idle session is closed to make room. A session in use is
never closed for another: one that must open waits until a place is free.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from typing import NamedTuple

from patient_delivery.blocks.contract import DestinationSession

Opened = tuple[AbstractContextManager[DestinationSession], DestinationSession]
"""An open session: the context manager that closes it, and the session."""


class BudgetSpent(Exception):
    """Every place in the session budget is taken by a session in use."""


class SessionBudget:
    """At most `limit` sessions open at once: a run's, within its process's (`parent`).

    A session that waits idle in its pool keeps its place until another session needs one;
    then an idle session (`idle()` finds one) is closed to make room. A session in use is never
    closed for another: one that must open waits until a place is free.
    """

    def __init__(
        self,
        limit: int,
        idle: Callable[[], Closing | None],
        parent: SessionBudget | None = None,
    ) -> None:
        self.limit = max(1, limit)
        self.idle = idle
        self.parent = parent
        self.open = 0
        self.peak = 0
        """Most sessions open at once so far."""
        self.changed = threading.Condition()

    def acquire(self, wait: bool = True) -> None:
        """Take a place for a session about to open (raises `BudgetSpent` when `wait` is
        False and none is free, even after closing an idle session)."""
        while True:
            with self.changed:
                took = self.open < self.limit
                if took:
                    self.open += 1
                    self.peak = max(self.peak, self.open)
            if took:
                if self.parent is not None:
                    try:
                        self.parent.acquire(wait)
                    except BaseException:
                        self._give_back()
                        raise
                return
            closing = self.idle()
            if closing is not None:
                closing.close()  # gives its place back
                continue
            if not wait:
                raise BudgetSpent
            with self.changed:
                self.changed.wait_for(lambda: self.open < self.limit, timeout=0.5)

    def release(self) -> None:
        """Give back a place (and the process's, for a run's budget)."""
        self._give_back()
        if self.parent is not None:
            self.parent.release()

    def _give_back(self) -> None:
        with self.changed:
            self.open -= 1
            self.changed.notify()


class Closing(NamedTuple):
    """A session on its way out, and the budget its place goes back to."""

    opened: Opened
    budget: SessionBudget

    def close(self) -> None:
        """Close the session (a broken connection may fail to close; it is dropped either
        way) and give its place back."""
        try:
            with suppress(Exception):
                self.opened[0].__exit__(None, None, None)
        finally:
            self.budget.release()
