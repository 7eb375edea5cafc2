"""Writing a run's manifests: one per destination and project it delivered to, written last.

Each is uploaded like a document (temporary name, verified, put in place), over the run's own
session to that destination, after every upload of the run has ended: a manifest never lists a
file that is not there. A destination whose `manifest_template` is empty gets none. A manifest
that could not be written is owed: its files are listed by the next run's manifest there.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from patient_delivery import ledger, manifests
from patient_delivery.blocks import DeliveryError, load_destination
from patient_delivery.flows.engine import sessions
from patient_delivery.manifests import Drop, Written
from patient_delivery.store import open_store

THREADS = 8
"""Manifests written at once (each to its own destination)."""


def owed(run_id: str, project_id: str | None, destinations: tuple[str, ...]) -> bool:
    """Whether the run has manifests to write: for what it delivered, or taken over from
    earlier runs whose manifest could not be written (within the run's project and
    destinations)."""
    store = open_store()
    stale = datetime.now(UTC) - ledger.default_lease()
    manifests.take_over(store, run_id, stale, project_id, destinations)
    return manifests.owed(store, run_id)


def write_all(run_id: str) -> dict[str, str]:
    """Write the run's manifests and settle them in the ledger (one transaction); each
    destination whose manifest could not be written, with the reason (its files wait for the
    next run's manifest)."""
    store = open_store()
    moment = datetime.now(UTC)
    drops = manifests.drops(store, run_id)
    with ThreadPoolExecutor(max(1, min(THREADS, len(drops)))) as pool:
        results = list(pool.map(lambda drop: _write(run_id, drop, moment), drops))
    outcomes = list(zip(drops, results, strict=True))
    manifests.settle(
        store, run_id,
        written=[r for _, r in outcomes if isinstance(r, Written)],
        released=[d for d, r in outcomes if isinstance(r, str)],
        off=[d for d, r in outcomes if r is None],
    )  # fmt: skip
    return {drop.destination: r for drop, r in outcomes if isinstance(r, str)}


def _write(run_id: str, drop: Drop, moment: datetime) -> Written | str | None:
    """Write one manifest: what was written, the reason it could not be, or None (off)."""
    try:
        pool = sessions.pools.get(run_id, drop.destination, load_destination)
        path = pool.destination.render_manifest_path(
            drop.organization_id, drop.project_id, moment, run_id
        )
        if not path:
            return None
        content = manifests.document(drop, run_id, moment)
        writing = sessions.pools.writing(run_id, [drop.destination], load_destination)
        with writing, pool.lease() as lease:
            sent = lease.session().upload(path, content, manifests.sha256(content))
    except DeliveryError as exc:
        return str(exc)
    except Exception as exc:
        return f"it could not be written ({type(exc).__name__})"
    return Written(drop, sent.path, sent.sha256, sent.size)
