"""Past one process: the same backlog delivered by one process, a Dask cluster, and Prefect workers.

    uv run --group dev python bench/scale.py  # 400 patients (800 documents) per setup
    uv run --group dev python bench/scale.py --patients 1000 --workers 2 --runs 4
    uv run --group dev python bench/scale.py --setups workers --workers 3 --runs 9 \
        --max-connections 40  # a PostgreSQL with few connections, shared with Prefect

Starts on loopback, the way the tests do: PostgreSQL (for the store and for Prefect's own
database), `prefect server start` on it, and OpenSSH sshd as the destination. Each setup gets
its own project with the same synthetic patients and its own SFTP folder, then:

1. `process`: one `deliver_updates` run in one process (threads), the baseline;
2. `dask-N`: one run whose upload batches go to a local Dask cluster of N worker processes;
3. `workers-W`: a deployment on a process work pool served by W `prefect worker` processes,
   and R flow runs created at once over the same backlog (they claim it a page at a time).

Prints documents/s per setup with the ratio to the first, the most connections PostgreSQL held
during each, the files that landed, and for the workers setup which worker ran which flow runs
and how many documents each delivered. Needs root (sshd's test user,
PostgreSQL run as `postgres`) and Debian's `openssh-server` and `postgresql` packages.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def child(setup: str, project: str, dask_workers: int) -> None:
    """One delivery run in this (child) process; prints its seconds and documents."""
    from patient_delivery.flows.deliver import deliver
    from patient_delivery.flows.runtime import task_runner

    runner = task_runner()
    if setup == "dask":
        from distributed import LocalCluster

        # An existing cluster, as in production: its start-up is not part of the run.
        cluster = LocalCluster(n_workers=dask_workers, threads_per_worker=8, processes=True,
                               host="127.0.0.1", dashboard_address=None)  # fmt: skip
        runner = task_runner(cluster.scheduler_address)
    started = time.perf_counter()
    summary = deliver(runner, project=project, batch_size=50)
    seconds = time.perf_counter() - started
    if summary.failed:
        raise SystemExit(f"{summary.failed} deliveries failed: {summary.rows()}")
    print(f"RESULT {seconds:.3f} {summary.delivered} {len(summary.workers)}")


def run_child(env: dict[str, str], setup: str, project: str, dask_workers: int = 0) -> tuple:
    done = subprocess.run(
        [sys.executable, __file__, "--child", setup, project, str(dask_workers)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    match = re.search(r"RESULT (\S+) (\d+) (\d+)", done.stdout)
    if done.returncode != 0 or not match:
        raise SystemExit(f"{setup} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return float(match.group(1)), int(match.group(2)), int(match.group(3))


def workers_setup(env: dict[str, str], project: str, workers: int, runs: int, logs: Path):
    """Deploy, start `workers` process workers, create `runs` flow runs at once; time them."""
    import httpx
    from prefect.deployments import run_deployment

    from patient_delivery.flows.deliver import deliver_updates

    subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "bench",
                    "--type", "process"], env=env, check=True, capture_output=True)  # fmt: skip
    deliver_updates.from_source(source=str(ROOT), entrypoint="flows/deliver.py:deliver_updates") \
        .deploy(name="bench", work_pool_name="bench", print_next_steps=False)  # fmt: skip
    started_workers = []
    for number in range(workers):
        log = (logs / f"worker-{number}.log").open("wb")
        started_workers.append((subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "bench",
             "--name", f"worker-{number}", "--limit", str(-(-runs // workers))],
            env={**env, "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_WORKER_QUERY_SECONDS": "1",
                 "PREFECT_WORKER_PREFETCH_SECONDS": "0"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))  # fmt: skip
    try:
        time.sleep(5)  # the workers are polling
        started = time.perf_counter()
        ids = [
            str(run_deployment("deliver-updates/bench", timeout=0,
                               parameters={"project": project, "page_size": 100,
                                           "batch_size": 50}).id)
            for _ in range(runs)
        ]  # fmt: skip
        api = env["PREFECT_API_URL"]
        refused = 0  # Prefect's own answers of 5xx while the runs went
        while True:
            answers = [httpx.get(f"{api}/flow_runs/{i}") for i in ids]
            refused += sum(answer.status_code >= 500 for answer in answers)
            states = [a.json()["state"]["type"] if a.status_code == 200 else "?" for a in answers]
            if all(s in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in states):
                break
            time.sleep(0.2)
        if refused:
            print(f"Prefect's API answered {refused} status polls with 5xx", file=sys.stderr)
        seconds = time.perf_counter() - started
    finally:
        for process, log in started_workers:  # with the runs they started
            os.killpg(process.pid, 15)
            process.wait()
            log.close()
    if any(s != "COMPLETED" for s in states):
        raise SystemExit(f"flow runs ended {states}; see {logs}")
    by_worker = {}
    for number in range(workers):  # what it submitted, less what another worker had taken
        text = (logs / f"worker-{number}.log").read_text()
        taken = set(re.findall(r"submitting flow run '([0-9a-f-]{36})'", text))
        taken -= set(re.findall(r"Aborted submission of flow run '([0-9a-f-]{36})'", text))
        by_worker[f"worker-{number}"] = [i for i in ids if i in taken]
    return seconds, ids, by_worker


def missing_block_after(env: dict[str, str], store: Any, project: str,
                        by_worker: dict[str, list[str]], sshd: Any) -> None:  # fmt: skip
    """After runs over a backlog whose second destination's block is missing: how many pages
    the runs claimed, how the missing block's deliveries wait; then the block saved again and
    one run to deliver them."""
    import httpx
    from sqlalchemy import func, select

    from loopback.servers import SFTP_PASSWORD, SFTP_USER
    from patient_delivery.blocks.sftp import SftpDestination
    from patient_delivery.store.models import Delivery

    ids = [i for runs in by_worker.values() for i in runs]
    pages = httpx.post(f"{env['PREFECT_API_URL']}/task_runs/count", json={
        "flow_runs": {"id": {"any_": ids}}, "task_runs": {"name": {"like_": "gather"}},
    }).json()  # fmt: skip
    with store.session() as session:
        waiting = session.execute(
            select(Delivery.status, func.count(), func.max(Delivery.attempts))
            .where(Delivery.destination == "sftp-destination/missing")
            .group_by(Delivery.status)
        ).all()  # fmt: skip
    print(
        f"missing block: {len(ids)} runs claimed {pages} pages (gather task runs); its "
        f"deliveries (status, count, most attempts): {[tuple(row) for row in waiting]}"
    )
    folder = sshd.home / "missing"
    SftpDestination(host="127.0.0.1", port=sshd.port, username=SFTP_USER,
                    password=SFTP_PASSWORD, root=str(folder), host_keys=[sshd.host_key_line()],
                    max_connections=8).save("missing")  # fmt: skip
    seconds, sent, _ = run_child(env, "process", project)
    landed = sum(1 for path in folder.rglob("*") if path.is_file())
    print(
        f"missing block saved: one run delivered {sent} in {seconds:.1f} s; {landed} files "
        "in its folder (documents and the manifest)"
    )


class Peak:
    """The most client connections PostgreSQL held, sampled every 0.1 s; `take` reads and resets."""

    def __init__(self, postgres: Any) -> None:
        import threading

        import psycopg

        self._connection = psycopg.connect(postgres.dsn("postgres"), autocommit=True)
        self._most = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        query = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        while not self._done.wait(0.1):
            count = self._connection.execute(query).fetchone()[0]  # type: ignore[index]
            self._most = max(self._most, count - 1)  # not this one

    def take(self) -> int:
        most, self._most = self._most, 0
        return most

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self._connection.close()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=400)
    parser.add_argument("--dask-workers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument(
        "--setups", default="process,dask,workers", help="which of process, dask, workers"
    )
    parser.add_argument(
        "--max-connections", type=int, default=300,
        help="PostgreSQL's max_connections (the store and Prefect's database share it)",
    )  # fmt: skip
    parser.add_argument(
        "--missing-block", action="store_true",
        help="workers: the project also delivers to a destination whose block was deleted",
    )  # fmt: skip
    parser.add_argument(
        "--store-role-limit", type=int, default=None,
        help="the store's own role with this CONNECTION LIMIT, so Prefect keeps the rest",
    )  # fmt: skip
    args = parser.parse_args()
    chosen = set(args.setups.split(","))

    from loopback.servers import SFTP_PASSWORD, SFTP_USER, PostgresServer, PrefectServer, SshServer

    logs = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    postgres = PostgresServer(max_connections=args.max_connections)
    sshd = SshServer()
    prefect_db = postgres.database("prefect").replace("+psycopg", "+asyncpg")
    server = PrefectServer(database_url=prefect_db)
    try:
        store_url = postgres.database("store", connection_limit=args.store_role_limit)
        env = {**server.client_env(), "PATIENT_DELIVERY_STORE_URL": store_url,
               "PATIENT_DELIVERY_EMIT_EVENTS": "false",
               "PATIENT_DELIVERY_CHECKOUT": str(ROOT)}  # fmt: skip
        os.environ.update(env)  # before Prefect is imported: it reads its settings once
        from sqlalchemy import func, select

        from patient_delivery import ingest
        from patient_delivery.blocks.sftp import SftpDestination
        from patient_delivery.seed import seed_project
        from patient_delivery.store import open_store
        from patient_delivery.store.models import Disclosure

        store = open_store(store_url)
        ingest.add_organization(store, "Bench", "bench")
        setups = {"process": "process", "dask": f"dask-{args.dask_workers}",
                  "workers": f"workers-{args.workers}"}  # fmt: skip

        def key_of(setup: str) -> str:
            return next(key for key, name in setups.items() if name == setup)

        for setup in (name for key, name in setups.items() if key in chosen):
            project = ingest.add_project(store, "bench", setup, setup.replace("-", ""))
            folder = sshd.make_folder(setup)
            SftpDestination(host="127.0.0.1", port=sshd.port, username=SFTP_USER,
                            password=SFTP_PASSWORD, host_keys=[sshd.host_key_line()],
                            root=str(folder), max_connections=8).save(setup)  # fmt: skip
            ingest.subscribe(store, project, f"sftp-destination/{setup}")
            if key_of(setup) == "workers" and args.missing_block:
                missing = sshd.make_folder("missing")
                block = SftpDestination(
                    host="127.0.0.1",
                    port=sshd.port,
                    username=SFTP_USER,
                    password=SFTP_PASSWORD,
                    root=str(missing),
                    host_keys=[sshd.host_key_line()],
                    max_connections=8,
                )
                block.save("missing")
                ingest.subscribe(store, project, "sftp-destination/missing")
                SftpDestination.delete("missing")  # as an operator who removed it
            print(f"seeding {args.patients} patients for {setup} ...", file=sys.stderr)
            seed_project(store, project, args.patients)

        rows = []
        peak = Peak(postgres)
        if "process" in chosen:
            seconds, sent, _ = run_child(env, "process", "process")
            rows.append(("1 process, 32 threads", sent, seconds, 1, peak.take()))
        if "dask" in chosen:
            seconds, sent, used = run_child(
                env, "dask", f"dask{args.dask_workers}", args.dask_workers
            )
            rows.append((f"1 run on Dask, {args.dask_workers} worker processes", sent, seconds,
                         used, peak.take()))  # fmt: skip
        by_worker: dict[str, list[str]] = {}
        per_run: dict[str, int] = {}
        if "workers" in chosen:
            seconds, _, by_worker = workers_setup(
                env, f"workers{args.workers}", args.workers, args.runs, logs
            )
            with store.session() as session:
                per_run = dict(session.execute(
                    select(Disclosure.flow_run_id, func.count())
                    .where(Disclosure.project_id == f"workers{args.workers}")
                    .group_by(Disclosure.flow_run_id)
                ).all())  # fmt: skip
            sent = sum(per_run.values())
            rows.append((f"{args.runs} runs on {args.workers} Prefect workers", sent, seconds,
                         args.workers, peak.take()))  # fmt: skip
            if args.missing_block:
                missing_block_after(env, store, f"workers{args.workers}", by_worker, sshd)
        peak.stop()
        base = rows[0][1] / rows[0][2]
        print(f"\nPostgreSQL max_connections = {args.max_connections} (store and Prefect), "
              f"the store's role limited to {args.store_role_limit or 'none'}")  # fmt: skip
        print("| setup | documents | seconds | documents/s | processes | peak connections "
              "| vs first row |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, count, secs, processes, most in rows:
            rate = count / secs
            print(f"| {name} | {count} | {secs:.1f} | {rate:.0f} | {processes} | {most} | "
                  f"{rate / base:.2f}x |")  # fmt: skip
        for setup in (name for key, name in setups.items() if key in chosen):
            landed = sum(1 for path in (sshd.home / setup).rglob("*") if path.is_file())
            print(f"{setup}: {landed} files in its folder of {args.patients * 2} documents")
        if by_worker:
            print("\nflow runs per Prefect worker (documents delivered by each run):")
            for worker, runs in by_worker.items():
                counts = [per_run.get(i, 0) for i in runs]
                print(f"  {worker}: {len(runs)} runs, {sum(counts)} documents {counts}")
            spread = Counter({w: sum(per_run.get(i, 0) for i in r) for w, r in by_worker.items()})
            print(f"  total {sum(spread.values())} of {args.patients * 2}")
    finally:
        server.stop()
        sshd.stop()
        postgres.stop()


if __name__ == "__main__":
    main()
