"""What a delivery process, and each run in it, may do at once: every bound in one place.

A **session** is what one upload lane holds while it sends: for SFTP one SSH connection, for S3
one lane of the destination's client (its `files_in_flight` puts share that client's
connections), for a local folder an open folder (no connection). Each bound has one meaning:

    sessions       destination sessions open at once, idle ones included (the process's, from
                   `PATIENT_DELIVERY_MAX_SESSIONS`; a run's, from its `max_sessions`, within it)
    lanes          a run's threads sending (and opening sessions ahead): one per session it
                   may have open
    disk writers   the process's threads sending to folders on this machine, which wait on its
                   disk and CPU rather than on a peer: a few at once are as fast as many
    warm-ups       destinations whose first sessions open while a page's paths render: no
                   more than the run may have open

Each destination's own `max_connections` bounds its share of a run's sessions. The process's
limits are made the first time they are needed, from the settings of that moment (a Dask worker
reads its own), never at import.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from patient_delivery.settings import get_settings

DISK_WRITERS = max(4, 2 * (os.cpu_count() or 1))
"""Sends at once, in one process, to folders on this machine: more only contend for fsync and
the ledger's lock."""


class ProcessLimits:
    """The process's bounds, over every destination and run."""

    def __init__(self, sessions: int, disk_writers: int = DISK_WRITERS) -> None:
        self.sessions = max(1, sessions)
        self.disk_writers = max(1, disk_writers)
        self.disk = ThreadPoolExecutor(self.disk_writers, thread_name_prefix="disk-writer")
        """The threads that send to folders on this machine, shared by every run."""


@functools.cache
def process() -> ProcessLimits:
    """This process's limits, made from its settings on first use."""
    return ProcessLimits(get_settings().max_sessions)


@dataclass(frozen=True)
class RunLimits:
    """A run's bounds, all from its one setting: the sessions it may have open at once."""

    sessions: int

    def __post_init__(self) -> None:
        if self.sessions < 1:
            raise ValueError("max_sessions: at least 1")

    def lanes(self, on_this_machine: bool = False) -> int:
        """Lanes the run sends at once: one per session; to folders on this machine no more
        than the process's disk writers (fewer, fuller ledger batches)."""
        return min(self.sessions, process().disk_writers) if on_this_machine else self.sessions

    @property
    def warm_ups(self) -> int:
        """Destinations whose first sessions open early: each needs a session of its own."""
        return self.sessions
