"""Manifests: what one run delivered to one destination for one project, as one JSON file.

A receiver's pipeline (an Airflow sensor, a Snowpipe) takes the manifest as the signal that a
drop is complete: the run writes it last, after every file it lists has landed and been
verified. Manifests are owed like documents: a delivered file waits (`manifest_owed`) until a
manifest listing it is written; one that could not be written is taken over by a later run
(`take_over`), so every delivered file is in exactly one manifest. Its shape follows the FHIR
bulk data export manifest (`transactionTime`, `request`, `output`), with our IDs, versions and
hashes in each entry, and `format` names it and its version. Failures appear as a count only.
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
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update

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
    delivery_ids: list[int] = field(default_factory=list)
    """The deliveries its files are: marked listed once the manifest is written."""


FORMAT = "patient-delivery manifest 1"
"""The manifest's format and its version (`format`): a reader can tell what it is reading."""


def take_over(
    store: Store,
    run_id: str,
    stale_before: datetime,
    project_id: str | None = None,
    destinations: tuple[str, ...] = (),
) -> int:
    """Make this run the writer of manifests owed by earlier runs: files whose manifest could
    not be written (released), or whose run ended before writing it (untouched since
    `stale_before`). One UPDATE, so two runs never take the same file; how many were taken."""
    taken = and_(
        Delivery.manifest_owed,
        Delivery.status == DeliveryStatus.DELIVERED,
        or_(
            Delivery.manifest_run.is_(None),
            and_(Delivery.manifest_run != run_id, Delivery.updated_at < stale_before),
        ),
    )
    if project_id:
        taken = and_(taken, Delivery.project_id == project_id)
    if destinations:
        taken = and_(taken, Delivery.destination.in_(destinations))
    with store.session() as session:
        result = session.execute(
            update(Delivery).where(taken)
            .values(manifest_run=run_id, updated_at=datetime.now(UTC))
            .execution_options(synchronize_session=False)
        )  # fmt: skip
        return int(result.rowcount or 0)


def owed(store: Store, run_id: str) -> bool:
    """Whether this run has files to list in manifests (its own, or taken over)."""
    with store.session() as session:
        mine = select(Delivery.id).where(Delivery.manifest_owed, Delivery.manifest_run == run_id)
        return session.scalar(mine.limit(1)) is not None


def drops(store: Store, run_id: str) -> list[Drop]:
    """Every (destination, project) this run owes a manifest, with the files it lists (this
    run's and those taken over) and how many of the run's deliveries there failed."""
    found: dict[tuple[str, str], Drop] = {}
    delivered = (
        select(
            Delivery.id,
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
        .where(
            Delivery.manifest_owed,
            Delivery.manifest_run == run_id,
            Delivery.status == DeliveryStatus.DELIVERED,
        )
        .order_by(Delivery.destination, Delivery.project_id, Delivery.path)
    )
    failed = (
        select(Delivery.destination, Delivery.project_id, func.count())
        .where(Delivery.flow_run_id == run_id, Delivery.status == DeliveryStatus.FAILED)
        .group_by(Delivery.destination, Delivery.project_id)
    )
    with store.session() as session:
        for (
            delivery_id,
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
            drop.delivery_ids.append(delivery_id)
        for destination, project, count in session.execute(failed):
            if (destination, project) in found:
                found[(destination, project)].failed = int(count)
    return list(found.values())


def document(drop: Drop, run_id: str, transaction_time: datetime) -> bytes:
    """The manifest file's bytes."""
    return json.dumps(
        {
            "format": FORMAT,
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


def settle(store: Store, run_id: str, written: list[Written], released: list[Drop],
           off: list[Drop]) -> None:  # fmt: skip
    """After the run's manifests: those written are kept in the ledger and their files are
    listed; files whose manifest could not be written are released for a later run; files of
    destinations without manifests owe none. One transaction."""
    listed = [i for w in written for i in w.drop.delivery_ids] + [
        i for d in off for i in d.delivery_ids
    ]
    freed = [i for d in released for i in d.delivery_ids]
    mine = and_(Delivery.manifest_run == run_id, Delivery.manifest_owed)
    with store.session() as session:
        _record(session, run_id, written)
        for ids, values in ((listed, {"manifest_owed": False}), (freed, {"manifest_run": None})):
            for start in range(0, len(ids), 5_000):
                session.execute(
                    update(Delivery).where(mine, Delivery.id.in_(ids[start : start + 5_000]))
                    .values(**values).execution_options(synchronize_session=False)
                )  # fmt: skip


def _record(session: Any, run_id: str, written: list[Written]) -> None:
    """Keep a run's written manifests in the ledger."""
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
    session.execute(insert(Manifest), rows)  # one statement for the run's thousands
