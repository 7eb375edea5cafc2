"""How far behind destinations are after a run: a table artifact (`delivery-lag`, one row per
destination the run sent to or left waiting), and the "behind" event for each whose oldest owed
delivery is older than its block's lag objective."""

from __future__ import annotations

from collections.abc import Collection

from patient_delivery.blocks import load_destinations
from patient_delivery.flows import reporting, runtime
from patient_delivery.reports import lag, records
from patient_delivery.store import open_store

SOONEST_OBJECTIVE_SECONDS = 60
"""The shortest lag objective a block may have: destinations owed less recently are on time,
without reading their blocks."""


def publish(destinations: Collection[str]) -> None:
    """The lag of these destinations as the run leaves them, and an event for each behind."""
    table = lag(open_store(), destinations)
    if table.empty:
        return
    runtime.create_table(records(table), key="delivery-lag", description=(
        "How far behind each destination is, in seconds: the age of its oldest owed delivery, "
        "and update-to-landed times (median, 95th percentile) over the last hour and day."
    ))  # fmt: skip
    late = table[table["oldest_owed_s"] > SOONEST_OBJECTIVE_SECONDS]
    if late.empty:
        return
    blocks = load_destinations(late["destination"])
    for ref, oldest in zip(late["destination"], late["oldest_owed_s"], strict=True):
        block = blocks[ref]
        if isinstance(block, Exception):  # its own alert tells ("block unusable")
            continue
        if oldest > block.lag_objective_minutes * 60:
            reporting.announce_behind(ref, oldest, block.lag_objective_minutes)
