"""The store and ingest: versions, shares, subscriptions, importers and schema upgrades."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select

from patient_delivery import ingest, ledger
from patient_delivery.documents import InvalidDocument
from patient_delivery.importers import import_ccda, import_fhir_bulk
from patient_delivery.store import Store
from patient_delivery.store.models import Delivery, DocumentVersion, Patient

CCDA = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>v1</title></ClinicalDocument>'
CCDA_V2 = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>v2</title></ClinicalDocument>'
DEST = "local-destination/test"

pytestmark = pytest.mark.both_stores


@pytest.fixture
def project(store: Store) -> str:
    ingest.add_organization(store, "Acme Research", "acme")
    return ingest.add_project(store, "acme", "Study", "study")


def _count(store: Store, model: type, **where: object) -> int:
    with store.session() as session:
        statement = select(func.count()).select_from(model)
        for column, value in where.items():
            statement = statement.where(getattr(model, column) == value)
        return session.scalar(statement) or 0


def test_patient_ids_are_opaque_stable_and_external_ids_unique_per_project(
    store: Store, project: str
) -> None:
    first = ingest.add_patient(store, project, "MRN-1")
    second = ingest.add_patient(store, project)
    assert first != second and first.startswith("hx_") and "MRN" not in first
    with pytest.raises(ingest.IngestError, match="already has a patient with that externalId"):
        ingest.add_patient(store, project, "MRN-1")
    other = ingest.add_project(store, "acme", "Other", "other")
    ingest.share_patient(store, first, other, "MRN-1")  # another project may reuse the value
    with store.session() as session:
        assert session.get(Patient, first) is not None


@pytest.mark.bad_input
def test_ids_that_become_path_variables_are_checked_when_created(store: Store) -> None:
    with pytest.raises(ingest.IngestError, match="organization ID"):
        ingest.add_organization(store, "Bad", "../evil")
    with pytest.raises(ingest.IngestError, match="no organization"):
        ingest.add_project(store, "missing", "P")


def test_identical_content_creates_no_new_version(store: Store, project: str) -> None:
    patient = ingest.add_patient(store, project)
    first = ingest.put_document(store, patient, "ccda", CCDA)
    again = ingest.put_document(store, patient, "ccda", CCDA)
    changed = ingest.put_document(store, patient, "ccda", CCDA_V2)
    assert (first.version, first.created) == (1, True)
    assert (again.version, again.created, again.version_id) == (1, False, first.version_id)
    assert (changed.version, changed.created) == (2, True)
    assert _count(store, DocumentVersion, patient_id=patient) == 2


@pytest.mark.bad_input
def test_invalid_document_stores_nothing(store: Store, project: str) -> None:
    patient = ingest.add_patient(store, project)
    ingest.subscribe(store, project, DEST)
    with pytest.raises(InvalidDocument):
        ingest.put_document(store, patient, "ccda", b"<ClinicalDocument>")
    assert _count(store, DocumentVersion) == 0
    assert _count(store, Delivery) == 0


def test_new_version_queues_per_subscription_and_supersedes_older_queued(
    store: Store, project: str
) -> None:
    patient = ingest.add_patient(store, project)
    ingest.subscribe(store, project, DEST, ["ccda"])
    ingest.subscribe(store, project, "local-destination/fhir-only", ["fhir"])
    assert ingest.put_document(store, patient, "ccda", CCDA).queued == 1
    assert ingest.put_document(store, patient, "ccda", CCDA_V2).queued == 1
    with store.session() as session:
        statuses = dict(
            session.execute(
                select(DocumentVersion.version, Delivery.status).join(
                    DocumentVersion, DocumentVersion.id == Delivery.version_id
                )
            ).all()
        )
    assert statuses == {1: "superseded", 2: "queued"}


def test_subscribing_queues_the_latest_documents_already_stored(store: Store, project: str) -> None:
    patients = [ingest.add_patient(store, project) for _ in range(3)]
    for patient in patients:
        ingest.put_document(store, patient, "ccda", CCDA)
        ingest.put_document(store, patient, "ccda", CCDA_V2)
    assert ingest.subscribe(store, project, DEST, ["ccda", "fhir"]) == 3
    with pytest.raises(ingest.IngestError, match="already delivers"):
        ingest.subscribe(store, project, DEST)
    assert ingest.unsubscribe(store, project, DEST) == 3
    assert ingest.subscribe(store, project, DEST, ["ccda"]) == 0  # already owed rows exist


def test_sharing_with_a_new_project_queues_the_patients_documents(
    store: Store, project: str
) -> None:
    patient = ingest.add_patient(store, project)
    ingest.put_document(store, patient, "ccda", CCDA)
    other = ingest.add_project(store, "acme", "Other", "other")
    ingest.subscribe(store, other, DEST)
    assert ingest.share_patient(store, patient, other, "X-9") == 1


def test_fhir_bulk_export_imports_every_patient_idempotently(
    store: Store, project: str, fixtures_dir: Path
) -> None:
    ingest.subscribe(store, project, DEST)
    report = import_fhir_bulk(store, fixtures_dir / "fhir-bulk-10", project)
    assert report.refused == []
    assert (report.patients_created, report.documents_created) == (13, 13)
    assert report.deliveries_queued == 13
    assert report.resources_without_patient > 0  # Practitioner, Organization, Location
    again = import_fhir_bulk(store, fixtures_dir / "fhir-bulk-10", project)
    assert (again.patients_matched, again.documents_unchanged, again.documents_created) == (
        13,
        13,
        0,
    )
    # Every bundle holds its own patient's resources, as many as the export has for them.
    source_lines = 0
    for path in (fixtures_dir / "fhir-bulk-10").glob("*.ndjson"):
        if path.name != "log.ndjson":
            source_lines += sum(
                1 for line in path.open() if '"Patient/' in line or path.name.startswith("Patient")
            )
    with store.session() as session:
        versions = session.scalars(select(DocumentVersion.id)).all()
    total = sum(len(json.loads(ledger.read_content(store, v))["entry"]) for v in versions)
    assert total == source_lines


def test_fhir_bulk_external_id_from_identifier_system(
    store: Store, project: str, fixtures_dir: Path
) -> None:
    report = import_fhir_bulk(
        store, fixtures_dir / "fhir-bulk-10", project, "http://hl7.org/fhir/sid/us-ssn"
    )
    assert report.patients_created + len(report.refused) == 13
    assert report.patients_created > 0


def test_ccda_files_import_one_patient_each_or_as_versions(
    store: Store, project: str, fixtures_dir: Path
) -> None:
    files = sorted((fixtures_dir / "ccda").glob("*.xml"))
    report = import_ccda(store, files, project_id=project)
    assert (report.patients_created, report.documents_created, report.refused) == (12, 12, [])
    patient = ingest.add_patient(store, project)
    as_versions = import_ccda(store, files[:3], patient_id=patient)
    assert as_versions.documents_created == 3
    assert _count(store, DocumentVersion, patient_id=patient) == 3


@pytest.mark.bad_input
def test_import_refusals_name_the_file_and_store_nothing_for_it(
    store: Store, project: str, tmp_path: Path
) -> None:
    good = tmp_path / "good.xml"
    good.write_bytes(CCDA)
    bad = tmp_path / "bad.xml"
    bad.write_bytes(b"<ClinicalDocument xmlns='urn:hl7-org:v3'>")
    report = import_ccda(store, [good, bad], project_id=project)
    assert report.documents_created == 1
    assert len(report.refused) == 1 and report.refused[0].startswith(
        "bad.xml: ccda is not well-formed"
    )
    assert _count(store, Patient) == 1  # the refused file left no patient behind


@pytest.mark.bad_input
@pytest.mark.bad_input
def test_a_bulk_export_with_a_line_that_is_not_json_is_refused_whole_naming_it(
    store: Store, project: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    """All or nothing: one bad line (here NaN) refuses the export before anything is stored."""
    export = tmp_path / "export"
    shutil.copytree(fixtures_dir / "fhir-bulk-10", export)
    [conditions] = sorted(export.glob("Condition*.ndjson"))
    lines = conditions.read_bytes().splitlines()
    lines[2] = lines[2].replace(b'"resourceType"', b'"x":NaN,"resourceType"', 1)
    conditions.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(InvalidDocument, match=f"{conditions.name} is not valid JSON at line 3, "):
        import_fhir_bulk(store, export, project)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(DocumentVersion)) == 0


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("replacement", "named"),
    [
        (b'"id":{"$ne":null}', r"line \d+: Patient\.id must be a FHIR id"),
        (b'"id":12', r"line \d+: Patient\.id must be a FHIR id"),
        (b'"id":"x","id":"y"', r"line \d+ is not accepted: an object has the same key twice"),
    ],
)
def test_a_bulk_export_whose_patient_line_is_of_the_wrong_shape_is_refused_in_one_line(
    store: Store, project: str, fixtures_dir: Path, tmp_path: Path, replacement: bytes,
    named: str,
) -> None:  # fmt: skip
    export = tmp_path / "export"
    shutil.copytree(fixtures_dir / "fhir-bulk-10", export)
    [patients] = sorted(export.glob("Patient*.ndjson"))
    lines = patients.read_bytes().splitlines()
    lines[1] = re.sub(rb'"id":"[^"]*"', replacement, lines[1], count=1)
    patients.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(InvalidDocument) as refused:
        import_fhir_bulk(store, export, project)
    assert re.fullmatch(rf"{patients.name} {named}.*", str(refused.value)), str(refused.value)
    assert "\n" not in str(refused.value) and "$ne" not in str(refused.value)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(DocumentVersion)) == 0


def test_fhir_bundle_for_a_different_patient_than_before_is_refused(
    store: Store, project: str
) -> None:
    from patient_delivery.importers import fhir_bundle

    patient = ingest.add_patient(store, project)
    ingest.put_document(
        store, patient, "fhir", fhir_bundle({"resourceType": "Patient", "id": "a"}, [])
    )
    with pytest.raises(ingest.IngestError, match="Patient id differs"):
        ingest.put_document(
            store, patient, "fhir", fhir_bundle({"resourceType": "Patient", "id": "b"}, [])
        )


def test_schema_is_versioned_and_matches_the_models(store: Store) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from patient_delivery.store.models import Base
    from patient_delivery.store.schema import alembic_config, upgrade

    newest = ScriptDirectory.from_config(alembic_config(store.engine)).get_current_head()
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert newest is not None and context.get_current_revision() == newest
        assert compare_metadata(context, Base.metadata) == []
    upgrade(store.engine)  # upgrading an up-to-date store is a no-op
    assert "deliveries" in inspect(store.engine).get_table_names()


def test_an_older_store_is_upgraded_in_place(tmp_path: Path) -> None:
    from patient_delivery.store.schema import create_store_engine, upgrade

    engine = create_store_engine(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(engine, "base")
    assert "deliveries" not in inspect(engine).get_table_names()
    upgrade(engine)
    assert "deliveries" in inspect(engine).get_table_names()


def test_a_store_at_the_first_schema_keeps_its_history_when_upgraded(tmp_path: Path) -> None:
    from sqlalchemy import text

    from patient_delivery.store.schema import create_store_engine, upgrade

    engine = create_store_engine(f"sqlite:///{tmp_path / 'v1.db'}")
    upgrade(engine, "0001")
    values = {"now": "2026-11-01 10:00:00+00:00", "sha": "a" * 64}
    with engine.begin() as connection:
        for statement in (
            "INSERT INTO organizations VALUES ('acme', 'Acme', :now)",
            "INSERT INTO projects VALUES ('study', 'acme', 'Study', :now)",
            "INSERT INTO patients VALUES ('hx_1', NULL, :now)",
            "INSERT INTO document_versions VALUES (1, 'hx_1', 'ccda', 1, :sha, 10, :now)",
            "INSERT INTO deliveries (id, version_id, patient_id, project_id, organization_id, "
            "data_type, destination, purpose, status, path, attempts, sha256, size, "
            "flow_run_id, created_at, updated_at, delivered_at) VALUES (1, 1, 'hx_1', 'study', "
            "'acme', 'ccda', 'x/y', 'p', 'delivered', 'a/b.xml', 1, :sha, 10, 'run-1', "
            ":now, :now, :now)",
        ):
            connection.execute(text(statement), values)
    upgrade(engine)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT delivery_id, path, flow_run_id FROM disclosures"))
        assert rows.all() == [(1, "a/b.xml", "run-1")]
