"""FHIR Bulk Data export (Bulk Data Access IG v2) of what an organization may read.

An export is asked for (`request_export`: the project's patients, or every patient sharing
with the organization; resource types; `_since`), written (`write_export`: one NDJSON file
per resource type, patient after patient, streamed from the store) and then served from its
status URL until it expires (`sweep` deletes its files). Each patient whose resources are
written is a disclosure in the ledger; a patient who no longer shares when their turn comes is
left out, and a patient who stopped sharing after the export began is left out of every file
served from then on (consent is checked at each download, as at each FHIR read). Resources
carry the patient's healthexPatientId, as the FHIR API serves them.

Each file is served only to a caller whose scopes cover its type, and the status manifest lists
only those files: any client of the organization may poll an export, but a token for
`system/Patient.rs` never downloads `Observation.ndjson`. One organization has at most
`exports_per_organization` exports waiting or being written (429 beyond it), and the writers
take organizations in turn (`export_queue`). An export accepted by a server that stopped before
writing it is taken up by the next server running on the store once it has been silent for
`SILENT_SECONDS`.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy import func, select, update

from patient_delivery import private
from patient_delivery.pull.keys import Caller
from patient_delivery.pull.records import RESOURCE_TYPES, Records, SharedPatient
from patient_delivery.settings import get_settings
from patient_delivery.store import Store
from patient_delivery.store.models import BulkExport, Project, Share, ShareWithdrawal, utcnow

ACCEPTED, RUNNING, COMPLETE, FAILED, CANCELLED = (
    "accepted", "running", "complete", "failed", "cancelled",
)  # fmt: skip
OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
EXPORTABLE = ("Patient", *RESOURCE_TYPES)
CHANNEL = "bulk-export"
ERRORS_FILE = "OperationOutcome.ndjson"
CHECK_SECONDS = 1.0
"""How often a running export records its progress and looks whether it was cancelled."""

SILENT_SECONDS = 120.0
"""A running export whose writer has not reported for this long stopped with its process
(a server restarted or killed): it is answered as failed, to be asked for again. An accepted
export whose queue has not reported for this long is taken up by another server."""

RETRY_AFTER_SECONDS = 30
"""What a kick-off refused for too many exports of the organization says to wait."""


class ExportRefused(Exception):
    """A request that cannot be served: its HTTP status, FHIR issue code and text, and for a
    429 how many seconds to wait."""

    def __init__(self, status: int, code: str, text: str, retry_after: int | None = None) -> None:
        super().__init__(text)
        self.status, self.code, self.text = status, code, text
        self.retry_after = retry_after


@dataclass(frozen=True)
class ExportFile:
    type: str
    file: str
    count: int


def folder(export_id: str) -> Path:
    """Where an export's files are written (owner-only)."""
    return get_settings().home / "exports" / export_id


def request_export(
    store: Store,
    caller: Caller,
    project_id: str | None,
    types: str | None,
    since: datetime | None,
    output_format: str | None,
    request_url: str,
) -> str:
    """Record an export asked for; its ID. `ExportRefused` when it cannot be served (another
    organization's project is not found, as with patients)."""
    if output_format is not None and output_format not in OUTPUT_FORMATS:
        raise ExportRefused(400, "not-supported", "_outputFormat must be application/fhir+ndjson")
    wanted = _types(caller, types)
    with store.session() as session:
        if project_id is not None:
            owner = session.scalar(select(Project.organization_id).where(Project.id == project_id))
            if owner != caller.organization_id:
                raise ExportRefused(
                    404, "not-found", "no such group is shared with your organization"
                )
        active = session.scalar(
            select(func.count()).select_from(BulkExport)
            .where(BulkExport.organization_id == caller.organization_id)
            .where(BulkExport.status.in_([ACCEPTED, RUNNING]))
        )  # fmt: skip
        most = get_settings().exports_per_organization
        if (active or 0) >= most:
            raise ExportRefused(
                429, "throttled",
                f"your organization has {most} exports waiting or being written (the most it "
                "may have); ask again when one is done", retry_after=RETRY_AFTER_SECONDS,
            )  # fmt: skip
        export_id = secrets.token_urlsafe(18)
        session.add(BulkExport(
            id=export_id, organization_id=caller.organization_id, accessor=caller.accessor,
            project_id=project_id, types=",".join(wanted), since=since, request_url=request_url,
            status=ACCEPTED, patients_total=0, patients_done=0, heartbeat_at=utcnow(),
        ))  # fmt: skip
    return export_id


def _types(caller: Caller, types: str | None) -> list[str]:
    """The types to export: those asked for (each one we serve and the caller may read), or
    every type the caller may read."""
    if types is None:
        allowed = [kind for kind in EXPORTABLE if caller.may_read(kind)]
        if not allowed:
            raise ExportRefused(403, "forbidden", "the token's scopes cover no resource type")
        return allowed
    asked = [kind.strip() for kind in types.split(",")]
    unknown = [kind for kind in asked if kind not in EXPORTABLE]
    if unknown or not asked:
        shown = unknown[0][:64] if unknown and unknown[0].isalnum() else "(not a type name)"
        raise ExportRefused(
            400, "not-supported", f"_type: {shown} is not a type this server exports"
        )
    refused = [kind for kind in asked if not caller.may_read(kind)]
    if refused:
        raise ExportRefused(403, "forbidden", f"the token's scopes do not cover {refused[0]}")
    return list(dict.fromkeys(asked))


def find(store: Store, caller: Caller, export_id: str) -> BulkExport | None:
    """The caller's export (None for another organization's, an unknown or an expired one);
    a running one whose writer went silent is failed first."""
    row = _own(store, caller, export_id)
    if row is not None and row.status == RUNNING and _silent(row):
        give_up(store, export_id, "the export stopped with its server; ask again")
        row = _own(store, caller, export_id)
    return row


def _silent(row: BulkExport) -> bool:
    """Whether the export's writer has not reported for `SILENT_SECONDS`."""
    quiet = timedelta(seconds=SILENT_SECONDS)
    return row.heartbeat_at is not None and utcnow() - row.heartbeat_at > quiet


def _own(store: Store, caller: Caller, export_id: str) -> BulkExport | None:
    """The caller's export as stored, unless cancelled or expired."""
    with store.session() as session:
        row = session.get(BulkExport, export_id)
        if row is None or row.organization_id != caller.organization_id:
            return None
        if row.status == CANCELLED or (row.expires_at and row.expires_at <= utcnow()):
            return None
        session.expunge(row)
        return row


def cancel(store: Store, caller: Caller, export_id: str) -> bool:
    """Cancel an export (running or complete) and delete its files; False when not found."""
    if find(store, caller, export_id) is None:
        return False
    with store.session() as session:
        session.execute(update(BulkExport).where(BulkExport.id == export_id)
                        .values(status=CANCELLED, output=None))  # fmt: skip
    shutil.rmtree(folder(export_id), ignore_errors=True)
    return True


def sweep(store: Store, now: datetime | None = None) -> int:
    """Delete the files of exports that expired or were cancelled; how many folders went."""
    now = now or utcnow()
    with store.session() as session:
        gone = list(session.scalars(select(BulkExport.id).where(
            (BulkExport.expires_at <= now) | (BulkExport.status == CANCELLED)
        )))  # fmt: skip
    removed = 0
    for export_id in gone:
        if folder(export_id).exists():
            shutil.rmtree(folder(export_id), ignore_errors=True)
            removed += 1
    return removed


def give_up(store: Store, export_id: str, reason: str) -> None:
    """Mark an export that its writer could not finish (or start) as failed."""
    with store.session() as session:
        session.execute(update(BulkExport).where(BulkExport.id == export_id)
                        .where(BulkExport.status.in_([ACCEPTED, RUNNING]))
                        .values(status=FAILED, error=reason[:500]))  # fmt: skip
    shutil.rmtree(folder(export_id), ignore_errors=True)


@dataclass(frozen=True)
class ServedFile:
    """A complete export's file as a caller may download it: its path, and the patients whose
    lines are left out (they stopped sharing after the export began)."""

    path: Path
    withdrawn: frozenset[str]

    def lines(self) -> Iterator[bytes]:
        """The file's lines, without those of a withdrawn patient (a resource names its
        patient by healthexPatientId: as its `id` or in its `Patient/` reference)."""
        marks = [patient.encode() for patient in self.withdrawn]
        with open(self.path, "rb") as lines:
            for line in lines:
                if not any(mark in line for mark in marks):
                    yield line


def served_file(store: Store, caller: Caller, export_id: str, name: str) -> ServedFile | None:
    """One of a complete export's files, for its organization (None when there is no such
    file); `ExportRefused` (403) when the caller's scopes do not cover its type."""
    row = find(store, caller, export_id)
    if row is None or row.status != COMPLETE or row.output is None:
        return None
    entries = {entry["file"]: ExportFile(**entry) for entry in json.loads(row.output)}
    entry = entries.get(name)
    if entry is None:
        return None
    if not _may_fetch(caller, entry):
        raise ExportRefused(403, "forbidden", f"the token's scopes do not cover {entry.type}")
    return ServedFile(folder(export_id) / entry.file, withdrawn_from(store, row))


def _may_fetch(caller: Caller, entry: ExportFile) -> bool:
    """Whether the caller's scopes cover the file's type (the errors' file goes to any caller
    of the organization: it holds no resources)."""
    return entry.file == ERRORS_FILE or caller.may_read(entry.type)


def withdrawn_from(store: Store, row: BulkExport) -> frozenset[str]:
    """The patients of the export's scope (its project, or the organization) who stopped
    sharing after it began and do not share with that scope now."""
    assert row.transaction_time is not None
    withdrawn = (
        select(ShareWithdrawal.patient_id)
        .where(ShareWithdrawal.organization_id == row.organization_id)
        .where(ShareWithdrawal.withdrawn_at >= row.transaction_time)
    )
    sharing = (
        select(Share.patient_id)
        .join(Project, Project.id == Share.project_id)
        .where(Project.organization_id == row.organization_id)
    )
    if row.project_id is not None:
        withdrawn = withdrawn.where(ShareWithdrawal.project_id == row.project_id)
        sharing = sharing.where(Share.project_id == row.project_id)
    gone = withdrawn.where(ShareWithdrawal.patient_id.not_in(sharing))
    with store.session() as session:
        return frozenset(session.scalars(gone))


def manifest(
    store: Store, row: BulkExport, caller: Caller, file_url: Callable[[str], str]
) -> dict[str, Any]:
    """The completion manifest of a complete export, as the caller may use it: only the files
    its scopes cover (`file_url` makes a file's URL). Counts are left out once a patient's
    lines are (a withdrawal after the export began)."""
    entries = [e for e in (ExportFile(**entry) for entry in json.loads(row.output or "[]"))
               if _may_fetch(caller, e)]  # fmt: skip
    counted = not withdrawn_from(store, row)
    assert row.transaction_time is not None

    def listed(kind: str, entry: ExportFile) -> dict[str, Any]:
        return {"type": kind, "url": file_url(entry.file),
                **({"count": entry.count} if counted else {})}  # fmt: skip

    return {
        "transactionTime": row.transaction_time.isoformat().replace("+00:00", "Z"),
        "request": row.request_url,
        "requiresAccessToken": True,
        "output": [listed(e.type, e) for e in entries if e.file != ERRORS_FILE],
        "deleted": [],
        "error": [listed("OperationOutcome", e) for e in entries if e.file == ERRORS_FILE],
    }


def orphans(store: Store) -> list[str]:
    """Accepted exports whose queue has been silent for `SILENT_SECONDS` (the server that
    accepted them stopped), now claimed for this server's queue: their IDs, oldest first."""
    cutoff = utcnow() - timedelta(seconds=SILENT_SECONDS)
    with store.session() as session:
        silent = list(session.scalars(
            select(BulkExport.id).where(BulkExport.status == ACCEPTED)
            .where(BulkExport.heartbeat_at < cutoff).order_by(BulkExport.created_at)
        ))  # fmt: skip
    claimed = []
    for export_id in silent:
        with store.session() as session:
            taken = session.execute(
                update(BulkExport).where(BulkExport.id == export_id)
                .where(BulkExport.status == ACCEPTED).where(BulkExport.heartbeat_at < cutoff)
                .values(heartbeat_at=utcnow())
            ).rowcount  # fmt: skip
        if taken:
            claimed.append(export_id)
    return claimed


def still_waiting(store: Store, export_ids: list[str]) -> None:
    """Say that these accepted exports still wait in a living server's queue."""
    if not export_ids:
        return
    with store.session() as session:
        session.execute(
            update(BulkExport).where(BulkExport.id.in_(export_ids))
            .where(BulkExport.status == ACCEPTED).values(heartbeat_at=utcnow())
        )  # fmt: skip


def write_export(
    store: Store, export_id: str, progress: Callable[[int, int], None] | None = None
) -> list[ExportFile]:
    """Write an accepted export's files, patient after patient; mark it complete (or failed,
    then raise). Stops, leaving no files, when the export is cancelled meanwhile."""
    try:
        return _write(store, export_id, progress)
    except BaseException as exc:
        give_up(store, export_id, type(exc).__name__)
        raise


def _write(
    store: Store, export_id: str, progress: Callable[[int, int], None] | None
) -> list[ExportFile]:
    with store.session() as session:
        row = session.get(BulkExport, export_id)
        if row is None or row.status != ACCEPTED:
            raise ValueError("no accepted export with that ID")
        row.status, row.transaction_time = RUNNING, utcnow()
        row.heartbeat_at = row.transaction_time
        caller = Caller.of(row.organization_id, row.accessor)
        project_id, since, types = row.project_id, row.since, row.types.split(",")
    patients = _patients(store, caller, project_id)
    _record(store, export_id, patients_total=len(patients))
    target = private.make_folder(folder(export_id))
    records = Records(store, cache_size=0)  # each patient is read once
    files = _Files(target, types)
    checked = time.monotonic()
    try:
        for done, patient in enumerate(patients, 1):
            if _still_shared(
                store, caller, patient, project_id
            ):  # a withdrawal meanwhile: left out
                _write_patient(records, files, caller, patient, types, since)
            if time.monotonic() - checked >= CHECK_SECONDS or done == len(patients):
                checked = time.monotonic()
                if _record(store, export_id, patients_done=done) == CANCELLED:
                    files.close()
                    shutil.rmtree(target, ignore_errors=True)
                    return []
                if progress:
                    progress(done, len(patients))
    finally:
        files.close()
    written = files.written()
    completed = utcnow()
    with store.session() as session:
        session.execute(update(BulkExport).where(BulkExport.id == export_id)
                        .where(BulkExport.status == RUNNING).values(
                            status=COMPLETE, completed_at=completed,
                            expires_at=completed + timedelta(hours=get_settings().export_hours),
                            output=json.dumps([e.__dict__ for e in written])))  # fmt: skip
    return written


def _patients(store: Store, caller: Caller, project_id: str | None) -> list[SharedPatient]:
    """Each patient sharing with the project (or with any of the organization's projects)
    once, in a stable order, as the first of their shares knows them."""
    statement = (
        select(Share.patient_id, Share.project_id, Share.external_id)
        .join(Project, Project.id == Share.project_id)
        .where(Project.organization_id == caller.organization_id)
        .order_by(Share.patient_id, Share.project_id)
    )
    if project_id is not None:
        statement = statement.where(Share.project_id == project_id)
    with store.session() as session:
        rows = session.execute(statement).all()
    seen: dict[str, SharedPatient] = {}
    for row in rows:
        seen.setdefault(row.patient_id, SharedPatient(*row))
    return list(seen.values())


def _still_shared(
    store: Store, caller: Caller, patient: SharedPatient, project_id: str | None
) -> bool:
    """Whether the patient shares with the project (or any of the organization's) now."""
    statement = (
        select(Share.patient_id)
        .join(Project, Project.id == Share.project_id)
        .where(Share.patient_id == patient.patient_id)
        .where(Project.organization_id == caller.organization_id)
    )
    if project_id is not None:
        statement = statement.where(Share.project_id == project_id)
    with store.session() as session:
        return session.scalar(statement.limit(1)) is not None


def _write_patient(
    records: Records, files: _Files, caller: Caller, patient: SharedPatient, types: list[str],
    since: datetime | None,
) -> None:  # fmt: skip
    record = records.record(patient)
    if record is None:
        return
    wanted = set(types)
    resources = [r for r in record.everything(since) if r.get("resourceType") in wanted]
    if not resources:
        return
    for resource in resources:
        files.write(resource["resourceType"], orjson.dumps(resource))
    records.disclose(caller, patient, record.version, "$export", CHANNEL)


def _record(store: Store, export_id: str, **values: int) -> str:
    """Record progress on the export (and that its writer is alive); its status now
    (cancelled, when it was meanwhile)."""
    with store.session() as session:
        session.execute(update(BulkExport).where(BulkExport.id == export_id)
                        .values(heartbeat_at=utcnow(), **values))  # fmt: skip
        return session.scalar(select(BulkExport.status).where(BulkExport.id == export_id)) or ""


class _Files:
    """One NDJSON file per resource type, opened when its first resource comes."""

    def __init__(self, target: Path, types: list[str]) -> None:
        self.target = target
        self.types = types
        self.handles: dict[str, IO[bytes]] = {}
        self.counts: dict[str, int] = {}

    def write(self, resource_type: str, line: bytes) -> None:
        handle = self.handles.get(resource_type)
        if handle is None:
            path = self.target / f"{resource_type}.ndjson"
            handle = self.handles[resource_type] = open(private.open_new(path), "wb")  # noqa: SIM115
            self.counts[resource_type] = 0
        handle.write(line + b"\n")
        self.counts[resource_type] += 1

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()

    def written(self) -> list[ExportFile]:
        return [ExportFile(kind, f"{kind}.ndjson", self.counts[kind])
                for kind in self.types if kind in self.counts]  # fmt: skip
