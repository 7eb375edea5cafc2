"""A run that hangs ends TimedOut (which alerts) instead of holding the deployment's one-at-a-time
slot forever; what it had not sent stays owed to the next run."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from patient_delivery import ingest
from patient_delivery.blocks.contract import Receipt
from patient_delivery.blocks.local import LocalDestination, LocalSession
from patient_delivery.flows import runtime
from patient_delivery.flows.backfill import backfill, redeliver
from patient_delivery.flows.deliver import deliver_updates
from patient_delivery.settings import get_settings
from patient_delivery.store import Store

pytestmark = pytest.mark.usefixtures("prefect_api")

RELEASE = threading.Event()
CCDA = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>%d</title></ClinicalDocument>'


class Hanging(LocalSession):
    def upload(self, path: str, content: bytes, sha256: str) -> Receipt:
        RELEASE.wait(8)  # a peer that stopped answering (for longer than the run may take)
        return super().upload(path, content, sha256)


class HangingFolder(LocalDestination):
    _block_type_slug = "hanging-test-folder"
    _block_type_name = "Hanging Test Folder"

    @contextmanager
    def open_session(self) -> Iterator[LocalSession]:
        with super().open_session() as session:
            yield Hanging(session.root)


def test_every_flow_has_the_configured_timeout() -> None:
    minutes = get_settings().run_timeout_minutes
    assert minutes == 120  # the default
    for flow in (deliver_updates, redeliver, backfill):
        assert flow.timeout_seconds == minutes * 60, flow.name


def test_a_hung_run_ends_timed_out(store: Store, tmp_path: Path) -> None:
    ingest.add_organization(store, "Acme", "acme")
    project = ingest.add_project(store, "acme", "Study", "study")
    name = f"hang-{uuid.uuid4().hex[:8]}"
    HangingFolder(root=tmp_path / "org").save(name)
    ingest.subscribe(store, project, f"hanging-test-folder/{name}")
    patient = ingest.add_patient(store, project)
    ingest.put_document(store, patient, "ccda", CCDA % 1)
    RELEASE.clear()
    try:
        state = runtime.run_sync(deliver_updates.with_options(timeout_seconds=2)(return_state=True))
    finally:
        RELEASE.set()  # the stuck send may finish now, in its own thread
    assert state.name == "TimedOut" and state.is_failed(), state
