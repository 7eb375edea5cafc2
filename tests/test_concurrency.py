"""Runs at the same time, in separate processes, over the same work: each document once.

On SQLite and on PostgreSQL (`both_stores`): claims made at the same moment never overlap; whole
delivery runs started together split the backlog and deliver every document exactly once, also
when one of them is SIGKILLed holding claims (its lease runs out and the others take over).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path

import pytest
from sqlalchemy import func, select

from loopback.servers import SshServer
from patient_delivery import ingest, ledger
from patient_delivery.flows.deliver import deliver
from patient_delivery.flows.runtime import LOCAL_CLUSTER, task_runner
from patient_delivery.seed import seed_project
from patient_delivery.store import Store, open_store
from patient_delivery.store.models import Delivery, Disclosure, DocumentVersion
from tests.faults import check_invariant, sigkill_once_files_arrive
from tests.test_deliver_flow import save_local
from tests.test_local_destination import FolderRemote
from tests.test_sftp_destination import sftp_block

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.both_stores]

ROOT = Path(__file__).resolve().parent.parent


def _claim_until_empty(
    url: str,
    claimant: str,
    ready: multiprocessing.queues.Queue,
    start: multiprocessing.synchronize.Event,
) -> None:
    """A process that claims small pages as fast as it can, once all of them are ready."""
    store = open_store(url)
    ledger.count_owed(store, claimant)  # connected and warm
    ready.put(claimant)
    start.wait()
    mine: set[int] = set()
    while True:
        claimed = {i for ids in ledger.claim(store, claimant, limit=7).values() for i in ids}
        if claimed == mine:
            break
        mine = claimed


@pytest.fixture
def project(store: Store) -> str:
    ingest.add_organization(store, "Acme", "acme")
    return ingest.add_project(store, "acme", "Study", "study")


def test_claims_made_at_the_same_moment_by_four_processes_never_overlap(
    store: Store, project: str, tmp_path: Path
) -> None:
    for name in ("a", "b", "c"):
        ingest.subscribe(store, project, save_local(tmp_path / name))
    seed_project(store, project, 100, size_scale=0.02)  # 100 patients x 2 documents x 3 = 600
    url = str(store.engine.url.render_as_string(hide_password=False))
    context = multiprocessing.get_context("spawn")
    ready, start = context.Queue(), context.Event()
    claimants = [f"claimer-{i}" for i in range(4)]
    processes = [
        context.Process(target=_claim_until_empty, args=(url, claimant, ready, start))
        for claimant in claimants
    ]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=60)
    start.set()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    with store.session() as session:
        held = dict(
            session.execute(
                select(Delivery.claimed_by, func.count()).group_by(Delivery.claimed_by)
            ).all()
        )
    # Every delivery is held by exactly one claimant (a row has one claimed_by), none is left
    # unclaimed, and the work was shared: more than one process got some.
    assert sum(held.get(c, 0) for c in claimants) == 600 and None not in held
    assert sum(1 for c in claimants if held.get(c)) >= 2, held


# `patient-delivery deliver ...` once the file named first exists. The process imports
# everything first and says so with a `.ready.PID` file beside it, so runs started together
# begin claiming within milliseconds of each other: a run is faster than Python's start, and
# without this the first started could finish the backlog before the others had started.
AFTER_START_SIGNAL = """
import os, pathlib, sys, time
from patient_delivery.cli import main
import patient_delivery.flows.deliver
signal = pathlib.Path(sys.argv[1])
signal.with_name(f"{signal.name}.ready.{os.getpid()}").touch()
while not signal.exists():
    time.sleep(0.005)
sys.argv = ["patient-delivery", *sys.argv[2:]]
main()
"""


def _deliver(env: dict[str, str], signal: Path, *options: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", AFTER_START_SIGNAL, str(signal), "deliver", "--batch-size", "5",
         "--page-size", "20", *options],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip


@contextmanager
def ledger_writes_held(store: Store) -> Iterator[None]:
    """Hold the ledger's write lock: runs read, and wait at their first claim until it ends."""
    with store.engine.connect() as connection:
        if store.engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("LOCK TABLE deliveries IN SHARE ROW EXCLUSIVE MODE")
        try:
            yield
        finally:
            connection.rollback()


def wait_for_runs_in_gather(count: int, since: float, timeout: float = 25) -> list[str]:
    """The IDs of `count` flow runs started after `since` whose `gather` task is running (it
    claims first thing); fails the test after `timeout` seconds, within the store's busy
    timeout, so that runs waiting for a claim are not refused."""
    from datetime import datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterStartTime,
        TaskRunFilter,
        TaskRunFilterName,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )  # fmt: skip
    from prefect.client.schemas.objects import StateType

    started = FlowRunFilter(start_time=FlowRunFilterStartTime(
        after_=datetime.fromtimestamp(since, UTC)))  # fmt: skip
    gathering = TaskRunFilter(
        name=TaskRunFilterName(like_="gather"),
        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING])),
    )
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=started, task_run_filter=gathering)
            waiting = sorted({str(run.flow_run_id) for run in runs})
            if len(waiting) >= count or time.monotonic() > deadline:
                assert len(waiting) >= count, f"runs waiting to claim: {waiting}"
                return waiting
            time.sleep(0.1)


def test_overlapping_runs_in_processes_deliver_each_document_once_and_take_over_a_killed_one(
    store: Store, project: str, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    root = tmp_path / "org-folder"
    reference = save_local(root)
    ingest.subscribe(store, project, reference)
    seed_project(store, project, 300, size_scale=0.2)  # 600 documents
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PATIENT_DELIVERY_STORE_URL": store.engine.url.render_as_string(hide_password=False),
        "PATIENT_DELIVERY_LEASE_SECONDS": "5",
    }

    def held() -> int:
        with store.session() as session:
            return int(session.scalar(
                select(func.count()).where(Delivery.status == "pending")) or 0)  # fmt: skip

    go = tmp_path / "go"
    go.touch()
    sigkill_once_files_arrive(_deliver(env, go), root, 30, holding=lambda: held() > 0)
    killed = time.time()
    with store.session() as session:
        rendered = dict(session.execute(select(Delivery.id, Delivery.path).where(
            Delivery.path.is_not(None))).all())  # fmt: skip
    assert held(), "the killed run held no claims: it was not killed mid-run"
    time.sleep(5)  # its leases run out

    together = tmp_path / "together"
    runners = [_deliver(env, together) for _ in range(3)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("together.ready.*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    with ledger_writes_held(store):  # all three start, and wait at their first claim
        together.touch()
        wait_for_runs_in_gather(3, since=killed)
    for runner in runners:
        _, stderr = runner.communicate(timeout=300)
        assert runner.returncode == 0, stderr.decode()[-3000:]

    figures = check_invariant(store, {reference: FolderRemote(root)})
    assert (figures.rows, figures.delivered, figures.owed) == (600, 600, 0), figures
    assert (figures.lost, figures.duplicated, figures.partial, figures.leftovers) == (0, 0, 0, 0)
    with store.session() as session:
        paths = dict(session.execute(select(Delivery.id, Delivery.path)).all())
        runs = dict(session.execute(
            select(Disclosure.flow_run_id, func.count()).group_by(Disclosure.flow_run_id)
        ).all())  # fmt: skip
    assert all(paths[i] == path for i, path in rendered.items())  # taken over at the same paths
    print(f"\ndeliveries per run (the first was killed): {sorted(runs.values(), reverse=True)}")
    assert len(runs) >= 3, runs  # the killed run and at least two of the three at once


def test_a_delivery_on_a_local_dask_cluster_arrives_byte_identical(
    store: Store, project: str, sshd: SshServer
) -> None:
    """Upload batches run in Dask worker processes, which open their own SFTP sessions, on a
    cluster set up as `--dask local` sets it up (TLS with a certificate made for it)."""
    from prefect_dask import DaskTaskRunner

    folder = sshd.make_folder(f"dask-{uuid.uuid4().hex[:8]}")
    name = f"dask-{uuid.uuid4().hex[:8]}"
    sftp_block(sshd, folder, max_connections=4).save(name)
    reference = f"sftp-destination/{name}"
    ingest.subscribe(store, project, reference)
    seed_project(store, project, 60, size_scale=0.2)  # 120 documents
    cluster = {**LOCAL_CLUSTER, "n_workers": 2, "threads_per_worker": 4}

    summary = deliver(DaskTaskRunner(cluster_kwargs=cluster), batch_size=10)

    assert (summary.delivered, summary.failed) == (120, 0)
    assert summary.workers and f"{socket.gethostname()}:{os.getpid()}" not in summary.workers
    print(f"\ndocuments per Dask worker process: {dict(summary.workers)}")
    with store.session() as session:
        expected = dict(session.execute(
            select(Delivery.path, DocumentVersion.sha256)
            .join(DocumentVersion, DocumentVersion.id == Delivery.version_id)
        ).all())  # fmt: skip
    arrived = {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in folder.rglob("*") if path.is_file() and "_manifests" not in path.parts
    }  # fmt: skip
    assert arrived == expected  # every stored version, byte-identical, and nothing else


def dask_identity(address: str) -> str:
    """Connect to a Dask scheduler as a stranger would (no certificate of the cluster's) and
    ask who it is: what it answered, or the name of the error that stopped the attempt."""
    import asyncio

    from distributed.comm import connect

    async def ask() -> str:
        plain = address.replace("tls://", "tcp://")  # a stranger without the certificate
        comm = await connect(plain, timeout=5)
        try:
            await comm.write({"op": "identity"})
            answer = await comm.read()
        finally:
            await comm.close()
        return str(answer.get("type", answer)) if isinstance(answer, dict) else str(answer)

    try:
        return asyncio.run(asyncio.wait_for(ask(), 10))
    except Exception as refused:
        return f"refused: {type(refused).__name__}"


@pytest.mark.security
def test_another_local_user_cannot_join_the_local_dask_cluster() -> None:
    """`--dask local`: the scheduler refuses a connection without the cluster's certificate,
    so user nobody cannot submit work (which would run as us, with our store and Prefect)."""
    from distributed import LocalCluster

    from tests.test_private import as_nobody

    runner = task_runner("local")
    with LocalCluster(**{**runner.cluster_kwargs, "n_workers": 1}) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        answer = as_nobody(lambda: dask_identity(address))
    assert answer.startswith("refused: "), f"the scheduler answered a stranger: {answer}"
