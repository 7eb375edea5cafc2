"""Many destinations in one run: what a run costs as the number of organizations grows.

    uv run python bench/many.py                          # N = 1, 10, 100, 1000; 2 documents each
    uv run python bench/many.py --sizes 1,10,100 --documents 4

For each N: a fresh SQLite store with N organizations, each with one project, its own local-folder
destination and K documents (K/2 synthetic patients, a C-CDA document and a FHIR bundle each);
then one delivery run of everything, in a child process of its own, against a real `prefect
server start` on loopback. Next to it, the same number of documents to one destination. Prints
documents per second, the run's task runs and Prefect API calls, and peak RSS, with each row's
rate as a share of the one-destination rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def child() -> None:
    """One delivery run of everything owed; prints what it did as JSON (the last line)."""
    import httpx

    calls = 0
    for client in (httpx.Client, httpx.AsyncClient):
        original = client.send

        def counted(self, *args, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            return _original(self, *args, **kwargs)

        client.send = counted  # type: ignore[method-assign]

    from flows.deliver import deliver

    started = time.perf_counter()
    summary = deliver()
    seconds = time.perf_counter() - started
    api_calls = calls
    tasks = task_runs(summary.flow_run_id)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "delivered": summary.delivered, "failed": summary.failed,
                      "task_runs": tasks, "api_calls": api_calls, "rss_mb": rss}))  # fmt: skip


def task_runs(flow_run_id: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)]))
        )
    return len(runs)


def prepare(work: Path, organizations: int, patients: int, tag: str) -> str:
    """A store with `organizations` organizations, each with its own destination; its URL."""
    from blocks.local import LocalDestination
    from patient_delivery import ingest
    from patient_delivery.seed import seed_project
    from patient_delivery.store import close_stores, open_store

    url = f"sqlite:///{work / 'store.db'}"
    store = open_store(url)
    for number in range(organizations):
        org = f"{tag}-{number}"
        ingest.add_organization(store, org, org)
        project = ingest.add_project(store, org, "Study", f"{org}-study")
        LocalDestination(root=work / "out" / org, max_connections=4).save(org, overwrite=True)
        ingest.subscribe(store, project, f"local-destination/{org}")
        seed_project(store, project, patients, size_scale=0.02, seed=number)
    close_stores()
    return url


def run(url: str, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "_child"], env={**env, "PATIENT_DELIVERY_STORE_URL": url},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the delivery run failed: {done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    if sys.argv[1:] == ["_child"]:
        child()
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sizes", default="1,10,100,1000", help="numbers of destinations")
    parser.add_argument("--documents", type=int, default=2, help="per destination (even)")
    args = parser.parse_args()

    from loopback.servers import PrefectServer

    server = PrefectServer()
    env = {**os.environ, **server.client_env(), "MALLOC_ARENA_MAX": "2"}
    os.environ.update(server.client_env())
    patients = max(1, args.documents // 2)
    rows = []
    try:
        for n in (int(size) for size in args.sizes.split(",")):
            results = {}
            for kind, organizations, each in (("one", 1, patients * n), ("many", n, patients)):
                work = Path(tempfile.mkdtemp(prefix=f"bench-many-{kind}-"))
                print(
                    f"N={n} {kind}: preparing {organizations} destination(s) ...", file=sys.stderr
                )
                url = prepare(work, organizations, each, f"{kind}{n}-{uuid.uuid4().hex[:6]}")
                results[kind] = run(url, env)
                shutil.rmtree(work, ignore_errors=True)
            rows.append((n, results["one"], results["many"]))
    finally:
        server.stop()
    print(
        "\n| destinations | documents | seconds | documents/s | vs one destination | task runs "
        "| API calls | peak RSS MB | one destination: seconds, documents/s, task runs, "
        "API calls |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, one, many in rows:
        rate, base = many["delivered"] / many["seconds"], one["delivered"] / one["seconds"]
        print(
            f"| {n} | {many['delivered']} | {many['seconds']:.1f} | {rate:.0f} "
            f"| {rate / base:.2f}x | {many['task_runs']} | {many['api_calls']} "
            f"| {many['rss_mb']:.0f} | {one['seconds']:.1f}, {base:.0f}, {one['task_runs']}, "
            f"{one['api_calls']} |"
        )


if __name__ == "__main__":
    main()
