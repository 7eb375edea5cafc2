"""Writing a run's manifests: one per destination and project it delivered to, written last.

Each is uploaded like a document (temporary name, verified, put in place), over the run's own
session to that destination, after every upload of the run has ended: a manifest never lists a
file that is not there. A destination whose `manifest_template` is empty gets none. A manifest
that could not be written is owed: its files are listed by the next run's manifest there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from patient_delivery import ledger, manifests
from patient_delivery.blocks import DeliveryError
from patient_delivery.manifests import Drop, Written
from patient_delivery.store import open_store

if TYPE_CHECKING:
    from patient_delivery.flows.engine.runs import Run


def owed(run_id: str, project_id: str | None, destinations: tuple[str, ...]) -> bool:
    """Whether the run has manifests to write: for what it delivered, or taken over from
    earlier runs whose manifest could not be written (within the run's project and
    destinations)."""
    store = open_store()
    stale = datetime.now(UTC) - ledger.default_lease()
    manifests.take_over(store, run_id, stale, project_id, destinations)
    return manifests.owed(store, run_id)


def write_all(run: Run) -> dict[str, str]:
    """Write the run's manifests, side by side on its lanes, and settle them in the ledger (one
    transaction); each destination whose manifest could not be written, with the reason (its
    files wait for the next run's manifest)."""
    store = open_store()
    moment = datetime.now(UTC)
    drops = manifests.drops(store, run.id)
    writing = [run.submit([d.destination], lambda d=d: _write(run, d, moment)) for d in drops]
    results = [future.result() for future in writing]
    outcomes = list(zip(drops, results, strict=True))
    manifests.settle(
        store, run.id,
        written=[r for _, r in outcomes if isinstance(r, Written)],
        released=[d for d, r in outcomes if isinstance(r, str)],
        off=[d for d, r in outcomes if r is None],
    )  # fmt: skip
    return {drop.destination: r for drop, r in outcomes if isinstance(r, str)}


def _write(run: Run, drop: Drop, moment: datetime) -> Written | str | None:
    """Write one manifest: what was written, the reason it could not be, or None (off)."""
    try:
        pool = run.pool(drop.destination)
        path = pool.destination.render_manifest_path(
            drop.organization_id, drop.project_id, moment, run.id
        )
        if not path:
            return None
        content = manifests.document(drop, run.id, moment)
        with pool.lease() as lease:
            sent = lease.session().upload(path, content, manifests.sha256(content))
    except DeliveryError as exc:
        return str(exc)
    except Exception as exc:
        return f"it could not be written ({type(exc).__name__})"
    return Written(drop, sent.path, sent.sha256, sent.size)
