"""Deliver on update, fast: listen for `patient.data.updated` and run deliveries in-process.

A deployment trigger starts a run through a worker, which polls and then spawns a Python
process for it: seconds from event to file. This listener keeps one process warm, follows
Prefect's event stream over its websocket, and starts the delivery flow in its own process as
soon as an update arrives; while it runs, that trigger is paused (flows/handover.py). Events
that arrive within `quiet_seconds` of each other, or while a run is going, are coalesced into
the next single run: a burst of updates for a project costs one run, and none is lost (the
ledger, not the event, says what is owed; the schedule catches anything missed while the
listener was down). Updates a run already sent start no run: the listener asks the ledger
first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from patient_delivery.events import EVENT

logger = logging.getLogger("patient_delivery.listener")


class UpdateListener:
    def __init__(
        self,
        deliver: Callable[..., object],
        quiet_seconds: float = 0.2,
        on_run: Callable[[set[str]], None] | None = None,
        owed: Callable[[str | None], int] | None = None,
        hold: Callable[[threading.Event], None] | None = None,
    ) -> None:
        self._deliver = deliver
        self._quiet = quiet_seconds
        self._on_run = on_run
        self._owed = owed
        self._hold = hold
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.ready = threading.Event()
        self.stopped = threading.Event()

    def notice(self, project_ids: set[str]) -> None:
        """Record that these projects have something new (called for every event)."""
        with self._lock:
            self._pending |= project_ids or {""}
        self._wake.set()

    async def _follow(self) -> None:
        from prefect.events.clients import get_events_subscriber
        from prefect.events.filters import EventFilter, EventNameFilter

        event_filter = EventFilter(event=EventNameFilter(name=[EVENT]))
        async with get_events_subscriber(filter=event_filter) as subscriber:
            self.ready.set()
            async for event in subscriber:
                projects = {
                    related.get("prefect.resource.name", "")
                    for related in event.related
                    if related.get("prefect.resource.role") == "project"
                }
                self.notice({p for p in projects if p})
                if self.stopped.is_set():
                    return

    def _follow_forever(self) -> None:
        while not self.stopped.is_set():
            try:
                asyncio.run(self._follow())
            except Exception as exc:  # the stream dropped: reconnect, the ledger loses nothing
                logger.warning("event stream lost (%s); reconnecting", type(exc).__name__)
                self.stopped.wait(1.0)

    def run(self) -> None:
        """Follow events and deliver until `stopped` is set."""
        threading.Thread(target=self._follow_forever, name="update-events", daemon=True).start()
        holding = threading.Thread(target=self._hold or (lambda _: None), args=(self.stopped,),
                                   name="update-trigger", daemon=True)  # fmt: skip
        holding.start()
        try:
            self._deliver_on_updates()
        finally:
            holding.join(timeout=30)  # the trigger given back before the process ends

    def _deliver_on_updates(self) -> None:
        while not self.stopped.is_set():
            if not self._wake.wait(timeout=0.5):
                continue
            self.stopped.wait(self._quiet)  # let a burst finish arriving
            with self._lock:
                projects, self._pending = self._pending, set()
                self._wake.clear()
            only = next(iter(projects)) if len(projects) == 1 and "" not in projects else None
            if self._owed and not self._owed(only):
                continue  # a run going when they were announced sent them: no run for nothing
            if self._on_run:
                self._on_run(projects)
            try:
                self._deliver(project=only)
            except Exception as exc:  # a failed run is in Prefect and the ledger; keep listening
                logger.error("delivery run failed: %s", type(exc).__name__)
