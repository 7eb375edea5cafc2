"""The bulk exports a server has accepted and not yet begun, written a few at a time with the
organizations taken in turn: an organization that asks for many exports waits behind its own,
not in front of everyone else's (first in, first out within an organization only).

The queue says every few seconds that its exports still wait (`bulk_export.still_waiting`), so
an export left in the queue of a server that stopped is told apart and taken up by another
(`bulk_export.orphans`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from sqlalchemy import select

from patient_delivery.pull import bulk_export
from patient_delivery.store import Store
from patient_delivery.store.models import BulkExport

WAITING_SAID_SECONDS = 10.0
"""How often the queue says its exports still wait (well within `bulk_export.SILENT_SECONDS`)."""

log = logging.getLogger("patient_delivery.exports")


class ExportQueue:
    """`write(export_id)` for each export started, at most `writers` at once, organizations in
    turn. `start` returns at once; the writers are daemon threads of this process."""

    def __init__(self, store: Store, write: Callable[[str], None], writers: int) -> None:
        self.store = store
        self.write = write
        self._waiting: OrderedDict[str, deque[str]] = OrderedDict()
        self._served: dict[str, int] = {}
        """Each organization's last turn (`_turn` when its last export began)."""
        self._turn = 0
        self._ready = threading.Condition()
        for number in range(writers):
            threading.Thread(target=self._writer, name=f"bulk-export-{number}",
                             daemon=True).start()  # fmt: skip
        threading.Thread(target=self._say_waiting, name="bulk-export-queue", daemon=True).start()

    def start(self, export_id: str) -> None:
        """Queue an accepted export behind the others of its organization."""
        with self.store.session() as session:
            organization = session.scalar(
                select(BulkExport.organization_id).where(BulkExport.id == export_id)
            )
        with self._ready:
            self._waiting.setdefault(organization or "", deque()).append(export_id)
            self._ready.notify()

    def waiting(self) -> list[str]:
        """The exports not yet begun, in no particular order."""
        with self._ready:
            return [export_id for queue in self._waiting.values() for export_id in queue]

    def _next(self) -> str:
        """The first export of the waiting organization served least recently (one never
        served first, then in order of arrival)."""
        with self._ready:
            while not self._waiting:
                self._ready.wait()
            organization = min(self._waiting, key=lambda name: self._served.get(name, -1))
            queue = self._waiting[organization]
            export_id = queue.popleft()
            if not queue:
                del self._waiting[organization]
            self._turn += 1
            self._served[organization] = self._turn
            return export_id

    def _writer(self) -> None:
        while True:
            export_id = self._next()
            try:
                self.write(export_id)
            except Exception:  # the export is marked failed by its writer; the queue goes on
                log.exception("bulk export %s could not be written", export_id[:8])

    def _say_waiting(self) -> None:
        while True:
            time.sleep(WAITING_SAID_SECONDS)
            try:
                bulk_export.still_waiting(self.store, self.waiting())
            except Exception:  # a store that did not answer: said again at the next turn
                log.warning("could not record that bulk exports still wait", exc_info=True)
