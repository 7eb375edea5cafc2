"""Subscribing a project to a destination: the rule that joins the ledger and the blocks.

A subscription needs a destination block that exists and is valid: one that cannot be loaded
would leave deliveries queued that no run can send. The core's `ingest.subscribe` cannot load
blocks (layers point one way), so this is the one function that checks both, for the CLI and
for Python callers alike.
"""

from __future__ import annotations

from patient_delivery import ingest
from patient_delivery.blocks import check_destination
from patient_delivery.documents import DATA_TYPES
from patient_delivery.store import Store


def subscribe(
    store: Store,
    project_id: str,
    destination: str,
    data_types: list[str] | tuple[str, ...] = DATA_TYPES,
    purpose: str = ingest.DEFAULT_PURPOSE,
) -> int:
    """Deliver a project's documents of `data_types` to the destination block `destination`
    (`type/name`); the latest documents it already has are queued at once, and their number
    returned. Refused before anything is stored: `ingest.IngestError` (no such project, the
    subscription exists, not a reference) or `blocks.BlockProblem` (no such block, or one that
    breaks its rules)."""
    ingest.check_subscription(store, project_id, destination)
    check_destination(destination)
    return ingest.subscribe(store, project_id, destination, data_types, purpose)
