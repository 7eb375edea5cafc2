"""Destinations whose deliveries wait, looked at as a run starts, before it claims anything:
a block fixed since is resumed, and a destination down whose probe is due is probed (a session
opened and closed: the server answers, takes the login and shows the pinned host key). What is
resumed goes in this run; what still waits is named in its summary."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prefect import get_run_logger

from patient_delivery import destination_health
from patient_delivery.blocks import load_destinations, problem
from patient_delivery.blocks.base import Destination
from patient_delivery.blocks.contract import DeliveryError
from patient_delivery.ledger import WorkFilter
from patient_delivery.store import Store

PROBES_AT_ONCE = 8
"""Probes a run starting sends at once (each opens one session, or waits out its timeout)."""


@dataclass
class StillWaiting:
    """What waits after a run's start, for its summary: blocks to be fixed, with the reason,
    and destinations down, with since when, why and when the next probe is due."""

    unusable: dict[str, str] = field(default_factory=dict)
    down: dict[str, str] = field(default_factory=dict)


def resume_what_can_go(store: Store, work: WorkFilter) -> StillWaiting:
    """Resume the waiting destinations (of the run's scope) whose block can be used again or
    whose probe reaches them; the others, with why they wait."""
    scope = set(work.destinations) if work.destinations else None
    waiting = {ref: wait for ref, wait in destination_health.waiting(store).items()
               if scope is None or ref in scope}  # fmt: skip
    if not waiting:
        return StillWaiting()
    unusable = [ref for ref, wait in waiting.items() if not wait.down]
    probed = destination_health.probes_due(store, [r for r, w in waiting.items() if w.down])
    blocks = load_destinations([*unusable, *probed]) if unusable or probed else {}
    usable = [ref for ref in unusable if not isinstance(blocks[ref], Exception)]
    reached = [ref for ref, why in _probe({ref: blocks[ref] for ref in probed}).items() if not why]
    if usable or reached:
        destination_health.resume(store, [*usable, *reached])
    log = get_run_logger()
    if usable:
        log.info("block usable again: %s; its deliveries go in this run", ", ".join(usable))
    if reached:
        log.info("reached again: %s; its deliveries go in this run", ", ".join(reached))
    still = StillWaiting()
    after = destination_health.waiting(store)
    for ref, wait in waiting.items():
        if ref in usable or ref in reached or ref not in after:
            continue
        if wait.down:
            since, due = after[ref].since, after[ref].until
            still.down[ref] = (f"down since {since:%Y-%m-%d %H:%M} UTC ({after[ref].reason}); "
                               f"next probe at {due:%H:%M:%S} UTC")  # fmt: skip
        else:
            still.unusable[ref] = wait.reason
    return still


def _probe(blocks: dict[str, Destination | Exception]) -> dict[str, str]:
    """Open and close a session to each; why each one that could not be opened was not (an
    empty string for one reached)."""
    if not blocks:
        return {}
    with ThreadPoolExecutor(min(PROBES_AT_ONCE, len(blocks)), "probe") as pool:
        outcomes = dict(zip(blocks, pool.map(_reach, blocks, blocks.values()), strict=True))
    for ref, why in outcomes.items():
        if why:
            get_run_logger().warning("%s is still down: %s", ref, why)
    return outcomes


def _reach(ref: str, block: Destination | Exception) -> str:
    if isinstance(block, Exception):
        return problem(ref, block)
    try:
        with block.open_session():
            return ""
    except DeliveryError as exc:
        return str(exc)
