"""How a page's uploads are cut: lanes (one connection's share), waves, and shared batches.

    plan_waves     -> each destination's deliveries as lanes of one size, at most one lane per
                      connection in a wave; a wave interleaves every destination's lanes
    shared_batches -> a wave's lanes as units of work for its threads: a destination with many
                      documents keeps its lanes; destinations with few share one ledger batch
    split          -> a wave's lanes as several upload tasks (on Dask)

Pure planning: no I/O, no Prefect.
"""

from __future__ import annotations

import math

Lane = tuple[str, list[int]]
"""One connection's share of a wave: a destination's block reference and delivery IDs."""

BATCHES_PER_LANE = 5
"""Most ledger batches a lane sends in one wave: progress moves at least this often."""

MIN_LANE = 8
"""Fewest documents worth a connection of their own. Fewer go over one connection, several
files in flight at once, which costs less than opening (and logging in to) more."""


def plan_waves(ready: dict[str, tuple[list[int], int]], batch_size: int) -> list[list[Lane]]:
    """A page's deliveries as waves of lanes. `ready` maps each destination to its deliveries
    and its `max_connections`. A destination's lanes are all of one size (`lane_size`), at most
    one per connection in a wave; a wave holds every destination's lanes for that wave,
    interleaved, so that a destination with few documents never waits behind one with many."""
    own_waves: list[list[list[Lane]]] = []  # per destination, its waves of lanes
    for ref, (ids, connections) in ready.items():
        if ids:
            lanes = chunks(ids, lane_size(len(ids), connections, batch_size))
            own_waves.append(chunks([(ref, lane) for lane in lanes], max(1, connections)))
    count = max((len(waves) for waves in own_waves), default=0)
    return [interleave([waves[k] for waves in own_waves if k < len(waves)]) for k in range(count)]


def shared_batches(lanes: list[Lane], batch_size: int, threads: int) -> list[list[Lane]]:
    """A wave's lanes as units of work, each sent by one thread. A destination with one lane
    shorter than a batch shares a ledger batch (one transaction to start it, one to record it)
    with the next such destinations, up to a batch, and no more than spreads them over the
    `threads` sending at once; every other lane is a unit of its own."""
    per_destination: dict[str, int] = {}
    for ref, _ in lanes:
        per_destination[ref] = per_destination.get(ref, 0) + 1

    def alone(lane: Lane) -> bool:
        return per_destination[lane[0]] > 1 or len(lane[1]) >= batch_size

    small = sum(len(lane[1]) for lane in lanes if not alone(lane))
    most = max(1, min(batch_size, math.ceil(small / max(1, threads))))
    units: list[list[Lane]] = []
    shared: list[Lane] = []
    filled = 0
    for lane in lanes:
        if alone(lane):
            units.append([lane])
            continue
        if shared and filled + len(lane[1]) > batch_size:
            units.append(shared)
            shared, filled = [], 0
        shared.append(lane)
        filled += len(lane[1])
        if filled >= most:
            units.append(shared)
            shared, filled = [], 0
    if shared:
        units.append(shared)
    return units


def split(lanes: list[Lane], tasks: int) -> list[list[Lane]]:
    """A wave's lanes as up to `tasks` upload tasks, dealt out in turn so that each task serves
    several destinations."""
    if tasks <= 1 or len(lanes) <= 1:
        return [lanes] if lanes else []
    tasks = min(tasks, len(lanes))
    return [lanes[start::tasks] for start in range(tasks)]


def interleave(groups: list[list[Lane]]) -> list[Lane]:
    """The first of each group, then the second of each, and so on."""
    longest = max((len(group) for group in groups), default=0)
    return [group[i] for i in range(longest) for group in groups if i < len(group)]


def lane_size(count: int, connections: int, batch_size: int) -> int:
    """Documents per lane (one connection's share of a wave) for `count` to send over
    `connections`: as few as keep every connection busy, but no fewer than `MIN_LANE` where
    one wave holds them all; all of one size so the connections finish together; none over
    `BATCHES_PER_LANE` batches."""
    lanes = max(1, connections)
    waves = math.ceil(count / (lanes * batch_size * BATCHES_PER_LANE))
    if waves <= 1:
        lanes = max(1, min(lanes, math.ceil(count / MIN_LANE)))
    return max(1, math.ceil(count / (lanes * max(1, waves))))


def chunks(items: list, size: int) -> list[list]:  # type: ignore[type-arg]
    """`items` cut into lists of `size` (the last may be shorter)."""
    return [items[start : start + size] for start in range(0, len(items), size)]
