"""Backfill and re-delivery flows: dry runs send nothing, forced re-sends reuse their paths."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.artifacts import Artifact

from patient_delivery import ingest
from patient_delivery.blocks.local import LocalDestination
from patient_delivery.flows.backfill import backfill, redeliver
from patient_delivery.flows.deliver import deliver
from patient_delivery.store import Store
from tests.test_deliver_flow import CCDA, CCDA_V2, files_under, rows

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.both_stores]


def folder_destination(root: Path) -> str:
    name = f"b-{uuid.uuid4().hex[:10]}"
    LocalDestination(root=root).save(name)
    return f"local-destination/{name}"


@dataclass
class Delivered:
    destination: str
    patients: list[str]
    root: Path


@pytest.fixture
def delivered(store: Store, tmp_path: Path) -> Delivered:
    """A project with three patients whose documents were all delivered to one folder."""
    ingest.add_organization(store, "Acme", "acme")
    project = ingest.add_project(store, "acme", "Study", "study")
    root = tmp_path / "org"
    destination = folder_destination(root)
    ingest.subscribe(store, project, destination)
    patients = [ingest.add_patient(store, project) for _ in range(3)]
    for patient in patients:
        ingest.put_document(store, patient, "ccda", CCDA)
    assert deliver().delivered == 3
    return Delivered(destination, patients, root)


def test_a_dry_run_sends_nothing_and_publishes_the_plan(store: Store, delivered: Delivered) -> None:
    before = files_under(delivered.root)
    counts = backfill(project="study", force=True, dry_run=True)
    assert counts == {"resend": 3}
    assert files_under(delivered.root) == before
    assert all(row.status == "delivered" for row in rows(store))
    artifact = Artifact.get("backfill-plan")
    assert artifact is not None and "nothing sent: 3 resend" in (artifact.description or "")
    assert json.loads(str(artifact.data)) == [
        {"destination": delivered.destination, "data type": "ccda", "action": "resend", "count": 3}
    ]


def test_a_dry_runs_plan_is_published_whole_in_pages_with_no_paths(
    store: Store, delivered: Delivered, monkeypatch: pytest.MonkeyPatch
) -> None:
    from patient_delivery.flows import backfill as backfill_flow

    monkeypatch.setattr(backfill_flow, "PLAN_ROWS_PER_PAGE", 2)
    assert backfill(project="study", force=True, dry_run=True) == {"resend": 3}
    pages = [Artifact.get(f"backfill-plan-rows-{n}") for n in (1, 2)]
    rows_shown = [row for page in pages for row in json.loads(str(page.data))]  # type: ignore[union-attr]
    assert sorted(row["patient"] for row in rows_shown) == sorted(delivered.patients)
    assert all("path" not in row for row in rows_shown)
    assert pages[1].description == "Dry run plan, rows page 2 of 2"  # type: ignore[union-attr]


def test_without_force_delivered_documents_are_skipped(store: Store, delivered: Delivered) -> None:
    assert backfill(project="study", dry_run=False) == {"skip": 3, "delivered": 0, "failed": 0}


def test_a_forced_backfill_replaces_the_files_at_their_paths(
    store: Store, delivered: Delivered
) -> None:
    paths = sorted(row.path for row in rows(store))
    for path in paths:
        (delivered.root / path).unlink()  # the organization lost its files
    counts = backfill(project="study", patient=delivered.patients[:2], force=True, dry_run=False)
    assert (counts["resend"], counts["delivered"]) == (2, 2)
    summary = Artifact.get("backfill-summary")  # on the backfill's own run, as the UI shows it
    assert summary is not None and "2 delivered" in (summary.description or "")
    assert {"action": "delivered", "count": 2} in json.loads(str(summary.data))
    resent = sorted(row.path for row in rows(store) if row.patient_id in delivered.patients[:2])
    assert sorted(files_under(delivered.root)) == resent and set(resent) < set(paths)
    assert len(rows(store)) == 3  # re-sent on the same ledger rows, no duplicates
    # ... and the accounting keeps both sends of the re-sent documents.
    from patient_delivery.reports import disclosures_frame

    history = disclosures_frame(store)
    sends = history.groupby("patient_id").size().to_dict()
    assert sends == {p: (2 if p in delivered.patients[:2] else 1) for p in delivered.patients}
    assert history["flow_run_id"].nunique() == 2


def test_a_backfill_matches_versions_by_creation_date(store: Store, delivered: Delivered) -> None:
    changed_after = datetime.now(UTC)
    ingest.put_document(store, delivered.patients[0], "ccda", CCDA_V2)
    assert backfill(created_from=changed_after, force=True) == {"owed": 1}  # queued by ingest
    assert deliver().delivered == 1
    assert backfill(created_from=changed_after, force=True) == {"resend": 1}
    before = datetime(2000, 1, 1, tzinfo=UTC)
    assert backfill(created_to=before, force=True) == {}
    # Versions older than the window's newest are never re-sent over newer ones.
    assert backfill(created_to=changed_after, force=True, dry_run=True) == {"resend": 2, "skip": 1}


def test_redeliver_full_sends_a_projects_newest_documents_to_one_destination(
    store: Store,
    delivered,  # type: ignore[no-untyped-def]
) -> None:
    for path in list(files_under(delivered.root)):
        (delivered.root / path).unlink()
    counts = redeliver(project="study", destination=delivered.destination, full=True)
    assert counts["delivered"] == 3 and len(files_under(delivered.root)) == 3
    with pytest.raises(ValueError, match="needs a project and a destination"):
        redeliver(full=True)


def test_redeliver_sends_what_failed_again(store: Store, tmp_path: Path) -> None:
    ingest.add_organization(store, "Acme", "acme")
    project = ingest.add_project(store, "acme", "Study", "study")
    root = tmp_path / "org"
    destination = folder_destination(root)
    ingest.subscribe(store, project, destination)
    patient = ingest.add_patient(store, project)
    ingest.put_document(store, patient, "ccda", CCDA)
    root.parent.mkdir(parents=True, exist_ok=True)
    root.write_text("a file where the folder should be")
    assert deliver().failed == 1
    root.unlink()
    assert redeliver(project="study") == {"delivered": 1, "failed": 0}
    [row] = rows(store)
    assert row.status == "delivered" and (root / row.path).read_bytes() == CCDA
