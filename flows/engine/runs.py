"""One delivery run's engine in one process: its destinations' session pools within its
budget, the threads its lanes send on, its warm-ups.

The flow's process makes the run's own (`engine.run`), which the flow and its tasks use and
which closes when the run ends. A run handed to a Dask worker arrives there by id
(`Run.__reduce__`): the worker joins it, with pools and lanes of its own, and closes what it
joined once unused for `IDLE_SECONDS`. A process keeps only that lookup from run id to run.
"""

from __future__ import annotations

import contextvars
import functools
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import TypeVar

from patient_delivery.blocks import load_destinations
from patient_delivery.blocks.base import Destination
from patient_delivery.flows import runtime
from patient_delivery.flows.engine import limits, manifests, sending, waves
from patient_delivery.flows.engine.budget import Closing, SessionBudget
from patient_delivery.flows.engine.limits import RunLimits
from patient_delivery.flows.engine.sessions import FOLDER_SESSIONS, SessionPool
from patient_delivery.flows.engine.waves import Lane
from patient_delivery.flows.reporting import BatchReport

T = TypeVar("T")

Loader = Callable[[Iterable[str]], dict[str, Destination | Exception]]
"""Reads destination blocks by reference; one that cannot be used comes back as its exception."""

IDLE_SECONDS = 120.0
"""A run joined by a process other than the flow's (a Dask worker) and unused this long is
closed when another run is joined there: nobody else would close its sessions."""

DASK_TASKS_PER_WAVE = 16
"""Most upload tasks a wave becomes on Dask: enough to spread its lanes over the workers, few
enough that Prefect's work does not grow with the number of destinations."""


class Run:
    """A run's sessions, lanes and warm-ups in this process.

    `uploads_here`: its upload tasks run in this process (the flow's threads), so a page's
    first sessions open while its paths render, and a wave is one upload task; on Dask a wave
    is up to `DASK_TASKS_PER_WAVE` tasks and nothing opens ahead.
    """

    def __init__(
        self,
        run_id: str,
        run_limits: RunLimits,
        uploads_here: bool = True,
        load: Loader | None = None,
    ) -> None:
        self.id = run_id
        self.limits = run_limits
        self.uploads_here = uploads_here
        self._load = load or load_destinations
        self.budget = SessionBudget(run_limits.sessions, idle=self.take_idle,
                                    parent=process_budget())  # fmt: skip
        self._pools: dict[str, SessionPool] = {}
        self._with_idle: dict[SessionPool, None] = {}
        """The pools that may have an idle session, in the order they had one: where the
        budget takes a session to close, without looking through every pool."""
        self._lock = threading.Lock()
        self._lanes = ThreadPoolExecutor(run_limits.sessions, thread_name_prefix="upload-lane")
        self._warming: set[str] = set()
        self.used = time.monotonic()
        self.joined = False
        """Made for another process's run (a Dask worker's): closed once unused."""

    def __reduce__(self) -> tuple[Callable[[str, RunLimits], Run], tuple[str, RunLimits]]:
        """Sent to another process (a Dask worker), a run is its id and limits: the worker
        joins the run there."""
        return joined, (self.id, self.limits)

    # -- destinations

    def destinations(self, claimed: Mapping[str, Sized]) -> dict[str, Destination | Exception]:
        """Each claimed destination's block, those not yet loaded in this run read together;
        one that cannot be used comes back as its exception (and is read again when next asked
        for). Where uploads run here, the first `limits.warm_ups` destinations start opening
        sessions for their deliveries' lanes while the caller goes on (renders their paths)."""
        references = list(claimed)
        found = self._loaded(references)
        if self.uploads_here:
            for ref in references[: self.limits.warm_ups]:
                if not isinstance(found[ref], Exception):
                    self._warm(ref, math.ceil(len(claimed[ref]) / waves.MIN_LANE))
        return {ref: pool if isinstance(pool, Exception) else pool.destination
                for ref, pool in found.items()}  # fmt: skip

    def pool(self, reference: str) -> SessionPool:
        """The destination's session pool, its block loaded on first use (raises if it cannot
        be)."""
        found = self._loaded([reference])[reference]
        if isinstance(found, Exception):
            raise found
        return found

    def _loaded(self, references: list[str]) -> dict[str, SessionPool | Exception]:
        """Each destination's pool, made for those not yet loaded in this run, whose blocks
        are read together; a block that cannot be used comes back as its exception."""
        with self._lock:
            found: dict[str, SessionPool | Exception] = {
                ref: self._pools[ref] for ref in references if ref in self._pools
            }
        missing = [ref for ref in references if ref not in found]
        loaded = self._load(missing) if missing else {}
        with self._lock:
            for ref, destination in loaded.items():
                if isinstance(destination, Exception):
                    found[ref] = destination
                else:
                    found[ref] = self._pools.setdefault(ref, self._pool(destination))
        self.used = time.monotonic()
        return found

    def _pool(self, destination: Destination) -> SessionPool:
        if not destination.sends_over_network:  # a folder here: no connection to count
            return SessionPool(destination, FOLDER_SESSIONS)
        return SessionPool(destination, self.budget, on_idle=self._had_idle)

    def _had_idle(self, pool: SessionPool) -> None:
        with self._lock:
            self._with_idle[pool] = None

    def take_idle(self) -> Closing | None:
        """An idle session of this run (of the pool that had one first), handed over to be
        closed to make room in a budget."""
        while True:
            with self._lock:
                pool = next(iter(self._with_idle), None)
                if pool is None:
                    return None
                del self._with_idle[pool]
            idle, more = pool.take_idle()
            if more:
                with self._lock:
                    self._with_idle.setdefault(pool, None)
            if idle is not None:
                return idle

    def on_this_machine(self, references: Iterable[str]) -> bool:
        """Whether every one of these destinations writes on this machine (none sends over a
        network); False when a block cannot be loaded (its send reports why)."""
        try:
            return all(not self.pool(ref).destination.sends_over_network for ref in references)
        except Exception:
            return False

    # -- work

    def plan(self, ready: dict[str, tuple[list[int], int]], batch: int) -> list[list[Lane]]:
        """A page's upload tasks, in order: each a wave's lanes (one task where uploads run
        here, up to `DASK_TASKS_PER_WAVE` on Dask), the waves interleaving destinations."""
        tasks = 1 if self.uploads_here else DASK_TASKS_PER_WAVE
        return [lanes for wave in waves.plan_waves(ready, batch)
                for lanes in waves.split(wave, tasks)]  # fmt: skip

    def submit(self, references: Iterable[str], work: Callable[[], T]) -> Future[T]:
        """Do `work` on one of the run's lanes, or, when every one of these destinations
        writes on this machine, on one of the process's disk writers (which wait on the disk,
        never holding a lane network sends could use). It runs in the caller's context: on a
        Dask worker, Prefect's settings live in the task's, not in the process."""
        threads = limits.process().disk if self.on_this_machine(references) else self._lanes
        return threads.submit(contextvars.copy_context().run, work)

    def send(self, lanes: list[Lane], batch_size: int) -> list[BatchReport]:
        """Send one upload task's lanes; a report per destination (`sending.send_wave`)."""
        return sending.send_wave(self, lanes, batch_size)

    def manifests_owed(self, project_id: str | None, destinations: tuple[str, ...]) -> bool:
        """Whether the run owes manifests: for what it delivered, or for earlier runs' files
        whose manifest could not be written (taken over here, within the run's scope)."""
        return manifests.owed(self.id, project_id, destinations)

    def write_manifests(self) -> dict[str, str]:
        """Write a manifest to each destination the run owes one; each destination whose
        manifest could not be written, with the reason (its files wait for the next run's)."""
        return manifests.write_all(self)

    # -- warm-ups and the end

    def _warm(self, reference: str, sessions: int) -> None:
        """Open up to `sessions` of a destination's sessions on the run's lanes, once per run:
        the first alone, so that a destination refusing it is asked once; once it opened, the
        rest side by side. A failure is left for an upload to meet and report."""
        with self._lock:
            if reference in self._warming or sessions < 1:
                return
            self._warming.add(reference)
            pool = self._pools[reference]
        self._lanes.submit(self._open_first, pool, sessions)

    def _open_first(self, pool: SessionPool, sessions: int) -> None:
        if pool.open_one():
            with suppress(RuntimeError):  # the run ended meanwhile: nothing more to open
                for _ in range(min(sessions, pool.destination.max_connections) - 1):
                    self._lanes.submit(pool.open_one)

    def idle(self) -> bool:
        """No session of the run is lent out."""
        with self._lock:
            pools = list(self._pools.values())
        return all(pool.idle() for pool in pools)

    def close(self) -> None:
        """Wait for the warm-ups and lanes under way, then close every session; the process
        forgets the run."""
        with _runs_lock:
            if _runs.get(self.id) is self:
                del _runs[self.id]
        self._lanes.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
            self._with_idle.clear()
        for pool in pools:
            pool.close()


_runs: dict[str, Run] = {}
_runs_lock = threading.Lock()


@contextmanager
def run(run_id: str, run_limits: RunLimits) -> Iterator[Run]:
    """The run's engine in the flow's process, closed (every session) when the run ends."""
    made = Run(run_id, run_limits, uploads_here=runtime.uploads_run_here())
    with _runs_lock:
        _runs[run_id] = made
    try:
        yield made
    finally:
        made.close()


def joined(run_id: str, run_limits: RunLimits) -> Run:
    """The run in this process: the flow's own here, or one made for a Dask worker when the
    run's first task arrives. Runs joined here and unused for `IDLE_SECONDS` are closed."""
    now = time.monotonic()
    with _runs_lock:
        found = _runs.get(run_id)
        if found is None:
            found = _runs[run_id] = Run(run_id, run_limits, uploads_here=False)
            found.joined = True
        found.used = now
        stale = [r for r in _runs.values()
                 if r.joined and now - r.used > IDLE_SECONDS and r.idle()]  # fmt: skip
    for old in stale:
        with suppress(Exception):
            old.close()
    return found


def take_idle() -> Closing | None:
    """An idle session of any run in this process, to close to make room in its budget."""
    with _runs_lock:
        runs = list(_runs.values())
    for each in runs:
        idle = each.take_idle()
        if idle is not None:
            return idle
    return None


@functools.cache
def process_budget() -> SessionBudget:
    """The sessions this process may have open at once, over every destination and run; when
    none is free, an idle one of any run is closed to make room."""
    return SessionBudget(limits.process().sessions, idle=take_idle)
