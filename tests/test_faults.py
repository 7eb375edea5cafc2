"""Faults on the way to real servers: after each, nothing is lost, duplicated or left partial.

Every scenario delivers real documents (4 C-CDA files and the 13-patient FHIR export) to a
real sshd or SeaweedFS through a fault injected on loopback, then `settle` checks the
invariant against what the server holds and the ledger: each (version, destination) is at
its final path exactly once with the right SHA-256, or owed and delivered by the next run; a
re-run sends nothing. The figures go into the report printed at the end of the session.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from loopback.servers import SFTP_SERVERS, MotoServer, SeaweedServer, SftpServer, SshServer
from patient_delivery import ingest, ledger
from patient_delivery.flows.deliver import deliver
from patient_delivery.importers import import_ccda, import_fhir_bulk
from patient_delivery.store import Store
from patient_delivery.store.models import Delivery, DeliveryStatus
from tests.destination_contract import Remote
from tests.faults import REPORT, FaultProxy, Figures, S3FaultProxy, check_invariant
from tests.test_local_destination import FolderRemote
from tests.test_s3_destination import EXTERNAL_ID, BucketRemote, s3_block
from tests.test_sftp_destination import sftp_block

pytestmark = pytest.mark.usefixtures("prefect_api")

DOCUMENTS = 17  # 4 C-CDA files and 13 FHIR bundles, about 11 MB


@pytest.fixture
def project(store: Store, fixtures_dir: Path) -> str:
    ingest.add_organization(store, "Acme", "acme")
    project = ingest.add_project(store, "acme", "Study", "study")
    import_ccda(store, sorted((fixtures_dir / "ccda").glob("*.xml"))[:4], project_id=project)
    import_fhir_bulk(store, fixtures_dir / "fhir-bulk-10", project)
    return project


@dataclass
class Endpoint:
    """A real server to deliver to: its port (to put a proxy in front), a way to save a
    destination block pointing at any port, a reader of what arrived, and crash/start."""

    kind: str
    port: int
    save: Callable[..., str]
    remote: Remote
    server: SshServer | SeaweedServer | SftpServer

    def crash(self) -> None:
        self.server.crash()

    def ensure_running(self) -> None:
        if self.server.process.poll() is not None:
            self.server.start()


def _name() -> str:
    return f"fault-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def endpoint(
    request: pytest.FixtureRequest,
    sshd: SshServer,
    moto: MotoServer,
    seaweed: SeaweedServer,
    sftp_servers: Callable[[str], SftpServer],
) -> Iterator[Endpoint]:
    if request.param.startswith("sftp:"):  # another SFTP server than OpenSSH's
        other = sftp_servers(request.param.removeprefix("sftp:"))
        on_disk, root = other.make_folder(_name())

        def save_other(port: int | None = None, **overrides: object) -> str:
            name = _name()
            sftp_block(sshd, on_disk, port=port or other.port, root=root,
                       host_keys=[other.host_key_line()], **overrides).save(name)  # fmt: skip
            return f"sftp-destination/{name}"

        point = Endpoint(request.param, other.port, save_other, FolderRemote(on_disk), other)
    elif request.param == "sftp":
        folder = sshd.make_folder(_name())

        def save_sftp(port: int | None = None, **overrides: object) -> str:
            name = _name()
            sftp_block(sshd, folder, port=port or sshd.port, **overrides).save(name)
            return f"sftp-destination/{name}"

        point = Endpoint("sftp", sshd.port, save_sftp, FolderRemote(folder), sshd)
    else:
        bucket = _name()
        seaweed.client().create_bucket(Bucket=bucket)
        role = moto.create_role(bucket, EXTERNAL_ID, ["s3:PutObject"], bucket)

        def save_s3(port: int | None = None, **overrides: object) -> str:
            name = _name()
            url = f"http://127.0.0.1:{port or seaweed.port}"
            s3_block(moto, bucket, role, endpoint_url=url, server_side_encryption=None,
                     **overrides).save(name)  # fmt: skip
            return f"s3-destination/{name}"

        remote = BucketRemote(seaweed.client(), bucket)
        point = Endpoint("s3", seaweed.port, save_s3, remote, seaweed)
    try:
        yield point
    finally:
        point.ensure_running()  # a failed test must not leave the shared server down


@pytest.fixture
def proxy() -> Iterator[Callable[..., FaultProxy]]:
    """Start a `FaultProxy` (same options) in front of a port; stopped after the test."""
    started: list[FaultProxy] = []

    def start(port: int, **faults: Any) -> FaultProxy:
        started.append(FaultProxy(port, **faults))
        return started[-1]

    yield start
    for running in started:
        running.stop()


BOTH = pytest.mark.parametrize("endpoint", ["sftp", "s3"], indirect=True)


@pytest.fixture(autouse=True)
def probes_a_second_apart(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A destination a run found failing is down, and runs skip it until a probe reaches it:
    here a probe is due a second after it went down (a minute by default)."""
    from patient_delivery.settings import get_settings

    monkeypatch.setenv("PATIENT_DELIVERY_PROBE_FIRST_SECONDS", "1")
    monkeypatch.setenv("PATIENT_DELIVERY_PROBE_MOST_SECONDS", "1")
    get_settings.cache_clear()


def after_the_fix(store: Store) -> None:
    """The organization fixed its side: wait until the probe of a destination down is due, so
    the next run probes it, reaches it and sends what waited."""
    from patient_delivery import destination_health

    if any(wait.down for wait in destination_health.waiting(store).values()):
        time.sleep(1.2)


def settle(
    store: Store, scenario: str, remotes: Mapping[str, Remote], injected: Mapping[str, int]
) -> Figures:
    """The fault is over: check what it left, let the next run finish (after the probe of a
    destination down), check a re-run is idle."""
    left = check_invariant(store, remotes)
    assert (left.lost, left.duplicated, left.partial) == (0, 0, 0), left
    after_the_fix(store)
    deliver()
    after = check_invariant(store, remotes)
    assert after.rows == DOCUMENTS * len(remotes), after
    assert (after.delivered, after.owed) == (after.rows, 0), after
    assert (after.lost, after.duplicated, after.partial, after.leftovers) == (0, 0, 0, 0), after
    assert deliver().delivered == 0
    REPORT.record(scenario, after, injected)
    return after


def reasons(store: Store, reference: str) -> set[str]:
    with store.session() as session:
        rows = session.scalars(select(Delivery.last_error).where(Delivery.destination == reference))
        return {reason for reason in rows if reason}


NETWORK_FAULTS = [
    # (what, proxy options, connections (None: the block's default), fault the proxy must
    # have injected and how often)
    ("5 ms per chunk, 8 MB/s cap", {"latency": 0.005, "bandwidth": 8_000_000}, None, None),
    ("2 connections reset after 300 kB", {"reset_after": 300_000, "resets": 2}, 1,
     ("connection reset mid-transfer", 2)),
    ("first 2 connections refused", {"refuse_first": 2}, 1, ("refused connection", 2)),
]  # fmt: skip


@BOTH
@pytest.mark.parametrize(("what", "faults", "connections", "expected"), NETWORK_FAULTS,
                         ids=["slow-narrow", "reset-midway", "refused-first"])  # fmt: skip
def test_network_faults_are_ridden_out_in_the_same_run_without_loss(
    store: Store,
    project: str,
    endpoint: Endpoint,
    proxy: Callable[..., FaultProxy],
    what: str,
    faults: dict[str, Any],
    connections: int | None,
    expected: tuple[str, int] | None,
) -> None:
    faulty = proxy(endpoint.port, **faults)
    bound = {"max_connections": connections} if connections else {}
    reference = endpoint.save(port=faulty.port, **bound)
    ingest.subscribe(store, project, reference)
    first = deliver()
    if expected is not None:
        assert faulty.injected[expected[0]] == expected[1]
    assert (first.delivered, first.failed) == (DOCUMENTS, 0)  # the retries got through
    faulty.shaped()
    settle(store, f"{endpoint.kind}: {what}", {reference: endpoint.remote}, faulty.injected)


@pytest.mark.parametrize(
    "endpoint", ["sftp", "s3", *(f"sftp:{name}" for name in sorted(SFTP_SERVERS))], indirect=True
)
def test_a_server_killed_mid_run_and_restarted_loses_and_duplicates_nothing(
    store: Store, project: str, endpoint: Endpoint, proxy: Callable[..., FaultProxy]
) -> None:
    # A narrow link makes the run last a few seconds, so the crash lands in the middle of it.
    narrow = proxy(endpoint.port, bandwidth=3_000_000)
    reference = endpoint.save(port=narrow.port, max_connections=2)
    ingest.subscribe(store, project, reference)
    crashed = threading.Event()

    def acknowledged() -> int:
        with store.session() as session:
            return len(session.scalars(select(Delivery.id).where(
                Delivery.status == DeliveryStatus.DELIVERED)).all())  # fmt: skip

    def crash_after_a_recorded_file() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if acknowledged() >= 1:
                endpoint.crash()
                crashed.set()
                return
            time.sleep(0.02)

    killer = threading.Thread(target=crash_after_a_recorded_file)
    killer.start()
    started = time.perf_counter()
    # Outcomes recorded one by one, so the crash comes after a delivery the server acknowledged
    # (files in place are not enough: one caught between its rename and the rename's reply is
    # counted failed, sent again next run, and `settle` checks it is there once).
    first = deliver(batch_size=1)
    killer.join()
    assert crashed.is_set()
    assert 1 <= first.delivered < DOCUMENTS and first.failed == DOCUMENTS - first.delivered
    # One destination down costs one retry cycle per run, not one per document.
    assert time.perf_counter() - started < 60
    endpoint.server.start()
    how = "SIGTERMed" if endpoint.kind == "s3" else "SIGKILLed"  # see SeaweedServer.crash
    settle(store, f"{endpoint.kind}: server {how} mid-run, restarted",
           {reference: endpoint.remote}, {f"{endpoint.kind} server killed": 1})  # fmt: skip


@pytest.mark.parametrize("endpoint", ["s3"], indirect=True)
def test_s3_throttling_and_server_errors_are_retried_with_backoff(
    store: Store, project: str, endpoint: Endpoint
) -> None:
    proxy = S3FaultProxy(endpoint.port)
    try:
        proxy.script.extend([503, 503, 500, 503, 500])
        reference = endpoint.save(port=proxy.port, max_connections=1)
        ingest.subscribe(store, project, reference)
        first = deliver()
        assert (first.delivered, first.failed) == (DOCUMENTS, 0)
        assert sum(proxy.document_puts().values()) == DOCUMENTS + 5  # one more per error
        settle(store, "s3: 503 SlowDown and 500 InternalError x5", {reference: endpoint.remote},
               proxy.injected)  # fmt: skip
    finally:
        proxy.stop()


@pytest.mark.parametrize("endpoint", ["s3"], indirect=True)
def test_a_document_costs_at_most_the_runs_attempts_however_long_s3_keeps_failing(
    store: Store, project: str, endpoint: Endpoint
) -> None:
    """Retries happen in one place: the run's rounds. The S3 clients retry nothing themselves,
    so a put that keeps failing is sent `ATTEMPTS` times in a run, not that many times each
    client's own tries."""
    from patient_delivery.flows.engine.retries import ATTEMPTS

    proxy = S3FaultProxy(endpoint.port)
    try:
        proxy.always = 503
        reference = endpoint.save(port=proxy.port, max_connections=1, files_in_flight=1)
        ingest.subscribe(store, project, reference)
        first = deliver()
        assert (first.delivered, first.failed) == (0, DOCUMENTS)
        assert max(proxy.puts.values()) == ATTEMPTS  # the most one document cost
        # two documents in a row used up their tries: the destination is down for this run
        assert sorted(proxy.puts.values()) == [ATTEMPTS, ATTEMPTS]
        proxy.always = None
        settle(store, f"s3: 503 on every write ({ATTEMPTS} tries each), then fixed",
               {reference: endpoint.remote}, proxy.injected)  # fmt: skip
    finally:
        proxy.stop()


@pytest.mark.parametrize("endpoint", ["s3"], indirect=True)
@pytest.mark.parametrize("status", [403, 404, 400])
def test_s3_permanent_errors_are_not_retried_and_say_so(
    store: Store, project: str, endpoint: Endpoint, status: int
) -> None:
    proxy = S3FaultProxy(endpoint.port)
    try:
        proxy.always = status
        reference = endpoint.save(port=proxy.port)
        ingest.subscribe(store, project, reference)
        first = deliver()
        assert (first.delivered, first.failed) == (0, DOCUMENTS)
        assert sorted(proxy.document_puts().values()) == [1] * DOCUMENTS  # one each, no retry
        [reason] = reasons(store, reference)
        assert reason.endswith("(not retried)")
        proxy.always = None  # the organization fixed its side
        settle(store, f"s3: {status} on every write, then fixed", {reference: endpoint.remote},
               proxy.injected)  # fmt: skip
    finally:
        proxy.stop()


@pytest.mark.parametrize("endpoint", ["sftp"], indirect=True)
def test_a_changed_host_key_between_runs_sends_nothing_until_pinned_again(
    store: Store, project: str, endpoint: Endpoint, sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = endpoint.save()
    ingest.subscribe(store, project, reference)
    assert deliver().delivered == DOCUMENTS
    before = {name: endpoint.remote.read(name) for name in endpoint.remote.names()}
    sshd.crash()
    sshd.new_host_key()
    sshd.start()
    ingest.put_document(store, _first_patient(store), "ccda", _ccda(b"changed after key change"))
    # The new version renders its {timestamp} in a later second than the first run's, so it
    # gets a path of its own (in the same second it would replace the old file, by design).
    later = datetime.now(UTC) + timedelta(seconds=2)
    monkeypatch.setattr(ledger, "_now", lambda: later)
    second = deliver()
    assert (second.delivered, second.failed) == (0, 1)
    [reason] = reasons(store, reference)
    assert "host key" in reason and "SHA256:" in reason
    assert {name: endpoint.remote.read(name) for name in endpoint.remote.names()} == before
    # The organization confirms the new key: pin it (same block name) and the next run sends.
    _resave_with_current_key(reference, sshd)
    after = check_invariant(store, {reference: endpoint.remote})
    assert after.owed == 1
    after_the_fix(store)
    deliver()
    after = check_invariant(store, {reference: endpoint.remote})
    assert (after.rows, after.delivered, after.owed) == (DOCUMENTS + 1, DOCUMENTS + 1, 0)
    assert (after.lost, after.duplicated, after.partial) == (0, 0, 0)
    REPORT.record("sftp: host key changed between runs", after, {"host key changed": 1})


@pytest.mark.parametrize("endpoint", ["sftp"], indirect=True)
def test_a_full_remote_disk_fails_those_deliveries_only(
    store: Store, project: str, endpoint: Endpoint, tmp_path: Path
) -> None:
    folder = endpoint.remote.root  # type: ignore[attr-defined]
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0777", "tmpfs", str(folder)]
    mounted = subprocess.run(mount, capture_output=True, text=True, check=False)
    assert mounted.returncode == 0, f"the disk-full test mounts a small tmpfs: {mounted.stderr}"
    try:
        full = endpoint.save()
        local = f"local-destination/{_name()}"
        from patient_delivery.blocks.local import LocalDestination

        LocalDestination(root=tmp_path / "healthy").save(local.split("/")[1])
        ingest.subscribe(store, project, full)
        ingest.subscribe(store, project, local)
        first = deliver()
        per = first.destinations
        assert (per[local].delivered, per[local].failed) == (DOCUMENTS, 0)  # isolation
        assert per[full].failed > 0 and per[full].delivered + per[full].failed == DOCUMENTS
        # OpenSSH answers a full disk with SFTP's generic "Failure": the step is named, and the
        # usual causes, the full disk among them, without claiming to know which.
        assert any("the SFTP server refused" in reason and "a full disk" in reason
                   for reason in reasons(store, full)), reasons(store, full)  # fmt: skip
        subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)
        settle(store, "sftp: remote disk full (2 MB tmpfs), then grown",
               {full: endpoint.remote, local: FolderRemote(tmp_path / "healthy")},
               {"remote disk full": 1})  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("endpoint", ["sftp"], indirect=True)
def test_a_folder_that_is_not_writable_fails_clearly_and_is_not_retried(
    store: Store, project: str, endpoint: Endpoint
) -> None:
    folder = endpoint.remote.root  # type: ignore[attr-defined]
    folder.chmod(0o555)
    try:
        reference = endpoint.save()
        ingest.subscribe(store, project, reference)
        first = deliver()
        assert (first.delivered, first.failed) == (0, DOCUMENTS)
        found = reasons(store, reference)
        assert len(found) == 1, found
        [reason] = found
        assert "permission denied" in reason and reason.endswith("(not retried)")
    finally:
        folder.chmod(0o755)
    settle(store, "sftp: folder not writable, then fixed", {reference: endpoint.remote},
           {"folder not writable": 1})  # fmt: skip


def _first_patient(store: Store) -> str:
    with store.session() as session:
        return session.scalars(select(Delivery.patient_id).order_by(Delivery.id)).first() or ""


def _ccda(text: bytes) -> bytes:
    namespace = b'<ClinicalDocument xmlns="urn:hl7-org:v3">'
    return namespace + b"<title>" + text + b"</title></ClinicalDocument>"


def _resave_with_current_key(reference: str, sshd: SshServer) -> None:
    from patient_delivery.blocks.sftp import SftpDestination

    name = reference.split("/")[1]
    block = SftpDestination.load(name)
    block.host_keys = [sshd.host_key_line()]
    block.save(name, overwrite=True)


@pytest.mark.parametrize("endpoint", ["sftp"], indirect=True)
def test_a_50_mb_document_is_accepted_and_held_in_memory_about_once(
    store: Store, endpoint: Endpoint
) -> None:
    """The limit is 64 MB (documents.MAX_DOCUMENT_BYTES, in the README); below it a document
    is checked, stored and sent without being copied over and over."""
    import tracemalloc

    ingest.add_organization(store, "Acme", "acme")
    project = ingest.add_project(store, "acme", "Big", "big")
    patient = ingest.add_patient(store, project, "big-1")
    filler = b"<entry><text>" + b"A" * 1000 + b"</text></entry>"
    big = _ccda(b"big").replace(b"</ClinicalDocument>", filler * 50_000 + b"</ClinicalDocument>")
    assert 50_000_000 < len(big) < 52_000_000
    reference = endpoint.save()
    ingest.subscribe(store, project, reference)

    tracemalloc.start()
    try:
        ingest.put_document(store, patient, "ccda", big)
        _, ingest_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        summary = deliver()
        _, deliver_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (summary.delivered, summary.failed) == (1, 0)
    figures = check_invariant(store, {reference: endpoint.remote})
    assert (figures.delivered, figures.lost, figures.partial) == (1, 0, 0)
    print(f"\n50 MB document: peak {ingest_peak / len(big):.2f}x its size while stored, "
          f"{deliver_peak / len(big):.2f}x while delivered")  # fmt: skip
    # Traced: Python-level copies (lxml and the database driver copy in C, untraced).
    assert ingest_peak < 0.5 * len(big)  # no Python-level copy at all
    assert deliver_peak < 1.5 * len(big)  # the one copy read from the store


def _assumed(role_arn: str) -> int:
    """How many times moto's STS (in this process) has let the role be assumed: read from the
    server's own state, nothing mocked."""
    from moto.sts.models import sts_backends

    return sum(
        1
        for regions in sts_backends.values()
        for backend in regions.values()
        for assumed in backend.assumed_roles
        if assumed.role_arn == role_arn
    )


def test_a_role_session_shorter_than_the_run_is_renewed_and_the_run_goes_on(
    store: Store, project: str, moto: MotoServer
) -> None:
    bucket = _name()
    moto.client("s3").create_bucket(Bucket=bucket)
    role = moto.create_role(bucket, EXTERNAL_ID, ["s3:PutObject"], bucket)
    name = _name()
    # botocore renews credentials with less than 15 minutes left: a 900 s session (the
    # shortest STS grants) is always in that window, as a long run's session is at its end.
    s3_block(moto, bucket, role, session_duration_seconds=900, max_connections=2).save(name)
    reference = f"s3-destination/{name}"
    ingest.subscribe(store, project, reference)
    first = deliver(batch_size=5)
    assert (first.delivered, first.failed) == (DOCUMENTS, 0)
    renewals = _assumed(role) - 1
    # Renewed again and again during the run (a thread that finds another renewing uses the
    # still-valid credentials, so not on quite every request), and no write was lost.
    assert renewals > DOCUMENTS // 2
    settle(store, "s3 (moto): role session expiring throughout the run",
           {reference: BucketRemote(moto.client("s3"), bucket)},
           {"role session expired and renewed": renewals})  # fmt: skip
