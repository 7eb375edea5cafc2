"""The sending engine behind the delivery flow. The flow calls only this interface; how
sessions are pooled and budgeted (`sessions`, `budget`), how a page becomes lanes and waves
(`waves`), how a wave is sent in batches and rounds (`sending`) and how manifests are written
(`manifests`) stay inside.

    open_run(run, connections)       the run's share of the process's connections
    destinations(run, claimed)       the page's blocks, read together (an exception for one
                                     that cannot be used)
    warm(run, claimed, connections)  open the first lanes' sessions in the background
    plan(runner, ready, batch)       the page's upload tasks: lanes, wave by wave
    send(run, lanes, batch, connections) -> reports, one per destination
    write_manifests(run)             last: the destinations whose manifest was not written
    close_run(run)                   close the run's sessions
"""

from __future__ import annotations

import math
from collections.abc import Collection

from prefect.task_runners import TaskRunner

from patient_delivery.blocks import load_destination
from patient_delivery.blocks.base import Destination
from patient_delivery.flows import runtime
from patient_delivery.flows.engine import manifests, sending, sessions, waves
from patient_delivery.flows.engine.waves import Lane
from patient_delivery.flows.reporting import BatchReport

__all__ = [
    "Lane", "close_run", "destinations", "open_run", "plan", "send", "warm", "write_manifests",
]  # fmt: skip


def open_run(run: str, connections: int) -> None:
    """Give the run its connection budget: at most `connections` open at once."""
    sessions.pools.budget(run, connections)


def destinations(run: str, claimed: Collection[str]) -> dict[str, Destination | Exception]:
    """Each claimed destination's block, read together; a block that cannot be loaded or is
    invalid comes back as its exception (the next page tries again)."""
    return sessions.pools.load(run, claimed)


def warm(run: str, claimed: dict[str, list[int]], connections: int) -> None:
    """Load the page's blocks together and open, in the background, the sessions of the first
    `connections` destinations (as many per destination as its lanes can use), so the first
    uploads find them ready; the rest open as lanes reach them."""
    sessions.pools.load(run, claimed)
    for ref, ids in list(claimed.items())[:connections]:
        lanes = math.ceil(len(ids) / waves.MIN_LANE)
        sessions.pools.warm(run, ref, load_destination, sessions=lanes)


def plan(
    runner: TaskRunner | None,  # type: ignore[type-arg]
    ready: dict[str, tuple[list[int], int]],
    batch: int,
) -> list[list[Lane]]:
    """The page's upload tasks, in order: each a wave's lanes (one task on the flow's threads,
    a bounded few on Dask), the waves interleaving destinations."""
    return [
        lanes
        for wave in waves.plan_waves(ready, batch)
        for lanes in runtime.split_wave(runner, wave)
    ]


def send(run: str, lanes: list[Lane], batch: int, connections: int) -> list[BatchReport]:
    """Send one upload task's lanes (`sending.send_wave`); a report per destination."""
    return sending.send_wave(run, lanes, batch, connections)


def write_manifests(run: str) -> dict[str, str]:
    """Write a manifest to each destination the run delivered to; each destination whose
    manifest could not be written, with the reason."""
    return manifests.write_all(run)


def close_run(run: str) -> None:
    sessions.pools.close_run(run)
