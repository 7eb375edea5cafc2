"""What an organization may read, and the record that it read it.

An organization sees the patients shared with any of its projects, and for each the newest
version of each document. Anything else is "not found" to it, never "forbidden", so that
whether a patient exists does not leak. Every read of a patient's data appends a disclosure
(who, which patient, which version, what was asked, when), the same ledger the pushes use.

FHIR resources are served with the patient's `healthexPatientId` as `Patient.id`, and every
reference to the patient (`Patient/<id in the bundle>`) points there too, so that a client can
follow references and search by the ID it knows.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import func, select

from patient_delivery.ledger import read_content
from patient_delivery.pull.keys import Caller
from patient_delivery.pull.resource_types import RESOURCE_TYPES
from patient_delivery.store import Store
from patient_delivery.store.models import (
    Disclosure,
    DocumentVersion,
    Patient,
    Project,
    Share,
    utcnow,
)

MAX_OFFSET = 10_000_000
"""Largest offset a page of patients or resources may start at (past every real record): a
larger one is refused, never handed to the database."""

ASKED = frozenset({
    "Patient?identifier", "Patient/{id}", "Patient/{id}/$everything",
    "get_document ccda", "get_document fhir", "$export",
    *(f"{name}?patient" for name in RESOURCE_TYPES),
    *(f"search_resources {name}" for name in RESOURCE_TYPES),
})  # fmt: skip
"""What a disclosure may say was asked: an operation and a resource type, never caller text."""


@dataclass(frozen=True)
class SharedPatient:
    """A patient as one of the organization's projects knows them."""

    patient_id: str
    project_id: str
    external_id: str | None


@dataclass(frozen=True)
class Version:
    id: int
    data_type: str
    sha256: str
    size: int
    created_at: datetime


@dataclass(frozen=True)
class FhirRecord:
    """A patient's newest FHIR bundle as the organization sees it (IDs rewritten, see above)."""

    patient: SharedPatient
    version: Version
    resources: list[dict[str, Any]]

    def of_type(self, resource_type: str, since: datetime | None = None) -> list[dict[str, Any]]:
        """Resources of one type, those changed at or after `since` when given: by their own
        `meta.lastUpdated`, or, without one, by when the version holding them was stored."""
        found = [r for r in self.resources if r.get("resourceType") == resource_type]
        return [r for r in found if since is None or self._changed_since(r, since)]

    def everything(self, since: datetime | None = None) -> list[dict[str, Any]]:
        return [r for r in self.resources if since is None or self._changed_since(r, since)]

    def _changed_since(self, resource: dict[str, Any], since: datetime) -> bool:
        stamp = _last_updated(resource)
        return (stamp or self.version.created_at) >= since


def _last_updated(resource: dict[str, Any]) -> datetime | None:
    """A resource's `meta.lastUpdated` as an instant; None where it has none, or where what it
    has is not an instant with a time zone (as FHIR requires): such a value is ignored."""
    meta = resource.get("meta")
    stamp = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if not isinstance(stamp, str):
        return None
    try:
        parsed = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _point_at_patient(node: Any, source: str, patient_id: str) -> Any:
    """`node` with every string that references the bundle's own patient (`Patient/<source>`,
    with or without `/_history/<version>`) turned into `Patient/<patient_id>`: on parsed JSON,
    values only, so no content of any string can change how another is read."""
    if isinstance(node, str):
        if node == source or node.startswith(source + "/_history/"):
            return f"Patient/{patient_id}"
        return node
    if isinstance(node, dict):
        return {key: _point_at_patient(value, source, patient_id) for key, value in node.items()}
    if isinstance(node, list):
        return [_point_at_patient(value, source, patient_id) for value in node]
    return node


class Records:
    """Organization-scoped reads over the store, with a small cache of parsed bundles."""

    CACHE_SIZE = 64

    def __init__(self, store: Store, cache_size: int = CACHE_SIZE) -> None:
        """`cache_size` parsed bundles are kept (0 for a reader that visits each once)."""
        self.store = store
        self.cache_size = cache_size
        self._parsed: OrderedDict[int, list[dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def patients(
        self, caller: Caller, external_id: str | None = None, limit: int = 100, offset: int = 0
    ) -> tuple[list[SharedPatient], int]:
        """The organization's patients (one row per project share), a page, and the total."""
        statement = (
            select(Share.patient_id, Share.project_id, Share.external_id)
            .join(Project, Project.id == Share.project_id)
            .where(Project.organization_id == caller.organization_id)
        )
        if external_id is not None:
            statement = statement.where(Share.external_id == external_id)
        with self.store.session() as session:
            total = session.scalar(select(func.count()).select_from(statement.subquery())) or 0
            rows = session.execute(
                statement.order_by(Share.project_id, Share.patient_id).limit(limit).offset(offset)
            ).all()
        return [SharedPatient(*row) for row in rows], int(total)

    def shared(self, caller: Caller, patient_id: str) -> SharedPatient | None:
        """The patient, if shared with one of the organization's projects; else None."""
        with self.store.session() as session:
            row = session.execute(
                select(Share.patient_id, Share.project_id, Share.external_id)
                .join(Project, Project.id == Share.project_id)
                .where(Project.organization_id == caller.organization_id)
                .where(Share.patient_id == patient_id)
                .order_by(Share.project_id)
                .limit(1)
            ).first()
        return SharedPatient(*row) if row else None

    def newest(self, patient_id: str, data_type: str) -> Version | None:
        with self.store.session() as session:
            row = session.scalar(
                select(DocumentVersion)
                .where(DocumentVersion.patient_id == patient_id)
                .where(DocumentVersion.data_type == data_type)
                .order_by(DocumentVersion.version.desc())
                .limit(1)
            )
            if row is None:
                return None
            return Version(row.id, row.data_type, row.sha256, row.size, row.created_at)

    def document(
        self, caller: Caller, patient_id: str, data_type: str
    ) -> tuple[bytes, Version, SharedPatient] | None:
        """The newest stored document of a type, exactly as stored (what a push would send)."""
        patient = self.shared(caller, patient_id)
        version = self.newest(patient_id, data_type) if patient else None
        if patient is None or version is None:
            return None
        return read_content(self.store, version.id), version, patient

    def fhir(self, caller: Caller, patient_id: str) -> FhirRecord | None:
        """The patient's newest FHIR bundle as resources, or None (not shared, or no bundle)."""
        patient = self.shared(caller, patient_id)
        return self.record(patient) if patient else None

    def record(self, patient: SharedPatient) -> FhirRecord | None:
        """The newest FHIR bundle of a patient already known to be shared (no bundle: None)."""
        version = self.newest(patient.patient_id, "fhir")
        if version is None:
            return None
        return FhirRecord(patient, version, self._resources(version, patient.patient_id))

    def _resources(self, version: Version, patient_id: str) -> list[dict[str, Any]]:
        with self._lock:
            cached = self._parsed.get(version.id)
            if cached is not None:
                self._parsed.move_to_end(version.id)
                return cached
        bundle = self._as_seen(read_content(self.store, version.id), patient_id)
        entries = bundle.get("entry", []) if isinstance(bundle, dict) else []
        resources = [
            entry["resource"] for entry in entries
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict)
        ]  # fmt: skip
        with self._lock:
            self._parsed[version.id] = resources
            while len(self._parsed) > self.cache_size:
                self._parsed.popitem(last=False)
        return resources

    def _as_seen(self, content: bytes, patient_id: str) -> Any:
        """A stored FHIR bundle with its patient's IDs as the organization sees them: the
        Patient's own `id`, and every reference to it, are the healthexPatientId."""
        with self.store.session() as session:
            source_id = session.scalar(select(Patient.fhir_id).where(Patient.id == patient_id))
        bundle = orjson.loads(content)
        if source_id:
            bundle = _point_at_patient(bundle, f"Patient/{source_id}", patient_id)
        entries = bundle.get("entry", []) if isinstance(bundle, dict) else []
        for entry in entries:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == "Patient":
                resource["id"] = patient_id
        return bundle

    def fhir_document(
        self, caller: Caller, patient_id: str
    ) -> tuple[bytes, Version, SharedPatient] | None:
        """The newest FHIR bundle whole, with its patient's IDs as the REST API shows them."""
        found = self.document(caller, patient_id, "fhir")
        if found is None:
            return None
        content, version, patient = found
        return orjson.dumps(self._as_seen(content, patient_id)), version, patient

    def disclose(
        self, caller: Caller, patient: SharedPatient, version: Version, what: str, channel: str
    ) -> None:
        """Append the read to the disclosures ledger. `what` names the request, never values.

        `patient` comes from `shared`/`patients`: a share with one of the caller's projects, so
        the recipient organization is the caller's. `what` is one of `ASKED`: the ledger
        records facts, never text a caller chose."""
        if what not in ASKED:
            raise ValueError("a disclosure names one of the operations in ASKED")
        with self.store.session() as session:
            session.add(
                Disclosure(
                    delivery_id=None,
                    patient_id=patient.patient_id,
                    organization_id=caller.organization_id,
                    project_id=patient.project_id,
                    destination=channel,
                    version_id=version.id,
                    data_type=version.data_type,
                    path=what,
                    sha256=version.sha256,
                    size=version.size,
                    purpose="pull",
                    flow_run_id=None,
                    disclosed_at=utcnow(),
                    accessor=caller.accessor,
                )
            )
