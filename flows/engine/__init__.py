"""The sending engine behind the delivery flow. The flow calls only this interface; what may
happen at once (`limits`), how sessions are pooled and budgeted (`sessions`, `budget`), how a
page becomes lanes and waves (`waves`), how a wave is sent in batches and rounds (`sending`)
and how manifests are written (`manifests`) stay inside.

    open_run(run, limits)            the run's share of the process's sessions
    destinations(run, claimed)       the page's blocks, read together (an exception for one
                                     that cannot be used)
    warm(run, claimed, limits)       open the first lanes' sessions in the background
    plan(runner, ready, batch)       the page's upload tasks: lanes, wave by wave
    send(run, lanes, batch, limits)  -> reports, one per destination
    manifests_owed(run, project, destinations)  whether manifests are owed (an earlier run's too)
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
from patient_delivery.flows.engine.limits import RunLimits
from patient_delivery.flows.engine.waves import Lane
from patient_delivery.flows.reporting import BatchReport

__all__ = [
    "Lane",
    "RunLimits",
    "close_run",
    "destinations",
    "manifests_owed",
    "open_run",
    "plan",
    "send",
    "warm",
    "write_manifests",
]  # fmt: skip


def open_run(run: str, limits: RunLimits) -> None:
    """Give the run its share of the process's sessions: at most `limits.sessions` open."""
    sessions.pools.budget(run, limits.sessions)


def destinations(run: str, claimed: Collection[str]) -> dict[str, Destination | Exception]:
    """Each claimed destination's block, read together; a block that cannot be loaded or is
    invalid comes back as its exception (the next page tries again)."""
    return sessions.pools.load(run, claimed)


def warm(run: str, claimed: dict[str, list[int]], limits: RunLimits) -> None:
    """Load the page's blocks together and open, in the background, the sessions of the first
    `limits.warm_ups` destinations (as many per destination as its lanes can use), so the
    first uploads find them ready; the rest open as lanes reach them."""
    sessions.pools.load(run, claimed)
    for ref, ids in list(claimed.items())[: limits.warm_ups]:
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


def send(run: str, lanes: list[Lane], batch: int, limits: RunLimits) -> list[BatchReport]:
    """Send one upload task's lanes (`sending.send_wave`); a report per destination."""
    return sending.send_wave(run, lanes, batch, limits)


def manifests_owed(run: str, project_id: str | None, destinations: tuple[str, ...]) -> bool:
    """Whether the run owes manifests: for what it delivered, or for earlier runs' files whose
    manifest could not be written (taken over here, within the run's scope)."""
    return manifests.owed(run, project_id, destinations)


def write_manifests(run: str) -> dict[str, str]:
    """Write a manifest to each destination the run owes one; each destination whose
    manifest could not be written, with the reason (its files wait for the next run's)."""
    return manifests.write_all(run)


def close_run(run: str) -> None:
    sessions.pools.close_run(run)
