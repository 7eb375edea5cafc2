"""A patient stops sharing with a project: nothing more is sent or served to it, from that
moment; the withdrawal is on record; sharing again owes the newest documents anew."""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import pytest
from sqlalchemy import select

from patient_delivery import ingest
from patient_delivery.blocks.contract import Receipt, TransientDeliveryError
from patient_delivery.blocks.local import LocalDestination, LocalSession
from patient_delivery.flows.backfill import backfill, redeliver
from patient_delivery.flows.deliver import deliver
from patient_delivery.reports import LedgerQuery, disclosures_frame, withdrawals_frame
from patient_delivery.store import Store
from patient_delivery.store.models import Delivery, Share
from tests.test_cli import run
from tests.test_deliver_flow import save_local
from tests.test_pull import World, _mcp_call, world  # noqa: F401 - the fixture

CCDA = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>%d</title></ClinicalDocument>'


def statuses(store: Store, patient: str) -> list[tuple[str, str]]:
    with store.session() as session:
        rows = session.execute(
            select(Delivery.data_type, Delivery.status)
            .where(Delivery.patient_id == patient)
            .order_by(Delivery.id)
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.both_stores
def test_what_is_not_sent_is_withdrawn_nothing_more_goes_and_a_new_share_owes_the_newest(
    store: Store, tmp_path: Path
) -> None:
    ingest.add_organization(store, "Acme", "acme")
    project = ingest.add_project(store, "acme", "Study", "study")
    root = tmp_path / "org"
    ingest.subscribe(store, project, save_local(root))
    patient = ingest.add_patient(store, project, "MRN-1")
    ingest.put_document(store, patient, "ccda", CCDA % 1)
    assert deliver().delivered == 1
    ingest.put_document(store, patient, "ccda", CCDA % 2)  # queued, not yet sent

    done = ingest.unshare_patient(store, project, patient, "moved away", recorded_by="test")

    assert done.withdrawn_deliveries == 1
    assert statuses(store, patient) == [("ccda", "delivered"), ("ccda", "withdrawn")]
    ingest.put_document(store, patient, "ccda", CCDA % 3)  # nothing is owed to the project now
    assert statuses(store, patient) == [("ccda", "delivered"), ("ccda", "withdrawn")]
    assert deliver().delivered == 0
    assert backfill(project=project, force=True, dry_run=False)["delivered"] == 0
    assert redeliver(project=project) == {"delivered": 0, "failed": 0}
    assert [p.read_bytes() for p in root.rglob("*.xml")] == [CCDA % 1]
    [record] = withdrawals_frame(store, LedgerQuery(patient_id=patient)).to_dict("records")
    assert (record["project_id"], record["reason"], record["recorded_by"]) == (
        project, "moved away", "test"
    )  # fmt: skip
    assert record["withdrawn_deliveries"] == 1
    with pytest.raises(ingest.IngestError, match="does not share with project"):
        ingest.unshare_patient(store, project, patient)

    assert ingest.share_patient(store, patient, project, "MRN-1") == 1  # the newest, version 3
    assert deliver().delivered == 1
    assert sorted(p.read_bytes() for p in root.rglob("*.xml")) == [CCDA % 1, CCDA % 3]
    assert len(disclosures_frame(store, LedgerQuery(patient_id=patient))) == 2


STARTS: list[float] = []
WITHDRAWN_AT: list[float] = []


class WithdrawingSession(LocalSession):
    """A local folder's session that records when each document's upload began and can have
    the patient withdraw consent, as another process would."""

    def __init__(self, root: Path, block: WithdrawingFolder) -> None:
        super().__init__(root)
        self.block = block

    def withdraw(self) -> None:
        from patient_delivery.store import open_store

        store = open_store(self.block.store_url)
        ingest.unshare_patient(store, self.block.project_id, self.block.patient_id, "test")
        WITHDRAWN_AT.append(time.monotonic())


class Recording(WithdrawingSession):
    """On the third upload, after it, the patient withdraws; each upload is slow."""

    def upload(self, path: str, content: bytes, sha256: str) -> Receipt:
        if "/_manifests/" in path:  # written after the run's sends, not a document
            return super().upload(path, content, sha256)
        STARTS.append(time.monotonic())
        receipt = super().upload(path, content, sha256)
        time.sleep(0.1)  # a slow destination: the run is still sending when consent ends
        if len(STARTS) == 3 and not WITHDRAWN_AT:
            self.withdraw()
        return receipt


class FailingOnce(WithdrawingSession):
    """The first upload fails temporarily, and the patient withdraws while it waits for its
    retry."""

    def upload(self, path: str, content: bytes, sha256: str) -> Receipt:
        if "/_manifests/" in path:
            return super().upload(path, content, sha256)
        STARTS.append(time.monotonic())
        if len(STARTS) == 1:
            self.withdraw()
            raise TransientDeliveryError("connection reset (a test's)")
        return super().upload(path, content, sha256)


class WithdrawingFolder(LocalDestination):
    """A local folder whose sessions are `session_type`, which knows the patient to withdraw.
    (A slug of its own: inheriting `local-destination` would replace the real type.)"""

    _block_type_slug = "withdrawing-test-folder"
    session_type: ClassVar[type[WithdrawingSession]]
    store_url: str
    project_id: str
    patient_id: str

    @contextmanager
    def open_session(self):  # type: ignore[no-untyped-def]
        with super().open_session() as session:
            yield self.session_type(session.root, self)


class ConsentWithdrawnMidRun(WithdrawingFolder):
    _block_type_slug = "consent-test-folder"
    _block_type_name = "Consent Test Folder"
    session_type = Recording


class WithdrawnDuringRetry(WithdrawingFolder):
    _block_type_slug = "consent-retry-folder"
    _block_type_name = "Consent Retry Folder"
    session_type = FailingOnce


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.both_stores
def test_a_withdrawal_while_a_run_sends_stops_its_sends_within_the_window(
    store: Store, tmp_path: Path
) -> None:
    from patient_delivery.flows.engine.sending import Consent

    ingest.add_organization(store, "Acme", "acme")
    project = ingest.add_project(store, "acme", "Study", "study")
    patient = ingest.add_patient(store, project)
    roots = []
    for number in range(20):  # one patient, 20 destinations: 40 documents, one at a time
        roots.append(tmp_path / f"org-{number}")
        name = f"consent-{uuid.uuid4().hex[:8]}"
        ConsentWithdrawnMidRun(root=roots[-1], store_url=store.url, project_id=project,
                               patient_id=patient, max_connections=1).save(name)  # fmt: skip
        ingest.subscribe(store, project, f"consent-test-folder/{name}")
    ingest.put_document(store, patient, "ccda", CCDA % 1)
    ingest.put_document(store, patient, "fhir", json.dumps(
        {"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": {"resourceType": "Patient", "id": "p"}}]}).encode())  # fmt: skip
    STARTS.clear()
    WITHDRAWN_AT.clear()

    summary = deliver(max_sessions=1)

    [withdrawn_at] = WITHDRAWN_AT
    after = [start for start in STARTS if start > withdrawn_at]
    assert all(start - withdrawn_at <= Consent.EVERY + 0.3 for start in after), after
    sent = sum(1 for root in roots for p in root.rglob("*") if p.suffix in (".xml", ".json")
               and "_manifests" not in p.parts)  # fmt: skip
    assert sent == len(STARTS) == summary.delivered and sent < 40
    found = statuses(store, patient)
    assert sorted({status for _, status in found}) == ["delivered", "withdrawn"]
    assert sum(status == "withdrawn" for _, status in found) == 40 - sent
    assert len(disclosures_frame(store, LedgerQuery(patient_id=patient))) == sent  # all on record
    assert summary.failed == 0


@pytest.mark.security
@pytest.mark.usefixtures("prefect_api")
@pytest.mark.both_stores
def test_a_document_waiting_for_its_retry_is_not_sent_once_its_patient_withdraws(
    store: Store, tmp_path: Path
) -> None:
    ingest.add_organization(store, "Acme", "acme")
    project = ingest.add_project(store, "acme", "Study", "study")
    patient = ingest.add_patient(store, project)
    name = f"retry-{uuid.uuid4().hex[:8]}"
    WithdrawnDuringRetry(root=tmp_path / "org", store_url=store.url, project_id=project,
                         patient_id=patient, max_connections=1).save(name)  # fmt: skip
    ingest.subscribe(store, project, f"consent-retry-folder/{name}")
    ingest.put_document(store, patient, "ccda", CCDA % 1)
    STARTS.clear()
    WITHDRAWN_AT.clear()

    summary = deliver()

    assert len(WITHDRAWN_AT) == 1 and len(STARTS) == 1, "the retry was sent after the withdrawal"
    assert [p for p in (tmp_path / "org").rglob("*.xml")] == []
    assert statuses(store, patient) == [("ccda", "withdrawn")]
    assert len(disclosures_frame(store, LedgerQuery(patient_id=patient))) == 0
    assert (summary.delivered, summary.failed) == (0, 0)


def test_pull_reads_end_with_the_share_unless_another_project_still_has_one(
    world: World,  # noqa: F811 - the fixture
) -> None:
    patient, _ = world.fullest()
    ingest.add_project(world.store, "acme", "Registry", "registry")
    ingest.share_patient(world.store, patient, "registry")
    assert world.get(f"Patient/{patient}").status_code == 200

    ingest.unshare_patient(world.store, "study", patient)
    assert world.get(f"Patient/{patient}").status_code == 200  # still shared with registry

    ingest.unshare_patient(world.store, "registry", patient)
    assert world.get(f"Patient/{patient}").status_code == 404
    assert world.get("Observation", patient=patient).json().get("total", 0) == 0
    asked = {"patient_id": patient, "data_type": "fhir"}
    _, result = _mcp_call(world.api.url, world.key, ("get_document", asked))
    assert result.is_error
    with world.store.session() as session:
        assert session.get(Share, ("study", patient)) is None


@pytest.mark.bad_input
def test_unshare_from_the_command_line_is_recorded_and_shown_with_the_disclosures(
    store: Store,
) -> None:
    run("org", "add", "Acme", "--id", "acme")
    run("project", "add", "acme", "Study", "--id", "study")
    patient = run("patient", "add", "study").strip()
    run("document", "put", patient, "ccda", "-", input=CCDA % 1)

    assert "share withdrawn; 0 deliveries withdrawn" in run("patient", "unshare", patient, "study")
    shown = json.loads(run("disclosures", "--patient", patient, "--json"))
    [withdrawal] = shown["share_withdrawals"]
    assert withdrawal["project_id"] == "study" and withdrawal["recorded_by"].startswith("cli:")
    assert "does not share with project" in run("patient", "unshare", patient, "study", code=2)
    long = run("patient", "unshare", patient, "study", "--reason", "x" * 501, code=2)
    swapped = run("patient", "unshare", "study", patient, code=2)
    assert "the order is PATIENT PROJECT" in swapped and len(swapped.strip().splitlines()) == 1
    assert "reason: at most 500 characters" in long and "xxx" not in long
