"""Importers: real-world exports in, one document per patient and data type out.

- A FHIR bulk export (one NDJSON file per resource type) becomes one `Bundle` per patient:
  the patient's `Patient` resource and every resource that refers to it. Resources that refer
  to no patient (Practitioner, Organization, Location) are shared reference data and are not
  copied into anyone's bundle.
- C-CDA files are stored as they are, one version each.

Re-importing the same export changes nothing: patients are matched by externalId within the
project and unchanged bundles are byte-identical, so no new version is made.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from patient_delivery.documents import (
    InvalidDocument,
    check_document,
    fhir_id,
    parse_json,
    patient_references,
)
from patient_delivery.ingest import (
    IngestError,
    announce,
    check_external_id,
    create_shared_patient,
    find_share,
    put_checked,
)
from patient_delivery.store import Store

RESOURCE_FILE = re.compile(r"[A-Z][A-Za-z]+(\.[0-9]+)?\.ndjson")


@dataclass
class ImportReport:
    """Counts and refusals of one import; refusals name the source, never the content."""

    patients_created: int = 0
    patients_matched: int = 0
    documents_created: int = 0
    documents_unchanged: int = 0
    deliveries_queued: int = 0
    resources_without_patient: int = 0
    left_out_types: dict[str, int] = field(default_factory=dict)
    """Resources not about one patient (Location, Organization, Practitioner...), by type:
    left out of every patient's bundle."""
    refused: list[str] = field(default_factory=list)
    patient_ids: list[str] = field(default_factory=list)


def _ndjson(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            resource = parse_json(line, path.name, first_line=number)
            if not isinstance(resource, dict) or "resourceType" not in resource:
                raise InvalidDocument(f"{path.name} line {number}: not a FHIR resource")
            yield number, resource


def _external_id(patient: dict[str, Any], system: str | None) -> str | None:
    """The patient's `id`, or its identifier's value in `system` (None: no such string)."""
    if system is None:
        return str(patient["id"])
    identifiers = patient.get("identifier")
    for identifier in identifiers if isinstance(identifiers, list) else []:
        if not isinstance(identifier, dict) or identifier.get("system") != system:
            continue
        value = identifier.get("value")
        if isinstance(value, str) and value:
            return value
    return None


def fhir_bundle(patient: dict[str, Any], resources: Iterable[dict[str, Any]]) -> bytes:
    """One patient's resources as a FHIR `collection` Bundle, serialized deterministically."""
    entries = [{"resource": patient}, *({"resource": r} for r in resources)]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    return json.dumps(bundle, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def import_fhir_bulk(
    store: Store, folder: Path, project_id: str, external_id_system: str | None = None
) -> ImportReport:
    """Import a FHIR bulk export folder into `project_id`, one Bundle per Patient resource.

    Each patient's externalId is its `Patient.id`, or with `external_id_system` the value of
    its identifier in that system. The whole export is grouped in memory (bulk exports are
    per-project and files are read line by line). All or nothing for the export's JSON: a line
    that is not valid FHIR JSON (`documents.parse_json`) refuses the whole export, naming its
    file, line and column, before anything is stored; a line that is not a resource of this
    export's patients is refused alone and reported.
    """
    folder = Path(folder)
    patient_files = sorted(folder.glob("Patient*.ndjson"))
    if not patient_files:
        raise IngestError(f"no Patient*.ndjson file in {folder}; is it a FHIR bulk export?")
    patients: dict[str, dict[str, Any]] = {}
    for path in patient_files:
        for number, resource in _ndjson(path):
            if resource.get("resourceType") == "Patient":
                patients[fhir_id(resource, f"{path.name} line {number}")] = resource
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    report = ImportReport()
    for path in sorted(folder.glob("*.ndjson")):
        # Resource files are named by type (Condition.000.ndjson); others, such as the bulk
        # export's own log.ndjson, are not resources.
        if path in patient_files or not RESOURCE_FILE.fullmatch(path.name):
            continue
        for number, resource in _ndjson(path):
            targets = {ref.removeprefix("Patient/") for ref in patient_references(resource)}
            if not targets:
                report.resources_without_patient += 1
                kind = str(resource.get("resourceType"))
                report.left_out_types[kind] = report.left_out_types.get(kind, 0) + 1
            elif len(targets) > 1 or not targets <= patients.keys():
                report.refused.append(
                    f"{path.name} line {number}: refers to a patient not in this export "
                    "or to more than one patient"
                )
            else:
                grouped[targets.pop()].append(resource)
    for source_id, patient in patients.items():
        external_id = _external_id(patient, external_id_system)
        if external_id is None:
            report.refused.append(
                f"Patient/{source_id}: no identifier in system {external_id_system!r}"
            )
            continue
        content = fhir_bundle(patient, grouped.get(source_id, []))
        _import_one(store, project_id, external_id, "fhir", content, f"Patient/{source_id}", report)
    return report


def import_ccda(
    store: Store,
    files: Iterable[Path],
    project_id: str | None = None,
    patient_id: str | None = None,
) -> ImportReport:
    """Import C-CDA files: all as versions of `patient_id`, or one patient per file in a project.

    In project mode each file's name without extension is the patient's externalId, so
    importing the same files again matches the same patients.
    """
    if (project_id is None) == (patient_id is None):
        raise IngestError("give either a project (one patient per file) or a patient")
    report = ImportReport()
    for path in files:
        path = Path(path)
        content = path.read_bytes()
        if patient_id is not None:
            _import_one(store, None, patient_id, "ccda", content, path.name, report)
        else:
            _import_one(store, project_id, path.stem, "ccda", content, path.name, report)
    return report


def _import_one(
    store: Store,
    project_id: str | None,
    who: str,
    data_type: str,
    content: bytes,
    source: str,
    report: ImportReport,
) -> None:
    """Store one document; `who` is an externalId in `project_id`, or a patient ID without one."""
    try:
        document = check_document(data_type, content)
        with store.session() as session:
            patient_id, created = _resolve_patient(session, project_id, who)
            result = put_checked(session, patient_id, document)
    except (InvalidDocument, IngestError) as exc:
        report.refused.append(f"{source}: {exc}")
        return
    if project_id is not None:
        report.patients_created += created
        report.patients_matched += not created
    report.patient_ids.append(patient_id)
    announce(store, result)
    if result.created:
        report.documents_created += 1
        report.deliveries_queued += result.queued
    else:
        report.documents_unchanged += 1


def _resolve_patient(session: Session, project_id: str | None, who: str) -> tuple[str, bool]:
    """The patient's ID, and whether it was created just now."""
    if project_id is None:
        return who, False
    check_external_id(who)
    share = find_share(session, project_id, who)
    if share is not None:
        return share.patient_id, False
    return create_shared_patient(session, project_id, who), True
