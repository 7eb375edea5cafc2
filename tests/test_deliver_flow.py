"""The delivery flow end to end, on Prefect's test server, into a real folder.

Tests of what the ledger promises (claims, leases, versions, parking, filters) run on SQLite and
on PostgreSQL (`both_stores`); those of the flow's own mechanics (tasks, lanes, messages,
artifacts) on SQLite.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from patient_delivery import ingest, ledger
from patient_delivery.blocks.local import LocalDestination
from patient_delivery.flows.deliver import deliver, deliver_state
from patient_delivery.importers import import_ccda, import_fhir_bulk
from patient_delivery.store import Store
from patient_delivery.store.models import Delivery, DocumentVersion, Share
from tests.faults import check_invariant
from tests.test_local_destination import FolderRemote

pytestmark = pytest.mark.usefixtures("prefect_api")

CCDA = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>v1</title></ClinicalDocument>'
CCDA_V2 = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>v2</title></ClinicalDocument>'


def save_local(root: Path, template: str | None = None) -> str:
    """Save a local destination block under a unique name; returns its reference."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    fields: dict[str, object] = {"root": root}
    if template:
        fields["path_template"] = template
    LocalDestination(**fields).save(name)
    return f"local-destination/{name}"


@pytest.fixture
def project(store: Store) -> str:
    ingest.add_organization(store, "Acme Research", "acme")
    return ingest.add_project(store, "acme", "Study", "study")


def rows(store: Store, **where: object) -> list[Delivery]:
    with store.session() as session:
        statement = select(Delivery).order_by(Delivery.id)
        for column, value in where.items():
            statement = statement.where(getattr(Delivery, column) == value)
        return list(session.scalars(statement))


def stall(
    store: Store, claimant: str, destination: str, lease: timedelta | None = None
) -> list[int]:
    """Act as a run that claimed and rendered its work, then stopped before uploading."""
    claimed = ledger.claim(store, claimant, lease=lease)[destination]
    block = LocalDestination.load(destination.split("/")[1])
    ledger.render_paths(store, claimant, claimed, block.render_path)
    return claimed


def files_under(root: Path) -> dict[str, bytes]:
    """The documents delivered under `root` (not the runs' manifests)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "_manifests" not in p.parts
    }


@pytest.mark.both_stores
def test_real_documents_arrive_byte_identical_and_a_rerun_sends_nothing(
    store: Store, project: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "org-folder"
    destination = save_local(root)
    ingest.subscribe(store, project, destination)
    ccda_files = sorted((fixtures_dir / "ccda").glob("*.xml"))
    import_ccda(store, ccda_files, project_id=project)
    import_fhir_bulk(store, fixtures_dir / "fhir-bulk-10", project)

    summary = deliver()

    assert (summary.delivered, summary.failed) == (25, 0)
    delivered = rows(store, status="delivered")
    assert len(delivered) == 25
    arrived = files_under(root)
    assert len(arrived) == 25
    for row in delivered:
        content = ledger.read_content(store, row.version_id)
        assert arrived[row.path] == content
        assert row.sha256 and row.size == len(content) and row.flow_run_id == summary.flow_run_id
    originals = {p.read_bytes() for p in ccda_files}
    assert originals == {c for p, c in arrived.items() if p.endswith(".xml")}

    again = deliver()
    assert (again.delivered, again.failed) == (0, 0)
    assert files_under(root) == arrived


@pytest.mark.both_stores
def test_updates_that_arrive_while_a_run_sends_go_with_that_run(
    store: Store, project: str, tmp_path: Path
) -> None:
    from patient_delivery.flows.reporting import progress_hooks

    root = tmp_path / "org-folder"
    ingest.subscribe(store, project, save_local(root))
    patients = [ingest.add_patient(store, project) for _ in range(3)]
    ingest.put_document(store, patients[0], "ccda", CCDA)
    late: list[int] = []

    def arrives_mid_run(done: int, total: int) -> None:
        if len(late) < 2:  # an update lands while each of the first two pages is being sent
            late.append(total)
            ingest.put_document(store, patients[len(late)], "ccda", CCDA_V2)

    progress_hooks.append(arrives_mid_run)
    try:
        summary = deliver()
    finally:
        progress_hooks.remove(arrives_mid_run)

    assert late == [1, 2]  # the run's total grew by what arrived
    assert (summary.delivered, summary.failed) == (3, 0)
    assert len(files_under(root)) == 3
    assert deliver().delivered == 0


def test_a_lingering_run_takes_updates_that_arrive_after_its_last_page(
    store: Store, project: str, tmp_path: Path
) -> None:
    """Updates stored 1 s and 2.5 s after the run sent its only page go with it (the trigger's
    runs for them would be cancelled while it goes); 3 s without one, it ends."""
    import threading
    import time

    from patient_delivery.flows.reporting import progress_hooks

    root = tmp_path / "org-folder"
    ingest.subscribe(store, project, save_local(root))
    patients = [ingest.add_patient(store, project) for _ in range(3)]
    ingest.put_document(store, patients[0], "ccda", CCDA)
    stored: list[float] = []
    begun: list[threading.Thread] = []

    def trickle() -> None:
        for patient, wait in ((patients[1], 1.0), (patients[2], 1.5)):
            time.sleep(wait)
            ingest.put_document(store, patient, "ccda", CCDA_V2)
            stored.append(time.monotonic())

    def first_page_sent(done: int, total: int) -> None:
        if done == 1 and not begun:
            begun.append(threading.Thread(target=trickle, daemon=True))
            begun[0].start()

    progress_hooks.append(first_page_sent)
    try:
        summary = deliver(linger_seconds=3.0)
        ended = time.monotonic()
    finally:
        progress_hooks.remove(first_page_sent)

    assert (summary.delivered, summary.failed) == (3, 0)
    assert len(files_under(root)) == 3
    assert len(stored) == 2 and ended - stored[-1] >= 3.0  # it waited its 3 s after the last
    # the progress counts what the run took on, not what was owed when it began
    assert progress_of(summary.flow_run_id, said=True) == ["3 of 3 deliveries done"]
    assert deliver().delivered == 0  # nothing was left for the next run


@pytest.mark.both_stores
def test_each_manifest_written_is_kept_in_the_ledger_and_a_destination_can_turn_them_off(
    store: Store, project: str, tmp_path: Path
) -> None:
    from patient_delivery.store.models import Manifest

    with_manifests, without = tmp_path / "with", tmp_path / "without"
    ingest.subscribe(store, project, save_local(with_manifests))
    name = f"t-{uuid.uuid4().hex[:10]}"
    LocalDestination(root=without, manifest_template="").save(name)
    ingest.subscribe(store, project, f"local-destination/{name}")
    patient = ingest.add_patient(store, project)
    ingest.put_document(store, patient, "ccda", CCDA)

    summary = deliver()

    assert summary.delivered == 2
    assert [p.name for p in without.rglob("*") if p.is_file()] != []
    assert not [p for p in without.rglob("*") if "_manifests" in str(p)]
    [written] = [p for p in with_manifests.rglob("*.json")]
    with store.session() as session:
        [kept] = session.scalars(select(Manifest)).all()
    assert (kept.flow_run_id, kept.documents, kept.failed) == (summary.flow_run_id, 1, 0)
    assert kept.written_at is not None
    assert kept.sha256 == hashlib.sha256(written.read_bytes()).hexdigest()
    assert str(written.relative_to(with_manifests)) == kept.path


@pytest.mark.both_stores
def test_a_changed_document_is_delivered_again_alone(
    store: Store, project: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "org-folder"
    ingest.subscribe(store, project, save_local(root))  # the default template: {timestamp}
    patients = [ingest.add_patient(store, project) for _ in range(3)]
    for patient in patients:
        ingest.put_document(store, patient, "ccda", CCDA)
    first = datetime.now(UTC)
    monkeypatch.setattr(ledger, "_now", lambda: first)
    assert deliver().delivered == 3

    ingest.put_document(store, patients[1], "ccda", CCDA_V2)
    monkeypatch.setattr(ledger, "_now", lambda: first + timedelta(seconds=2))  # a later second
    summary = deliver()

    assert summary.delivered == 1
    older, newest = rows(store, patient_id=patients[1])
    assert newest.status == "delivered" and newest.path != older.path
    assert (root / newest.path).read_bytes() == CCDA_V2
    assert (root / older.path).read_bytes() == CCDA  # both versions, each in its own file
    assert len(rows(store, status="delivered")) == 4


@pytest.mark.both_stores
def test_a_failed_delivery_is_delivered_by_the_next_run_at_the_same_path(
    store: Store, project: str, tmp_path: Path
) -> None:
    root = tmp_path / "org-folder"
    ingest.subscribe(store, project, save_local(root, "{orgId}/{externalId}"))
    ok = ingest.add_patient(store, project, "ok")
    blocked = ingest.add_patient(store, project, "blocked")
    ingest.put_document(store, ok, "ccda", CCDA)
    ingest.put_document(store, blocked, "ccda", CCDA)
    (root / "acme").mkdir(parents=True)
    (root / "acme" / "blocked.xml").mkdir()  # a folder where the file must go: rename fails

    first = deliver()

    assert (first.delivered, first.failed) == (1, 1)
    [failed] = rows(store, status="failed")
    assert failed.patient_id == blocked and failed.path == "acme/blocked.xml"
    assert failed.attempts >= 1 and failed.last_error

    (root / "acme" / "blocked.xml").rmdir()
    second = deliver()

    assert (second.delivered, second.failed) == (1, 0)
    [row] = rows(store, patient_id=blocked)
    assert row.status == "delivered" and row.path == "acme/blocked.xml"
    assert (root / "acme" / "blocked.xml").read_bytes() == CCDA


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "hostile", ["../../etc", "a/b", "back\\slash", "esc\x1b[31m", "rtl\u202e", "x" * 1000]
)
def test_a_hostile_external_id_fails_only_its_own_delivery(
    store: Store, project: str, tmp_path: Path, hostile: str
) -> None:
    root = tmp_path / "org-folder"
    ingest.subscribe(store, project, save_local(root, "{projectId}/{externalId}"))
    good = [ingest.add_patient(store, project, f"MRN-{i}") for i in range(3)]
    bad = ingest.add_patient(store, project, hostile)
    for patient in [*good, bad]:
        ingest.put_document(store, patient, "ccda", CCDA)

    summary = deliver()

    assert (summary.delivered, summary.failed) == (3, 1)
    [failed] = rows(store, status="failed")
    assert failed.patient_id == bad and failed.path is None
    assert "externalId" in (failed.last_error or "")
    assert hostile not in (failed.last_error or "")
    assert sorted(files_under(root)) == [f"study/MRN-{i}.xml" for i in range(3)]
    assert not (tmp_path / "etc").exists()


@pytest.mark.bad_input
@pytest.mark.both_stores
def test_an_external_id_with_a_nul_is_refused_at_ingest(store: Store, project: str) -> None:
    with pytest.raises(ingest.IngestError, match="NUL character; refused"):
        ingest.add_patient(store, project, "nul\x00")
    with pytest.raises(ingest.IngestError, match="NUL"):
        ingest.share_patient(store, ingest.add_patient(store, project, "ok"), project, "a\x00b")
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Share)) == 1


@pytest.mark.both_stores
def test_a_crashed_runs_pending_work_is_completed_at_the_same_path(
    store: Store, project: str, tmp_path: Path
) -> None:
    root = tmp_path / "org-folder"
    destination = save_local(root)
    ingest.subscribe(store, project, destination)
    patient = ingest.add_patient(store, project)
    ingest.put_document(store, patient, "ccda", CCDA)
    # A run that claimed and rendered, then died before uploading; its lease has run out.
    stall(store, "crashed-run", destination, lease=timedelta(seconds=-1))
    [pending] = rows(store, status="pending")

    summary = deliver()

    assert summary.delivered == 1
    [row] = rows(store)
    assert row.status == "delivered" and row.path == pending.path
    assert (root / pending.path).read_bytes() == CCDA


@pytest.mark.both_stores
def test_a_live_lease_is_not_taken_over(store: Store, project: str, tmp_path: Path) -> None:
    ingest.subscribe(store, project, save_local(tmp_path / "org"))
    patient = ingest.add_patient(store, project)
    ingest.put_document(store, patient, "ccda", CCDA)
    ledger.claim(store, "another-live-run")
    assert deliver().delivered == 0
    assert rows(store)[0].status == "pending"


@pytest.mark.bad_input
def save_as_the_ui_would(reference: str, data: dict[str, object]) -> None:
    """Overwrite a saved block's fields through Prefect's REST API, as the UI's form does: no
    validation of ours runs."""
    from prefect.client.orchestration import get_client

    slug, name = reference.split("/")
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name, slug)
        response = client.request(
            "PATCH",
            "/block_documents/{id}",
            path_params={"id": document.id},
            json={"data": data, "merge_existing_data": False},
        )
        response.raise_for_status()


@pytest.mark.parametrize("block", ["missing", "invalid"])
@pytest.mark.both_stores
def test_an_unusable_destination_block_parks_only_its_deliveries_and_the_run_stays_green(
    store: Store, project: str, tmp_path: Path, block: str
) -> None:
    root = tmp_path / "org-folder"
    ingest.subscribe(store, project, save_local(root))
    unusable = f"local-destination/never-created-{uuid.uuid4().hex[:8]}"
    if block == "invalid":
        unusable = save_local(tmp_path / "other")
        save_as_the_ui_would(unusable, {"root": "relative/x", "path_template": "/{orgId}/{bogus}"})
    ingest.subscribe(store, project, unusable)
    patient = ingest.add_patient(store, project)
    ingest.put_document(store, patient, "ccda", CCDA)

    state = deliver_state()
    summary = state.result()

    assert state.is_completed()
    assert (summary.delivered, summary.failed, summary.parked) == (1, 0, 1)
    from prefect.artifacts import Artifact

    card = Artifact.get("delivery-summary")  # the run's card says what waits, too
    assert card is not None and "1 parked until their block is fixed" in (card.description or "")
    [parked] = rows(store, status="failed")
    assert parked.destination == unusable and parked.attempts == 0
    if block == "missing":
        assert (
            parked.last_error
            == f"no destination block {unusable} (see `patient-delivery destination list`)"
        )
    else:
        assert parked.last_error.startswith(f"block {unusable} is invalid: ")
        assert "path_template: " in parked.last_error and "; root: " in parked.last_error
        assert "relative/x" not in parked.last_error  # fields named, values never
    # It waits for every run: the next claims none of it, and says why it waits.
    again = deliver()
    assert (again.delivered, again.failed, again.parked) == (0, 0, 0)
    assert list(again.waiting) == [unusable] and "waiting for their block" in again.headline()
    assert rows(store, status="failed")[0].attempts == 0
    # Fixed, the next run resumes it and delivers what waited, once.
    fixed = tmp_path / "fixed"
    name = unusable.split("/")[1]
    LocalDestination(root=fixed).save(name, overwrite=True)
    last = deliver()
    assert (last.delivered, last.failed, last.parked, last.waiting) == (1, 0, 0, {})
    assert len(files_under(fixed)) == 1 and rows(store, status="failed") == []


@pytest.mark.both_stores
def test_what_one_run_parked_no_other_run_claims_until_it_is_resumed(
    store: Store, project: str, tmp_path: Path
) -> None:
    """Runs that overlap must not pass a destination's parked deliveries back and forth: once
    parked, every run leaves them (and counts none of them as owed) until the destination
    is resumed, by a run that finds its block fixed or by `destination resume`."""
    from patient_delivery import destination_health
    from tests.test_cli import run

    ingest.subscribe(store, project, save_local(tmp_path / "healthy"))
    unusable = f"local-destination/never-created-{uuid.uuid4().hex[:8]}"
    ingest.subscribe(store, project, unusable)
    for _ in range(3):
        patient = ingest.add_patient(store, project)
        ingest.put_document(store, patient, "ccda", CCDA)

    first = ledger.claim(store, "run-a")
    assert len(first[unusable]) == 3
    destination_health.park(store, unusable, "no destination block")
    ledger.park_claimed(store, "run-a", first[unusable], "no destination block")
    for other in ("run-b", "run-c"):
        assert ledger.claim(store, other) == {}  # the healthy ones are run-a's
        assert ledger.count_owed(store, other) == 0
    assert unusable in destination_health.waiting(store)
    from patient_delivery.reports import status_counts

    until = status_counts(store).set_index("destination")["waiting_until"]
    assert until.notna()[unusable] and until.isna().sum() == 1  # the healthy one waits not

    assert "resumed" in run("destination", "resume", unusable)
    assert sorted(ledger.claim(store, "run-b")[unusable]) == sorted(first[unusable])
    assert "nothing waits" in run("destination", "resume", unusable)


@pytest.mark.both_stores
def test_filters_and_batches_deliver_exactly_what_was_asked(
    store: Store, project: str, tmp_path: Path
) -> None:
    root = tmp_path / "org-folder"
    ingest.subscribe(store, project, save_local(root))
    patients = [ingest.add_patient(store, project) for _ in range(7)]
    for patient in patients:
        ingest.put_document(store, patient, "ccda", CCDA)

    one = deliver(patient=[patients[0]])
    capped = deliver(max_documents=2, batch_size=1)
    rest = deliver(batch_size=3)

    assert (one.delivered, capped.delivered, rest.delivered) == (1, 2, 4)
    assert len(files_under(root)) == 7
    with store.session() as session:
        assert session.scalar(select(DocumentVersion.id).limit(1)) is not None


@pytest.mark.both_stores
def test_what_a_run_owes_is_counted_within_its_filters(
    store: Store, project: str, tmp_path: Path
) -> None:
    """The count a run starts with, its progress's total."""
    first, second = save_local(tmp_path / "a"), save_local(tmp_path / "b")
    ingest.subscribe(store, project, first)
    patients = [ingest.add_patient(store, project) for _ in range(3)]
    for patient in patients:
        ingest.put_document(store, patient, "ccda", CCDA)
    ingest.subscribe(store, project, second)
    ingest.put_document(store, patients[0], "ccda", CCDA_V2)  # replaces v1 in what is owed
    claimant = str(uuid.uuid4())

    assert ledger.count_owed(store, claimant) == 6
    only = ledger.WorkFilter(patient_ids=(patients[0],), destinations=(second,))
    assert ledger.count_owed(store, claimant, only) == 1
    deliver(max_documents=2)
    assert ledger.count_owed(store, claimant) == 4


def test_the_run_publishes_a_summary_artifact_with_counts_only(
    store: Store, project: str, tmp_path: Path
) -> None:
    from prefect.artifacts import Artifact

    ingest.subscribe(store, project, save_local(tmp_path / "org"))
    patient = ingest.add_patient(store, project, "MRN-77")
    ingest.put_document(store, patient, "ccda", CCDA)

    summary = deliver()

    artifact = Artifact.get("delivery-summary")
    assert artifact is not None
    assert "1 delivered, 0 failed" in (artifact.description or "")
    data = str(artifact.data)
    assert '"delivered": 1' in data
    assert "ClinicalDocument" not in data and "MRN-77" not in data and patient not in data
    assert progress_of(summary.flow_run_id) == [100.0]


def progress_of(flow_run_id: str, said: bool = False) -> list[float] | list[str]:
    """The progress artifacts of a flow run, as the API reports them (with `said`: their
    descriptions)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
    )

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(flow_run_id)]),
                type=ArtifactFilterType(any_=["progress"]),
            )
        )
    if said:
        return [a.description or "" for a in artifacts]
    return [float(a.data) for a in artifacts]  # type: ignore[arg-type]


def test_a_run_with_failures_ends_failed_with_a_message_that_counts_them(
    store: Store, project: str, tmp_path: Path
) -> None:
    from patient_delivery.flows.deliver import deliver_state

    ingest.subscribe(store, project, save_local(tmp_path / "org", "{projectId}/{externalId}"))
    for external_id in ("MRN-1", "../escape"):
        patient = ingest.add_patient(store, project, external_id)
        ingest.put_document(store, patient, "ccda", CCDA)

    state = deliver_state()

    assert state.is_failed()
    assert state.message and state.message.startswith(
        "1 of 2 deliveries failed (to local-destination/"
    )
    assert "escape" not in state.message
    clean = deliver_state()  # nothing owed but the same failure again
    assert clean.is_failed()
    ingest.add_project(store, "acme", "Other", "other")
    assert deliver_state(project="other").is_completed()


@pytest.mark.both_stores
def test_deliveries_held_by_a_run_that_is_over_are_taken_over_at_once(
    store: Store, project: str, tmp_path: Path
) -> None:
    root = tmp_path / "org-folder"
    destination = save_local(root)
    ingest.subscribe(store, project, destination)
    finished_run = deliver().flow_run_id  # a real flow run, now Completed
    patient = ingest.add_patient(store, project)
    ingest.put_document(store, patient, "ccda", CCDA)
    # That run claims and renders, then is gone; its lease would last another 10 minutes.
    stall(store, finished_run, destination)
    [pending] = rows(store, status="pending")

    assert deliver().delivered == 1

    [row] = rows(store)
    assert row.status == "delivered" and row.path == pending.path
    assert (root / pending.path).read_bytes() == CCDA


@pytest.mark.both_stores
def test_an_older_version_claimed_before_a_newer_arrived_is_not_sent(
    store: Store, project: str, tmp_path: Path
) -> None:
    root = tmp_path / "org-folder"
    destination = save_local(root, "{projectId}/{externalId}")  # one path per document
    ingest.subscribe(store, project, destination)
    patient = ingest.add_patient(store, project, "MRN-9")
    ingest.put_document(store, patient, "ccda", CCDA)
    claimed = stall(store, "slow-run", destination)  # it claimed version 1, then stalled
    ingest.put_document(store, patient, "ccda", CCDA_V2)  # version 2 arrives meanwhile

    assert ledger.start_batch(store, "slow-run", claimed) == []  # it resumes: nothing to send
    assert deliver().delivered == 1

    assert (root / "study" / "MRN-9.xml").read_bytes() == CCDA_V2
    assert sorted(r.status for r in rows(store)) == ["delivered", "superseded"]


@pytest.mark.parametrize(
    "template",
    [
        "{projectId}/{externalId}",  # one path per document, by design
        "{projectId}/{externalId}/{timestamp}",  # two versions rendered in the same second
    ],
)
@pytest.mark.both_stores
def test_a_newer_version_delivered_over_an_older_ones_path_marks_it_replaced(
    store: Store, project: str, tmp_path: Path, template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger must say what each path holds: the older row is `replaced`, not `delivered`
    at a path whose bytes are no longer its own."""
    root = tmp_path / "org-folder"
    destination = save_local(root, template)
    ingest.subscribe(store, project, destination)
    patient = ingest.add_patient(store, project, "MRN-11")
    other = ingest.add_patient(store, project, "MRN-12")
    ingest.put_document(store, patient, "ccda", CCDA)
    ingest.put_document(store, other, "ccda", CCDA)
    moment = datetime.now(UTC)
    monkeypatch.setattr(ledger, "_now", lambda: moment)  # both runs render in the same second
    assert deliver().delivered == 2
    ingest.put_document(store, patient, "ccda", CCDA_V2)
    assert deliver().delivered == 1

    by_patient = sorted((r.patient_id == patient, r.status, r.sha256) for r in rows(store))
    assert [status for _, status, _ in by_patient] == ["delivered", "delivered", "replaced"]
    [newest] = [r for r in rows(store) if r.status == "delivered" and r.patient_id == patient]
    assert (root / newest.path).read_bytes() == CCDA_V2
    figures = check_invariant(store, {destination: FolderRemote(root)})
    assert (figures.rows, figures.delivered, figures.lost, figures.partial) == (2, 2, 0, 0)


@pytest.mark.parametrize(
    ("count", "connections", "batch_size", "sizes"),
    [
        (2000, 8, 100, [250] * 8),  # one task per connection, all of one size
        (5000, 8, 100, [313] * 15 + [305]),  # over 5 batches each: two rounds of 8
        (3, 8, 100, [3]),  # a few documents: one connection, several files in flight
        (20, 8, 100, [7, 7, 6]),  # a connection for every MIN_LANE documents
        (10, 1, 2, [10]),  # one connection: 5 batches per task
        (11, 1, 2, [6, 5]),
    ],
)
def test_upload_tasks_keep_every_connection_busy_and_finish_together(
    count: int, connections: int, batch_size: int, sizes: list[int]
) -> None:
    from patient_delivery.flows.engine.waves import BATCHES_PER_LANE, chunks, lane_size

    size = lane_size(count, connections, batch_size)
    assert [len(b) for b in chunks(list(range(count)), size)] == sizes
    assert size <= batch_size * BATCHES_PER_LANE


def test_destinations_with_few_documents_share_ledger_batches_spread_over_connections() -> None:
    from patient_delivery.flows.engine.waves import shared_batches

    few = [(f"d{n}", [2 * n, 2 * n + 1]) for n in range(100)]  # 100 destinations, 2 each
    units = shared_batches(few, batch_size=100, threads=8)
    assert len(units) == 8 and [len(unit) for unit in units] == [13] * 7 + [9]
    assert [lane for unit in units for lane in unit] == few  # each once, in order
    units = shared_batches(few, batch_size=10, threads=8)
    assert all(sum(len(ids) for _, ids in unit) <= 10 for unit in units)
    many = [("big", list(range(1000, 1100))), ("big", list(range(1100, 1200)))]
    wide = [("wide", list(range(2000, 2040)))]
    units = shared_batches([many[0], few[0], *wide, many[1], few[1]], 40, threads=1)
    assert units == [[many[0]], wide, [many[1]], [few[0], few[1]]]  # lanes of its own, or a
    # full batch: a unit alone


def test_lanes_take_a_waves_batches_in_turn_smaller_toward_the_end() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from patient_delivery.flows.engine.sending import Shares

    shares = Shares(list(range(2000)), lanes=8, batch_size=100)
    sizes = [len(batch) for batch in shares.batches()]
    assert sizes[:8] == [100] * 8 and sizes[-1] <= Shares.SMALLEST
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == 2000
    assert len(sizes) <= 2 * 2000 // 100  # at most twice the ledger transactions of full batches

    shares = Shares(list(range(1000)), lanes=4, batch_size=7)  # lanes taking at once
    with ThreadPoolExecutor(4) as pool:
        taken = list(pool.map(lambda _: [i for batch in shares.batches() for i in batch], range(4)))
    assert sorted(i for lane in taken for i in lane) == list(range(1000))  # each once
    assert all(lane == sorted(lane) for lane in taken)
    assert Shares([1, 2, 3], lanes=8, batch_size=1).take() == [1]  # batch_size is the most
    few = [len(batch) for batch in Shares(list(range(17)), lanes=8, batch_size=100).batches()]
    assert len(few) >= 8 and sum(few) == 17  # a small wave still gives every lane some


def task_run_names(flow_run_id: str, full: bool = False) -> list[str]:
    """The task runs of a flow run by kind (gather, render, upload, record), or, with `full`,
    by the names the UI shows."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)]))
        )
    if full:
        return sorted(run.name for run in runs)
    return sorted(run.name.split(" ")[0].rsplit("-", 1)[0] for run in runs)


@pytest.mark.parametrize(("batch_size", "uploads"), [(5, 1), (2, 2)])
def test_on_threads_one_upload_task_carries_every_lane_of_a_wave(
    store: Store, project: str, tmp_path: Path, batch_size: int, uploads: int
) -> None:
    from patient_delivery.seed import seed_project

    root = tmp_path / "org"
    name = f"t-{uuid.uuid4().hex[:10]}"
    LocalDestination(root=root, max_connections=4).save(name)
    ingest.subscribe(store, project, f"local-destination/{name}")
    seed_project(store, project, 30, size_scale=0.02)  # 60 documents

    # 4 lanes of 15; each lane is at most 5 batches, so batches of 2 need a second wave
    summary = deliver(batch_size=batch_size)

    assert (summary.delivered, summary.failed) == (60, 0)
    assert (
        task_run_names(summary.flow_run_id)
        == ["gather", "manifests", "record", "render"] + ["upload"] * uploads
    )
    named = [n for n in task_run_names(summary.flow_run_id, full=True) if " " in n]
    assert (
        named
        == [f"render local-destination/{name}"]
        + [f"upload local-destination/{name} x 4 lanes"] * uploads
    )
    assert len(files_under(root)) == 60


def test_a_wave_is_one_task_on_threads_and_a_bounded_few_on_dask() -> None:
    from patient_delivery.flows.engine import Run, RunLimits
    from patient_delivery.flows.engine.runs import DASK_TASKS_PER_WAVE

    ready = {f"local-destination/{n}": ([n], 4) for n in range(1000)}  # one wave of 1,000 lanes
    here, on_dask = Run("r", RunLimits(8)), Run("r", RunLimits(8), uploads_here=False)
    (wave,) = here.plan(ready, batch=100)
    assert sorted(ref for ref, _ in wave) == sorted(ready)
    tasks = on_dask.plan(ready, batch=100)
    assert len(tasks) == DASK_TASKS_PER_WAVE
    assert sorted(lane for task in tasks for lane in task) == sorted(wave)  # each lane once
    assert on_dask.plan({"a": ([1], 1), "b": ([2], 1)}, batch=100) == [[("a", [1])], [("b", [2])]]
    here.close(), on_dask.close()


def test_documents_left_when_another_lane_marks_the_destination_down_are_each_answered(
    tmp_path: Path,
) -> None:
    """A lane whose own documents all landed, while another lane's gave up mid-batch, still
    owes an outcome for every document it had not taken; none may go unrecorded."""
    from patient_delivery.flows.engine.sending import send_documents
    from patient_delivery.flows.engine.sessions import SessionPool
    from patient_delivery.ledger import UploadItem

    pool = SessionPool(LocalDestination(root=tmp_path))
    body = b"<ClinicalDocument/>"
    digest = hashlib.sha256(body).hexdigest()

    def documents() -> Iterator[tuple[UploadItem, bytes]]:
        for number in range(4):
            if number == 2:
                pool.down = "another lane gave up: timed out"  # while this lane is mid-batch
            yield UploadItem(number, number, f"p/{number}.xml", digest, len(body)), body

    with pool.lease() as lease:
        outcomes = {o.delivery_id: o for o in send_documents(lease, pool, documents())}
    assert sorted(outcomes) == [0, 1, 2, 3]
    assert outcomes[0].delivered and outcomes[1].delivered
    assert outcomes[3].error == "not attempted in this run: another lane gave up: timed out"


def test_the_startup_heap_is_frozen_once_and_later_runs_are_collected_as_usual(
    store: Store, project: str, tmp_path: Path
) -> None:
    import gc

    ingest.subscribe(store, project, save_local(tmp_path / "out"))
    deliver()
    frozen = gc.get_freeze_count()
    assert frozen > 0  # startup's objects are out of the collector's way
    deliver()
    # a second run froze nothing of the first's (frozen objects may still be freed)
    assert gc.get_freeze_count() <= frozen


@pytest.mark.usefixtures("sshd")
def test_an_unreachable_destination_has_a_red_upload_task_and_one_error_line_with_its_reason(
    store: Store, project: str, tmp_path: Path, sshd
) -> None:  # type: ignore[no-untyped-def]
    """Read through the API, as the Prefect UI shows it: the upload task of the destination
    that could not be reached is Failed, the healthy one's Completed, and the run's logs hold
    one ERROR line naming the destination and why."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    from loopback.servers import free_port
    from tests.test_sftp_destination import sftp_block

    closed = f"t-{uuid.uuid4().hex[:10]}"
    sftp_block(sshd, Path("/in"), port=free_port(), connect_timeout=2).save(closed)
    dead, healthy = f"sftp-destination/{closed}", save_local(tmp_path / "org")
    ingest.subscribe(store, project, dead)
    ingest.subscribe(store, project, healthy)
    patient = ingest.add_patient(store, project, "MRN-1")
    ingest.put_document(store, patient, "ccda", CCDA)

    state = deliver_state()

    assert state.is_failed()
    [reason] = {row.last_error for row in rows(store, destination=dead)}
    assert reason and "refused" in reason.lower(), reason
    run_id = state.state_details.flow_run_id
    APILogHandler().flush()  # the run's logs reach the API before they are read
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    uploads = {t.name: t.state.type.value for t in tasks if t.name.startswith("upload")}  # type: ignore[union-attr]
    assert uploads == {
        f"upload {dead} x 1 lane": "FAILED",
        f"upload {healthy} x 1 lane": "COMPLETED",
    } or (len(uploads) == 1 and next(iter(uploads.values())) == "FAILED"), uploads
    errors = [log.message for log in logs if log.level >= 40 and reason in log.message]
    assert len(errors) == 1 and dead in errors[0], errors
    assert "ClinicalDocument" not in " ".join(log.message for log in logs)
    # The summary card: counts in the table; the reason, whole, in the list under the headline,
    # where the UI wraps it (a table cell is cut at the page's width).
    from prefect.artifacts import Artifact

    card = Artifact.get("delivery-summary")
    assert card is not None and card.description is not None
    headline, *said = card.description.splitlines()
    assert headline == "Delivery run: 1 delivered, 1 failed."
    [line] = [line for line in said if line.startswith("- ")]
    assert dead in line and reason.replace("_", "\\_") in line, line
    assert all("failure reasons" not in row for row in json.loads(str(card.data)))


@pytest.mark.both_stores
def test_a_server_stopped_is_down_skipped_probed_and_back_with_what_waited(
    store: Store, project: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One organization's SFTP server is stopped. The run that finds it so fails and raises
    the "down" event; the runs after it end Completed, deliver the healthy destination's
    updates, name it as down and never try it (its deliveries wait: no try counted); a probe
    due while it is still stopped leaves it down; once it runs again, the next probe finds it
    and that run delivers every waiting document once and raises the "back" event. One event
    of each, however many runs."""
    from loopback.servers import SshServer
    from patient_delivery.reports import status_counts
    from patient_delivery.settings import get_settings
    from tests.test_sftp_destination import sftp_block

    monkeypatch.setenv("PATIENT_DELIVERY_PROBE_FIRST_SECONDS", "1")
    monkeypatch.setenv("PATIENT_DELIVERY_PROBE_MOST_SECONDS", "1")
    get_settings.cache_clear()
    server = SshServer(user_home=False)
    try:
        name = f"t-{uuid.uuid4().hex[:10]}"
        folder = server.make_folder(name)
        sftp_block(server, folder, connect_timeout=2).save(name)
        dead, healthy = f"sftp-destination/{name}", save_local(tmp_path / "org")
        ingest.subscribe(store, project, dead)
        ingest.subscribe(store, project, healthy)
        started = datetime.now(UTC)

        def update_and_deliver() -> tuple[str, str, int, int]:
            patient = ingest.add_patient(store, project, f"MRN-{uuid.uuid4().hex[:6]}")
            ingest.put_document(store, patient, "ccda", CCDA)
            state = deliver_state()
            summary = state.result(raise_on_failure=False)
            sent = summary.destinations.get(dead)
            to_dead = sent.delivered if sent else 0
            return (
                state.type.value,
                state.message or "",
                summary.destinations[healthy].delivered,
                to_dead,
            )

        server.crash()
        first = update_and_deliver()
        assert first[0] == "FAILED" and first[2] == 1, first  # new trouble: the run is red
        down = status_counts(store).set_index("destination")["down_since"]
        assert down.notna()[dead] and down.isna()[healthy]  # `status` says since when
        tries = {row.id: row.attempts for row in rows(store, destination=dead)}

        second = update_and_deliver()
        assert second[0] == "COMPLETED" and second[2] == 1, second  # the healthy one still gets its
        assert f"down, skipped until a probe reaches them: {dead}" in second[1], second
        waited = rows(store, destination=dead)
        assert {row.id: row.attempts for row in waited if row.id in tries} == tries  # not tried
        assert [row.status for row in waited if row.id not in tries] == ["queued"]

        time.sleep(1.1)  # the first probe is due; the server still stopped
        probed = update_and_deliver()
        assert probed[0] == "COMPLETED" and probed[3] == 0 and dead in probed[1], probed

        server.start()
        time.sleep(1.1)  # the next probe is due
        back = update_and_deliver()
        assert back[0] == "COMPLETED" and back[3] == 4, back  # every waiting document, once
        assert "down" not in back[1]
        landed = {row.path for row in rows(store, destination=dead) if row.status == "delivered"}
        assert len(landed) == 4 and all(
            (folder / str(path).lstrip("/")).is_file() for path in landed
        )
        assert len(list(folder.rglob("*.xml"))) == 4  # nothing twice
        assert status_counts(store).set_index("destination")["down_since"].isna().all()
        assert _events(dead, started, "back") == 1
        assert _events(dead, started, "down") == 1  # once, for three runs it was down in
    finally:
        server.stop()


def _events(destination: str, since: datetime, what: str, wait: float = 30) -> int:
    """How many `patient-delivery.destination.<what>` events the server holds for it (they
    take a few seconds to be stored: waits up to `wait` seconds for the first)."""
    from prefect.client.orchestration import get_client

    query = {"filter": {
        "event": {"name": [f"patient-delivery.destination.{what}"]},
        "resource": {"id": [f"patient-delivery.destination.{destination}"]},
        "occurred": {"since": since.isoformat()},
    }}  # fmt: skip
    deadline = time.monotonic() + wait
    with get_client(sync_client=True) as client:
        while True:
            found = client.request("POST", "/events/filter", json=query).json()["events"]
            if found or time.monotonic() > deadline:
                return len(found)
            time.sleep(0.5)
