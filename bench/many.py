"""Many destinations in one run: what a run costs as the number of organizations grows.

    uv run --group dev python bench/many.py  # N = 1, 10, 100, 1000; 2 documents each
    uv run --group dev python bench/many.py --sizes 1,10,100 --documents 4

    uv run --group dev python bench/many.py --remote 0.05  # 5% SFTP and 5% S3 destinations

For each N: a fresh SQLite store with N organizations, each with one project, its own destination
and K documents (K/2 synthetic patients, a C-CDA document and a FHIR bundle each). Most
destinations are local folders; a share of them (`--remote`, each) are SFTP folders on a
loopback OpenSSH and S3 buckets on a loopback moto (STS and S3, a role assumed per destination).
Then one delivery run of everything, in a child process of its own, against a real `prefect
server start` on loopback. Next to it, the same number of documents to one local destination.
Prints documents per second, the run's task runs and Prefect API calls, and peak RSS, with each
row's rate as a share of the one-destination rate.
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

    from patient_delivery.flows.deliver import deliver

    started = time.perf_counter()
    summary = deliver()
    seconds = time.perf_counter() - started
    if os.environ.get("BENCH_TIMELINE"):  # its task runs' start and end, on stderr
        from delivery import timeline  # bench/delivery.py, beside this script

        timeline(summary.flow_run_id, started)
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


class Remotes:
    """The loopback SFTP and S3 servers that a share of the organizations deliver to."""

    def __init__(self) -> None:
        from loopback.servers import MotoServer, SshServer

        self.sshd = SshServer()
        self.moto = MotoServer()
        self.bucket = "bench-many"
        self.moto.client("s3").create_bucket(Bucket=self.bucket)
        self.role = self.moto.create_role("bench-many", "bench-many-id", ["s3:PutObject"],
                                          self.bucket)  # fmt: skip

    def sftp(self, org: str) -> tuple[str, object]:
        from loopback.servers import SFTP_PASSWORD, SFTP_USER
        from patient_delivery.blocks.sftp import SftpDestination

        block = SftpDestination(
            host="127.0.0.1", port=self.sshd.port, username=SFTP_USER, password=SFTP_PASSWORD,
            host_keys=[self.sshd.host_key_line()], root=str(self.sshd.make_folder(org)),
            max_connections=4,
        )  # fmt: skip
        return "sftp-destination", block

    def s3(self, org: str) -> tuple[str, object]:
        from prefect_aws import AwsCredentials

        from patient_delivery.blocks.s3 import S3Destination

        keys = self.moto.deliverer_keys
        block = S3Destination(
            bucket_name=self.bucket, role_arn=self.role, external_id="bench-many-id",
            endpoint_url=self.moto.url, sts_endpoint_url=self.moto.url,
            aws_credentials=AwsCredentials(aws_access_key_id=keys[0],
                                           aws_secret_access_key=keys[1]),
            server_side_encryption=None, max_connections=4,
        )  # fmt: skip
        return "s3-destination", block

    def stop(self) -> None:
        self.moto.stop()
        self.sshd.stop()


def prepare(
    work: Path, organizations: int, patients: int, tag: str, remote: int = 0,
    remotes: Remotes | None = None,
) -> str:  # fmt: skip
    """A store with `organizations` organizations, each with its own destination (`remote` of
    them SFTP, and as many S3); its URL."""
    from patient_delivery import ingest
    from patient_delivery.blocks.local import LocalDestination
    from patient_delivery.seed import seed_project
    from patient_delivery.store import close_stores, open_store

    url = f"sqlite:///{work / 'store.db'}"
    store = open_store(url)
    for number in range(organizations):
        org = f"{tag}-{number}"
        ingest.add_organization(store, org, org)
        project = ingest.add_project(store, org, "Study", f"{org}-study")
        kind, block = "local-destination", LocalDestination(root=work / "out" / org,
                                                             max_connections=4)  # fmt: skip
        if remotes is not None and number < 2 * remote:
            kind, block = remotes.sftp(org) if number % 2 else remotes.s3(org)
        block.save(org, overwrite=True)  # type: ignore[attr-defined]
        ingest.subscribe(store, project, f"{kind}/{org}")
        seed_project(store, project, patients, size_scale=0.02, seed=number)
    close_stores()
    return url


def run(url: str, env: dict[str, str], profile: Path | None = None) -> dict:
    """One delivery run in a child process; with `profile`, under py-spy (where the process's
    Python time goes, as collapsed stacks in that file)."""
    command = [sys.executable, __file__, "_child"]
    if profile is not None:
        profile.parent.mkdir(parents=True, exist_ok=True)
        command = ["py-spy", "record", "--gil", "--nonblocking", "--format", "raw", "-r", "1000",
                   "-o", str(profile), "--", *command]  # fmt: skip
    done = subprocess.run(
        command, env={**env, "PATIENT_DELIVERY_STORE_URL": url},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the delivery run failed: {done.stderr[-3000:]}")
    if os.environ.get("BENCH_TIMELINE"):
        sys.stderr.write(done.stderr)
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
    parser.add_argument(
        "--remote",
        type=float,
        default=0.02,
        help="share of destinations that are SFTP, and as many S3 (default 0.02)",
    )
    parser.add_argument("--profile", type=Path, help="folder for py-spy profiles, one per run")
    args = parser.parse_args()

    from loopback.servers import PrefectServer

    server = PrefectServer()
    env = {**os.environ, **server.client_env(), "MALLOC_ARENA_MAX": "2"}
    os.environ.update(server.client_env())
    patients = max(1, args.documents // 2)
    rows = []
    remotes = Remotes() if args.remote > 0 else None
    try:
        for n in (int(size) for size in args.sizes.split(",")):
            results = {}
            remote = int(n * args.remote)
            for kind, organizations, each in (("one", 1, patients * n), ("many", n, patients)):
                work = Path(tempfile.mkdtemp(prefix=f"bench-many-{kind}-"))
                print(
                    f"N={n} {kind}: preparing {organizations} destination(s) ...", file=sys.stderr
                )
                tag = f"{kind}{n}-{uuid.uuid4().hex[:6]}"
                if kind == "many":
                    url = prepare(work, organizations, each, tag, remote, remotes)
                else:
                    url = prepare(work, organizations, each, tag)
                profile = args.profile / f"{kind}-{n}.txt" if args.profile else None
                results[kind] = run(url, env, profile)
                results[kind]["remote"] = 2 * remote if kind == "many" else 0
                shutil.rmtree(work, ignore_errors=True)
            rows.append((n, results["one"], results["many"]))
    finally:
        server.stop()
        if remotes is not None:
            remotes.stop()
    print(
        "\n| destinations (SFTP + S3) | documents | seconds | documents/s | vs one destination "
        "| task runs "
        "| API calls | peak RSS MB | one destination: seconds, documents/s, task runs, "
        "API calls |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, one, many in rows:
        rate, base = many["delivered"] / many["seconds"], one["delivered"] / one["seconds"]
        print(
            f"| {n} ({many['remote']}) | {many['delivered']} | {many['seconds']:.1f} | {rate:.0f} "
            f"| {rate / base:.2f}x | {many['task_runs']} | {many['api_calls']} "
            f"| {many['rss_mb']:.0f} | {one['seconds']:.1f}, {base:.0f}, {one['task_runs']}, "
            f"{one['api_calls']} |"
        )


if __name__ == "__main__":
    main()
