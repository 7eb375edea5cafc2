"""Writing a run's manifests: one per destination and project it delivered to, written last.

Each is uploaded like a document (temporary name, verified, put in place), over the run's own
session to that destination, after every upload of the run has ended: a manifest never lists a
file that is not there. A destination whose `manifest_template` is empty gets none.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from patient_delivery import manifests
from patient_delivery.blocks import DeliveryError, load_destination
from patient_delivery.flows.engine import sessions
from patient_delivery.manifests import Drop, Written
from patient_delivery.store import open_store

THREADS = 8
"""Manifests written at once (each to its own destination)."""


def write_all(run_id: str) -> dict[str, str]:
    """Write the run's manifests and keep them in the ledger (one transaction); each
    destination whose manifest could not be written, with the reason."""
    store = open_store()
    moment = datetime.now(UTC)
    drops = manifests.drops(store, run_id)
    with ThreadPoolExecutor(max(1, min(THREADS, len(drops)))) as pool:
        results = list(pool.map(lambda drop: _write(run_id, drop, moment), drops))
    manifests.record(store, run_id, [r for r in results if not isinstance(r, str) and r])
    return {
        drop.destination: r for drop, r in zip(drops, results, strict=True) if isinstance(r, str)
    }


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
        return f"manifest not written: {exc}"
    except Exception as exc:
        return f"manifest not written ({type(exc).__name__})"
    return Written(drop, sent.path, sent.sha256, sent.size)
