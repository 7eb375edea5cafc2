"""Manifests: what one run delivered to one destination for one project, as one JSON file.

A receiver's pipeline (an Airflow sensor, a Snowpipe) takes the manifest as the signal that a
drop is complete: the run writes it last, after every file it lists has landed and been
verified. Its shape follows the FHIR bulk data export manifest (`transactionTime`, `request`,
`output`), with our IDs, versions and hashes in each entry. Failures appear as a count only.
Each entry's `sha256` and `size` are of the file as it was sent; where that is not the stored
document itself (encrypted to the receiver's key), `plaintextSha256` is the document's. Where
the destination has several ways to put a file in place (SFTP), `landing` says which each file
had: `direct` means the file was written at its final name, so only this manifest says it is
whole.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, func, insert, select

from patient_delivery.store import Store
from patient_delivery.store.models import (
    Delivery,
    DeliveryStatus,
    DocumentVersion,
    Manifest,
    Share,
)


@dataclass
class Drop:
    """What one run delivered to one destination for one project."""

    destination: str
    organization_id: str
    project_id: str
    output: list[dict[str, object]] = field(default_factory=list)
    failed: int = 0


def drops(store: Store, run_id: str) -> list[Drop]:
    """Every (destination, project) this run delivered to, with what it delivered there and
    how many of its deliveries there failed."""
    found: dict[tuple[str, str], Drop] = {}
    delivered = (
        select(
            Delivery.destination,
            Delivery.organization_id,
            Delivery.project_id,
            Delivery.path,
            Delivery.data_type,
            Delivery.patient_id,
            Share.external_id,
            DocumentVersion.version,
            Delivery.sha256,
            Delivery.size,
            DocumentVersion.sha256,
            Delivery.landing,
        )
        .join(DocumentVersion, DocumentVersion.id == Delivery.version_id)
        .outerjoin(
            Share,
            and_(Share.project_id == Delivery.project_id, Share.patient_id == Delivery.patient_id),
        )
        .where(Delivery.flow_run_id == run_id, Delivery.status == DeliveryStatus.DELIVERED)
        .order_by(Delivery.destination, Delivery.project_id, Delivery.path)
    )
    failed = (
        select(Delivery.destination, Delivery.project_id, func.count())
        .where(Delivery.flow_run_id == run_id, Delivery.status == DeliveryStatus.FAILED)
        .group_by(Delivery.destination, Delivery.project_id)
    )
    with store.session() as session:
        for (
            destination,
            org,
            project,
            path,
            data_type,
            patient,
            external,
            version,
            sha,
            size,
            plaintext,
            landing,
        ) in session.execute(delivered):
            drop = found.setdefault((destination, project), Drop(destination, org, project))
            entry: dict[str, object] = {
                "type": data_type, "url": path, "healthexPatientId": patient,
                "externalId": external, "version": version, "sha256": sha, "size": size,
            }  # fmt: skip
            if plaintext != sha:
                entry["plaintextSha256"] = plaintext
            if landing:
                entry["landing"] = landing
            drop.output.append(entry)
        for destination, project, count in session.execute(failed):
            if (destination, project) in found:
                found[(destination, project)].failed = int(count)
    return list(found.values())


def document(drop: Drop, run_id: str, transaction_time: datetime) -> bytes:
    """The manifest file's bytes."""
    return json.dumps(
        {
            "transactionTime": transaction_time.isoformat(),
            "request": f"patient-delivery run {run_id}",
            "runId": run_id,
            "organization": drop.organization_id,
            "project": drop.project_id,
            "requiresAccessToken": False,
            "output": drop.output,
            "error": [],
            "failed": drop.failed,
        },
        indent=2,
    ).encode()


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@dataclass(frozen=True)
class Written:
    """A manifest that landed on its destination: where, and the SHA-256 and size of what
    was sent."""

    drop: Drop
    path: str
    sha256: str
    size: int


def record(store: Store, run_id: str, written: list[Written]) -> None:
    """Keep a run's written manifests in the ledger, in one transaction."""
    if not written:
        return
    rows = [
        dict(
            flow_run_id=run_id,
            destination=w.drop.destination,
            project_id=w.drop.project_id,
            path=w.path,
            sha256=w.sha256,
            size=w.size,
            documents=len(w.drop.output),
            failed=w.drop.failed,
        )
        for w in written
    ]
    with store.session() as session:
        session.execute(insert(Manifest), rows)  # one statement for the run's thousands
