"""Many organizations in one run: each destination gets its documents exactly once, the run's
Prefect work does not grow with the number of destinations, one unreachable server costs only
its own documents, and the session budget holds, counted at the server."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest

from loopback.servers import SshServer, free_port
from patient_delivery import ingest
from patient_delivery.blocks.local import LocalDestination, LocalSession
from patient_delivery.flows.deliver import deliver
from patient_delivery.flows.engine import Run, RunLimits, limits
from patient_delivery.seed import seed_project
from patient_delivery.store import Store
from tests.faults import FaultProxy, check_invariant, documents
from tests.test_deliver_flow import task_run_names
from tests.test_local_destination import FolderRemote
from tests.test_sftp_destination import sftp_block

pytestmark = pytest.mark.usefixtures("prefect_api")


def organization(store: Store, reference: str, patients: int = 1) -> str:
    """A new organization with one project subscribed to `reference`, and `patients` synthetic
    patients (a C-CDA document and a FHIR bundle each)."""
    org = f"org-{uuid.uuid4().hex[:8]}"
    ingest.add_organization(store, org, org)
    project = ingest.add_project(store, org, "Study", f"{org}-study")
    ingest.subscribe(store, project, reference)
    seed_project(store, project, patients, size_scale=0.02)
    return project


def local_organizations(store: Store, tmp_path: Path, count: int) -> dict[str, FolderRemote]:
    """`count` organizations, each with its own local-folder destination; a reader of each
    folder, by destination reference."""
    remotes = {}
    for number in range(count):
        root = tmp_path / f"org-{number}"
        name = f"many-{uuid.uuid4().hex[:10]}"
        LocalDestination(root=root, max_connections=2).save(name)
        organization(store, f"local-destination/{name}")
        remotes[f"local-destination/{name}"] = FolderRemote(root)
    return remotes


@pytest.mark.both_stores
def test_forty_destinations_each_get_their_documents_once_in_a_run_of_four_task_runs(
    store: Store, tmp_path: Path
) -> None:
    remotes = local_organizations(store, tmp_path, 40)

    summary = deliver()

    assert (summary.delivered, summary.failed) == (80, 0)
    assert all(len(documents(remote.names())) == 2 for remote in remotes.values())
    figures = check_invariant(store, remotes)
    assert (figures.delivered, figures.lost, figures.duplicated) == (80, 0, 0)
    # gather, render and record once, and one upload task for the page's single wave
    assert task_run_names(summary.flow_run_id) == [
        "gather", "manifests", "record", "render", "upload"
    ]  # fmt: skip
    named = [n for n in task_run_names(summary.flow_run_id, full=True) if " " in n]
    assert named == ["render 40 destinations", "upload 40 destinations x 40 lanes"]
    assert deliver().delivered == 0


def test_an_unreachable_server_among_many_fails_only_its_own_documents(
    store: Store, sshd: SshServer, tmp_path: Path
) -> None:
    remotes = local_organizations(store, tmp_path, 20)
    name = f"gone-{uuid.uuid4().hex[:8]}"
    sftp_block(sshd, tmp_path / "never", port=free_port(), connect_timeout=2).save(name)
    organization(store, f"sftp-destination/{name}")

    started = time.perf_counter()
    summary = deliver()
    elapsed = time.perf_counter() - started

    assert (summary.delivered, summary.failed) == (40, 2)
    assert summary.destinations[f"sftp-destination/{name}"].failed == 2
    assert all(len(documents(remote.names())) == 2 for remote in remotes.values())
    # Four tries of a refused connection with backoff between them, not one per document.
    assert elapsed < 30


def test_a_runs_max_sessions_is_never_exceeded_at_the_server(
    store: Store, sshd: SshServer, tmp_path: Path
) -> None:
    proxy = FaultProxy(sshd.port)
    try:
        remotes = {}
        for number in range(8):
            folder = sshd.make_folder(f"budget-{uuid.uuid4().hex[:8]}")
            name = f"budget-{number}-{uuid.uuid4().hex[:6]}"
            sftp_block(sshd, folder, port=proxy.port, max_connections=4).save(name)
            reference = f"sftp-destination/{name}"
            organization(store, reference, patients=6)
            remotes[reference] = FolderRemote(folder)

        summary = deliver(max_sessions=3)

        assert (summary.delivered, summary.failed) == (96, 0)
        assert proxy.connections >= 8  # every destination had its own connection
        assert 1 <= proxy.peak <= 3
        figures = check_invariant(store, remotes)
        assert (figures.delivered, figures.lost, figures.duplicated) == (96, 0, 0)
    finally:
        proxy.stop()


def test_writes_to_this_machines_folders_are_bounded_apart_from_network_sends(
    store: Store, tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sixty local folders in one run: at most `limits.DISK_WRITERS` files written at once (more
    only contend for fsync and the ledger's lock), and still several at once. An SFTP destination
    is not held by that bound."""
    writing = 0
    most = 0
    lock = threading.Lock()
    upload = LocalSession.upload

    def counted(self: LocalSession, path: str, content: bytes, sha256: str):  # type: ignore[no-untyped-def]
        nonlocal writing, most
        with lock:
            writing += 1
            most = max(most, writing)
        try:
            time.sleep(0.005)  # long enough for the lanes to overlap
            return upload(self, path, content, sha256)
        finally:
            with lock:
                writing -= 1

    monkeypatch.setattr(LocalSession, "upload", counted)
    remotes = local_organizations(store, tmp_path, 60)

    summary = deliver(max_sessions=4 * limits.DISK_WRITERS)

    assert (summary.delivered, summary.failed) == (120, 0)
    assert 2 <= most <= limits.DISK_WRITERS
    assert check_invariant(store, remotes).delivered == 120
    blocks = {"sftp/x": sftp_block(sshd, tmp_path), "local/x": LocalDestination(root=tmp_path)}
    run = Run(f"run-{uuid.uuid4().hex[:6]}", RunLimits(4),
              load=lambda refs: {ref: blocks[ref] for ref in refs})  # fmt: skip

    def thread() -> str:
        return threading.current_thread().name

    assert run.submit(["sftp/x"], thread).result().startswith("upload-lane")
    assert run.submit(["local/x"], thread).result().startswith("disk-writer")
    run.close()
