"""Delivery throughput: the Prefect flow against bare clients and rclone, same servers, one run.

    uv run --group dev python bench/delivery.py  # 1,000 patients = 2,000 documents, ~300 MB
    uv run --group dev python bench/delivery.py --patients 200 --only sftp,sftp-v3
    uv run --group dev python bench/delivery.py gather --store-patients 1000000 --changed 1000
    uv run --group dev python bench/delivery.py memory --sizes 1000,10000,100000
        # peak RSS as N grows

Starts OpenSSH sshd, SeaweedFS (S3) and moto (STS) on loopback the way the tests do, and a real
`prefect server start`. Seeds synthetic patients with the project's own generator, exports the
same bytes to a folder for the baselines, then times each mode in its own process (so peak RSS
is that mode's alone): the delivery flow (gather, render, upload, record, with Prefect), a bare
client baseline, and `rclone copy --transfers 16`. Every row runs `--rounds` times (3), each
round to fresh folders and in the opposite order to the last, so the machine's drift spreads
over every row. Prints one table: each row's median, and its ratio to the same round's rclone
(median and range).
Needs root (sshd's test user) and Debian's `rclone` and `openssh-server` packages.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


# --- modes, each run in a child process -----------------------------------------------------


class Meter:
    """Wall seconds, this process's CPU seconds (all threads) and the machine's busy CPU
    seconds from now to `read()`: the transfer alone, imports and connections' setup excluded
    where the mode allows."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.cpu = time.process_time()
        self.busy = machine_busy_seconds()

    def read(self) -> dict[str, float]:
        return {
            "seconds": time.perf_counter() - self.started,
            "cpu": time.process_time() - self.cpu,
            "machine_cpu": machine_busy_seconds() - self.busy,
        }


def child(mode: str, config: dict) -> dict:
    """Run one mode; returns what it moved and how long the transfer took (imports excluded)."""
    export = Path(config["export"])
    files = sorted(p for p in export.rglob("*") if p.is_file())
    if mode == "flow":
        from patient_delivery.flows.deliver import deliver
        from patient_delivery.flows.runtime import task_runner

        runner = task_runner(config["dask"]) if config.get("dask") else None
        meter = Meter()
        summary = deliver(runner, destination=[config["destination"]], batch_size=config["batch"])
        moved = sum(r.bytes for r in summary.destinations.values())
        if summary.failed:
            raise SystemExit(f"{summary.failed} deliveries failed: {summary.rows()}")
        result = {**meter.read(), "files": summary.delivered, "bytes": moved}
        if os.environ.get("BENCH_TIMELINE"):
            timeline(summary.flow_run_id, meter.started)
        return result
    if mode == "bare-sftp":
        return bare_sftp(config, files, export)
    if mode == "bare-s3":
        return bare_s3(config, files, export)
    if mode == "bare-crt":
        return bare_crt(config, files, export)
    raise SystemExit(f"unknown mode {mode}")


def timeline(flow_run_id: str, started: float) -> None:
    """Where a flow run's time went, from Prefect's own records (BENCH_TIMELINE=1): its task
    runs' start and end, in seconds since the meter started, printed to stderr."""
    import uuid
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    zero = datetime.now(UTC).timestamp() - (time.perf_counter() - started)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(flow_run_id))
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
    rows = [("flow", run.start_time, run.end_time)] + [
        (t.name, t.start_time, t.end_time) for t in tasks
    ]
    for name, start, end in sorted(rows, key=lambda r: r[1].timestamp() if r[1] else 0):
        begin = start.timestamp() - zero if start else float("nan")
        finish = end.timestamp() - zero if end else float("nan")
        sys.stderr.write(f"{name:40s} {begin:7.3f} {finish:7.3f}\n")


def bare_sftp(config: dict, files: list[Path], export: Path) -> dict:
    """paramiko, TCP_NODELAY, 8 connections, plain put to the final name: the fastest bare path."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import paramiko

    def connection() -> paramiko.SFTPClient:
        sock = socket.create_connection(("127.0.0.1", config["sftp_port"]))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        transport.connect(username=config["sftp_user"], password=config["sftp_password"])
        return paramiko.SFTPClient.from_transport(transport)  # type: ignore[return-value]

    lanes = [files[i::8] for i in range(8)]
    root = config["sftp_root"]
    meter = Meter()

    def send(lane: list[Path]) -> int:
        sftp, made, sent = connection(), set(), 0
        for path in lane:
            relative = path.relative_to(export).as_posix()
            folder = f"{root}/{relative.rsplit('/', 1)[0]}"
            if folder not in made:
                with contextlib.suppress(OSError):
                    sftp.mkdir(folder)
                made.add(folder)
            sftp.putfo(path.open("rb"), f"{root}/{relative}", confirm=False)
            sent += path.stat().st_size
        sftp.close()
        return sent

    with ThreadPoolExecutor(8) as pool:
        moved = sum(pool.map(send, lanes))
    return {**meter.read(), "files": len(files), "bytes": moved}


def bare_s3(config: dict, files: list[Path], export: Path) -> dict:
    """boto3 put_object from 16 threads sharing one client."""
    from botocore.config import Config

    client = bench_s3_client(config, Config(max_pool_connections=16))
    bucket = config["bucket"]
    return put_from_threads(
        files,
        export,
        lambda key, body: client.put_object(Bucket=bucket, Key=config["prefix"] + key, Body=body),
    )


def bare_crt(config: dict, files: list[Path], export: Path) -> dict:
    """The flow's own S3 writer (awscrt) alone, from 16 threads: what the flow adds is the rest."""
    from botocore.credentials import Credentials

    from patient_delivery.blocks.s3.crt import CrtWriter

    writer = CrtWriter(
        client=bench_s3_client(config), bucket=config["bucket"],
        credentials=Credentials("bench", "bench"), explain=lambda error, step: error,
        max_connections=16, connect_timeout=10, read_timeout=60,
    )  # fmt: skip
    prefix = config["prefix"]
    return put_from_threads(files, export, lambda key, body: writer.put(prefix + key, body, {}))


def bench_s3_client(config: dict, botocore_config: Any = None) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=config["s3_url"], region_name="us-east-1",
        aws_access_key_id="bench", aws_secret_access_key="bench",  # noqa: S106 - accepts any
        config=botocore_config,
    )  # fmt: skip


def put_from_threads(files: list[Path], export: Path, put: Callable[[str, bytes], object]) -> dict:
    """Every file read and `put` at its relative path from 16 threads, timed from the first."""
    from concurrent.futures import ThreadPoolExecutor

    meter = Meter()

    def send(path: Path) -> int:
        body = path.read_bytes()
        put(path.relative_to(export).as_posix(), body)
        return len(body)

    with ThreadPoolExecutor(16) as pool:
        moved = sum(pool.map(send, files))
    return {**meter.read(), "files": len(files), "bytes": moved}


# --- the parent: servers, data, and the table -------------------------------------------------


def run_measured(command: list[str], env: dict[str, str]) -> tuple[bytes, dict[str, float]]:
    """Run a command; its stdout and what it cost: wall seconds, peak RSS (VmHWM, sampled every
    20 ms), its own CPU seconds, the whole machine's busy CPU seconds (servers included), and
    the CPU seconds of each process in `SERVERS` (as `NAME_cpu`).

    Not getrusage for RSS: a child forked from this large parent inherits its high-water mark.
    On 2 cores shared by client and servers, files/s is bounded by 2 / (CPU seconds per file):
    the CPU columns show who spends them.
    """
    started = time.perf_counter()
    busy = machine_busy_seconds()
    servers = servers_cpu()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        peak = 0.0
        status = Path(f"/proc/{process.pid}/status")
        while True:
            pid, code, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
            except OSError:
                pass
            time.sleep(0.02)
        process.returncode = os.waitstatus_to_exitcode(code)
        cost = {
            "seconds": time.perf_counter() - started,
            "rss_mb": peak,
            "cpu": usage.ru_utime + usage.ru_stime,
            "machine_cpu": machine_busy_seconds() - busy,
        }
        time.sleep(0.5)  # the servers finish what the command sent them (events, logs)
        cost.update({f"{k}_cpu": v - servers[k] for k, v in servers_cpu().items()})
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"{command[0]} failed: {err.read().decode()[-3000:]}")
        if os.environ.get("BENCH_VERBOSE"):
            sys.stderr.write(err.read().decode()[-5000:])
        return out.read(), cost


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its descendants, live ones and those already reaped (a
    server's per-connection children: sshd's sftp-server, uvicorn's workers)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                stats[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    tree, total = {pid}, 0
    for _ in range(8):  # a few levels deep is all servers use
        tree |= {child for child, (parent, _) in stats.items() if parent in tree}
    for member in tree:
        total += stats.get(member, (0, 0))[1]
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


SERVERS: dict[str, int] = {}
"""Process IDs of servers whose CPU each run also reports: Prefect's. (Not sshd's: an SFTP
session's sftp-server can outlive its parent and is then no longer sshd's descendant.)"""


def servers_cpu() -> dict[str, float]:
    return {name: tree_cpu_seconds(pid) for name, pid in SERVERS.items()}


def run_child(mode: str, config: dict, env: dict[str, str]) -> dict:
    """Run a mode in a child process; add its peak RSS. With --profile, under py-spy."""
    command = [sys.executable, __file__, "_child", mode, json.dumps(config)]
    if config.get("profile"):
        name = f"{mode}-{config.get('destination', 'bare').replace('/', '-')}.txt"
        target = Path(config["profile"]) / name
        target.parent.mkdir(parents=True, exist_ok=True)  # py-spy does not create it
        # --gil: where this process's Python time goes (threads waiting on I/O are not sampled)
        command = ["py-spy", "record", "--gil", "--nonblocking", "--format", "raw", "-r", "1000",
                   "-o", str(target), "--", *command]  # fmt: skip
    output, cost = run_measured(command, env)
    lines = [x for x in output.decode().splitlines() if x.startswith("{")]
    result = json.loads(lines[-1])
    # Seconds, own and machine CPU are the child's own, measured around its transfer alone.
    result.update({k: v for k, v in cost.items() if k not in ("seconds", "cpu", "machine_cpu")})
    return result


def run_rclone(source: Path, remote: str, env: dict[str, str]) -> dict:
    files = [p for p in source.rglob("*") if p.is_file()]
    env = {k: v for k, v in env.items() if k != "AWS_CA_BUNDLE"}  # breaks rclone 1.60's S3
    command = ["rclone", "copy", "--transfers", "16", "--no-check-dest", str(source), remote]
    _, cost = run_measured(command, env)
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files), **cost}


def parse_variants(text: str) -> list[tuple[int, int]]:
    """'8x1,2x4' -> [(8, 1), (2, 4)]: connections x files in flight, each once, in order."""
    pairs = (v.split("x") for v in text.split(",") if v)
    return list(dict.fromkeys((int(c), int(w)) for c, w in pairs))


def throughput(args: argparse.Namespace) -> None:
    from loopback.servers import PrefectServer

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    os.environ["PATIENT_DELIVERY_STORE_URL"] = f"sqlite:///{work / 'store.db'}"
    server = PrefectServer()
    os.environ.update(server.client_env())
    from loopback.servers import (
        SFTP_PASSWORD,
        SFTP_USER,
        MotoServer,
        SeaweedServer,
        SshServer,
        StrictV3SftpServer,
    )
    from patient_delivery import ingest
    from patient_delivery.blocks.s3 import S3Destination
    from patient_delivery.blocks.sftp import SftpDestination
    from patient_delivery.ledger import read_content
    from patient_delivery.seed import seed_project
    from patient_delivery.store import open_store
    from patient_delivery.store.models import DocumentVersion

    servers: list = []
    try:
        print(f"seeding {args.patients} patients ...", file=sys.stderr)
        store = open_store()
        ingest.add_organization(store, "Bench", "bench")
        ingest.add_project(store, "bench", "Bench", "bench")
        seed_project(store, "bench", args.patients, size_scale=args.size_scale)
        export = work / "export"
        with store.session() as session:
            versions = session.execute(
                __import__("sqlalchemy").select(
                    DocumentVersion.id, DocumentVersion.patient_id, DocumentVersion.data_type
                )
            ).all()
        for version_id, patient_id, data_type in versions:
            target = export / patient_id / f"{data_type}.{'xml' if data_type == 'ccda' else 'json'}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(read_content(store, version_id))
        total = sum(p.stat().st_size for p in export.rglob("*") if p.is_file())
        print(f"{len(versions)} documents, {total / 1e6:.0f} MB", file=sys.stderr)

        sshd = SshServer()
        servers.append(sshd)
        seaweed = SeaweedServer("bench")
        servers.append(seaweed)
        moto = MotoServer()
        servers.append(moto)
        role = moto.create_role("bench-writer", "bench-external-id", ["s3:PutObject"], "bench")
        from prefect_aws import AwsCredentials

        identity = AwsCredentials(aws_access_key_id=moto.deliverer_keys[0],
                                  aws_secret_access_key=moto.deliverer_keys[1])  # fmt: skip
        rounds = range(1, args.rounds + 1)
        variants = parse_variants(f"{args.connections}x{args.in_flight}," + args.sftp_variants)
        for (connections, in_flight), r in itertools.product(variants, rounds):
            name = f"bench-sftp-{connections}x{in_flight}-r{r}"
            SftpDestination(
                host="127.0.0.1", port=sshd.port, username=SFTP_USER, password=SFTP_PASSWORD,
                host_keys=[sshd.host_key_line()], root=str(sshd.make_folder(name)),
                max_connections=connections, files_in_flight=in_flight,
            ).save(name, overwrite=True)  # fmt: skip
            ingest.subscribe(store, "bench", f"sftp-destination/{name}")
        s3_variants = parse_variants(f"{args.s3_lanes}x{args.s3_in_flight}," + args.s3_variants)
        for (connections, in_flight), r in itertools.product(s3_variants, rounds):
            name = f"bench-s3-{connections}x{in_flight}-r{r}"
            S3Destination(
                bucket_name="bench", role_arn=role, external_id="bench-external-id",
                endpoint_url=seaweed.url, sts_endpoint_url=moto.url, aws_credentials=identity,
                server_side_encryption=None, max_connections=connections,
                files_in_flight=in_flight,
                path_template=f"{name}/{{healthexPatientId}}/{{dataType}}",
            ).save(name, overwrite=True)  # fmt: skip
            ingest.subscribe(store, "bench", f"s3-destination/{name}")
        encrypted = args.encrypted and "sftp" in args.only
        if encrypted:
            import pysequoia  # the receiver's key pair, made here; we hold its public half

            pair = pysequoia.Tsk.generate("Bench receiver <bench@receiver.example>")
            receiver = str(pair.extract_certificate())
            for r in rounds:
                name = f"bench-sftp-pgp-r{r}"
                SftpDestination(
                    host="127.0.0.1", port=sshd.port, username=SFTP_USER, password=SFTP_PASSWORD,
                    host_keys=[sshd.host_key_line()], root=str(sshd.make_folder(name)),
                    max_connections=args.connections, files_in_flight=args.in_flight,
                    encryption_key=receiver,
                ).save(name, overwrite=True)  # fmt: skip
                ingest.subscribe(store, "bench", f"sftp-destination/{name}")
        dask = start_dask(args.dask) if args.dask and "sftp" in args.only else None
        if dask:
            servers.append(dask)
            for r in rounds:
                SftpDestination(
                    host="127.0.0.1", port=sshd.port, username=SFTP_USER, password=SFTP_PASSWORD,
                    host_keys=[sshd.host_key_line()], root=str(sshd.make_folder(f"dask-r{r}")),
                    max_connections=args.connections, files_in_flight=args.in_flight,
                ).save(f"bench-dask-r{r}", overwrite=True)  # fmt: skip
                ingest.subscribe(store, "bench", f"sftp-destination/bench-dask-r{r}")
        obscured = subprocess.run(["rclone", "obscure", SFTP_PASSWORD], capture_output=True,
                                  text=True, check=True).stdout.strip()  # fmt: skip
        env = {
            **os.environ,
            "RCLONE_CONFIG_BSFTP_TYPE": "sftp", "RCLONE_CONFIG_BSFTP_HOST": "127.0.0.1",
            "RCLONE_CONFIG_BSFTP_PORT": str(sshd.port), "RCLONE_CONFIG_BSFTP_USER": SFTP_USER,
            "RCLONE_CONFIG_BSFTP_PASS": obscured, "RCLONE_CONFIG_BSFTP_SHELL_TYPE": "none",
            "RCLONE_CONFIG_BSFTP_DISABLE_HASHCHECK": "true",
            "RCLONE_CONFIG_BS3_TYPE": "s3", "RCLONE_CONFIG_BS3_PROVIDER": "Other",
            "RCLONE_CONFIG_BS3_ENDPOINT": seaweed.url, "RCLONE_CONFIG_BS3_REGION": "us-east-1",
            "RCLONE_CONFIG_BS3_ACCESS_KEY_ID": "bench", "RCLONE_CONFIG_BS3_SECRET_ACCESS_KEY": "x",
        }  # fmt: skip
        config = {
            "export": str(export), "batch": args.batch, "sftp_port": sshd.port,
            "sftp_user": SFTP_USER, "sftp_password": SFTP_PASSWORD, "s3_url": seaweed.url,
            "bucket": "bench", "profile": args.profile,
        }  # fmt: skip
        SERVERS["prefect"] = server.process.pid
        jobs: list[Job] = []
        if "sftp" in args.only:

            def sftp_folder(name: str) -> str:
                return str(sshd.make_folder(name))

            jobs += [
                Job("sftp", RCLONE, lambda r: run_rclone(
                    export, f"bsftp:{sftp_folder(f'rclone-r{r}')}", env)),
                Job("sftp", "paramiko, 8 connections, NODELAY", lambda r: run_child(
                    "bare-sftp", {**config, "sftp_root": sftp_folder(f"bare-r{r}")}, env),
                    bare=True),
                *flow_jobs("sftp", variants, "connections x {} files", config, env),
            ]  # fmt: skip
            if encrypted:
                plain = jobs[-len(variants)].label  # the first flow row: the same settings
                jobs.append(Job(
                    "sftp", f"{plain}, encrypted (OpenPGP)",
                    lambda r: run_child(
                        "flow", {**config, "destination": f"sftp-destination/bench-sftp-pgp-r{r}"},
                        env),
                    costs_more_than=plain,
                ))  # fmt: skip
            if dask:
                label = (f"delivery flow, Dask: {args.dask} worker processes "
                         f"({args.connections} connections each)")  # fmt: skip
                jobs.append(Job("sftp", label, lambda r: on_dask(config, env, dask, r)))
        if "s3" in args.only:
            jobs += [
                Job("s3", RCLONE, lambda r: run_rclone(export, f"bs3:bench/rclone-r{r}", env)),
                Job("s3", "boto3 put_object, 16 threads", lambda r: run_child(
                    "bare-s3", {**config, "prefix": f"bare-r{r}/"}, env)),
                Job("s3", "awscrt (the flow's writer), 16 threads", lambda r: run_child(
                    "bare-crt", {**config, "prefix": f"crt-r{r}/"}, env), bare=True),
                *flow_jobs("s3", s3_variants, "lanes x {} puts", config, env),
            ]  # fmt: skip
        strict = None
        if "sftp-v3" in args.only:
            strict = StrictV3SftpServer()
            servers.append(strict)
            jobs += strict_v3_jobs(strict, args, config, env, store)
        for r in rounds:
            print(f"round {r} of {args.rounds} ...", file=sys.stderr)
            for job in jobs if r % 2 else reversed(jobs):  # drift spreads over every row
                job.results.append(job.run(r))
            for home in [sshd.home, *([strict.root] if strict else [])]:
                for folder in home.glob(f"*-r{r}"):  # 300 MB a row at 1,000 patients
                    shutil.rmtree(folder, ignore_errors=True)
        print_table(jobs, args)
    finally:
        for running in reversed(servers):
            running.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)  # the store and the export: 6 GB at 10,000


class DaskCluster:
    """A running local Dask cluster of worker processes, warmed up (our modules imported), as a
    standing production cluster would be; its workers' CPU counts as the client's."""

    def __init__(self, workers: int) -> None:
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=8, processes=True,
                                    host="127.0.0.1", dashboard_address=None)  # fmt: skip
        self.client = Client(self.cluster)
        self.client.run(__import__, "patient_delivery.flows.deliver")
        self.scheduler_address = self.cluster.scheduler_address
        self.pids = list(self.client.run(os.getpid).values())

    def stop(self) -> None:
        self.client.close()
        self.cluster.close()


def start_dask(workers: int) -> DaskCluster:
    cluster = DaskCluster(workers)
    for number, pid in enumerate(cluster.pids):
        SERVERS[f"dask{number}"] = pid
    return cluster


RCLONE = "rclone copy --transfers 16"


@dataclass
class Job:
    """One row of the table: how to run it in round `r`, and its results so far. `bare` marks
    the client the flow's orchestration overhead is measured against."""

    server: str
    label: str
    run: Callable[[int], dict]
    bare: bool = False
    costs_more_than: str | None = None
    """The label of the row this one adds work to (encryption): the table prints the extra
    wall-clock and CPU time per document against it."""
    results: list[dict] = field(default_factory=list)


def flow_jobs(
    server: str, variants: list[tuple[int, int]], unit: str, config: dict, env: dict[str, str]
) -> list[Job]:
    """The flow to `server` once per variant (lanes x documents in flight), each round to its
    own destination block."""

    def run(lanes: int, in_flight: int) -> Callable[[int], dict]:
        block = f"{server}-destination/bench-{server}-{lanes}x{in_flight}"
        return lambda r: run_child("flow", {**config, "destination": f"{block}-r{r}"}, env)

    return [
        Job(
            server,
            f"delivery flow ({lanes} {unit.format(in_flight)} in flight)",
            run(lanes, in_flight),
        )
        for lanes, in_flight in variants
    ]


def strict_v3_jobs(
    strict: Any, args: argparse.Namespace, config: dict, env: dict[str, str], store: Any
) -> list[Job]:
    """rclone and the flow to a strict SFTP version 3 server (`loopback/strict_sftp.py`: no
    extensions, so the flow lands files with the standard rename and writes 32 KiB at a time;
    rclone with modification times off, as that server refuses SETSTAT). The server is Python:
    its rows measure it as much as the client, so they compare with each other only."""
    from loopback.servers import SFTP_PASSWORD, SFTP_USER
    from patient_delivery import ingest
    from patient_delivery.blocks.sftp import SftpDestination

    for r in range(1, args.rounds + 1):
        name = f"bench-sftp-v3-r{r}"
        _, root = strict.make_folder(name)
        SftpDestination(
            host="127.0.0.1", port=strict.port, username=SFTP_USER, password=SFTP_PASSWORD,
            host_keys=[strict.host_key_line()], root=root, max_connections=args.connections,
            files_in_flight=min(args.in_flight, 2),  # the server keeps at most 2 files open
        ).save(name, overwrite=True)  # fmt: skip
        ingest.subscribe(store, "bench", f"sftp-destination/{name}")
    obscured = subprocess.run(["rclone", "obscure", SFTP_PASSWORD], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
    rclone_env = {
        **env, "RCLONE_CONFIG_BV3_TYPE": "sftp", "RCLONE_CONFIG_BV3_HOST": "127.0.0.1",
        "RCLONE_CONFIG_BV3_PORT": str(strict.port), "RCLONE_CONFIG_BV3_USER": SFTP_USER,
        "RCLONE_CONFIG_BV3_PASS": obscured, "RCLONE_CONFIG_BV3_SHELL_TYPE": "none",
        "RCLONE_CONFIG_BV3_DISABLE_HASHCHECK": "true", "RCLONE_CONFIG_BV3_SET_MODTIME": "false",
    }  # fmt: skip

    def rclone(r: int) -> dict:
        _, root = strict.make_folder(f"rclone-r{r}")
        return run_rclone(Path(config["export"]), f"bv3:{root}", rclone_env)

    label = f"delivery flow ({args.connections} connections x 2 files in flight, rename landing)"
    return [
        Job("sftp-v3", RCLONE, rclone),
        Job("sftp-v3", label, lambda r: run_child(
            "flow", {**config, "destination": f"sftp-destination/bench-sftp-v3-r{r}"}, env)),
    ]  # fmt: skip


def on_dask(config: dict, env: dict[str, str], dask: Any, r: int) -> dict:
    result = run_child("flow", {**config, "destination": f"sftp-destination/bench-dask-r{r}",
                                "dask": dask.scheduler_address}, env)  # fmt: skip
    result["cpu"] += sum(v for k, v in result.items() if k.startswith("dask"))
    return result


def print_table(jobs: list[Job], args: argparse.Namespace) -> None:
    """Each row's median over the rounds; "vs rclone" is the median of the rounds' ratios to
    that round's rclone run (the machine drifts between rounds more than within one), with
    their range."""
    print(f"\n{args.patients} patients, {args.batch} documents per upload task, "
          f"median of {args.rounds} round(s)\n")  # fmt: skip
    print("| server | path | files | MB | s | files/s | MB/s | peak RSS MB | CPU ms/file: client "
          "| Prefect server | whole machine | vs rclone | range |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for job in jobs:
        rclone = next(j for j in jobs if j.server == job.server and j.label == RCLONE)
        bare = next((j for j in jobs if j.server == job.server and j.bare), None)
        ratios = [rate(r) / rate(b) for r, b in zip(job.results, rclone.results, strict=True)]
        files, moved = job.results[0]["files"], job.results[0]["bytes"] / 1e6
        seconds = median(r["seconds"] for r in job.results)

        print(
            f"| {job.server} | {job.label} | {files} | {moved:.0f} | {seconds:.2f} | "
            f"{median(map(rate, job.results)):.0f} | {moved / seconds:.0f} | "
            f"{max(r['rss_mb'] for r in job.results):.0f} | {per_file(job, 'cpu')} | "
            f"{per_file(job, 'prefect_cpu')} | {per_file(job, 'machine_cpu')} | "
            f"{median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f} |"
        )
        if job.label.startswith("delivery flow") and bare and not job.costs_more_than:
            extra = median(
                (f["seconds"] - b["seconds"]) / max(1, f["files"]) * 1000
                for f, b in zip(job.results, bare.results, strict=True)
            )
            print(f"| {job.server} | orchestration overhead: {extra:.2f} ms per document "
                  f"(against {bare.label}) | | | | | | | | | | | |")  # fmt: skip
        if job.costs_more_than:
            base = next(j for j in jobs if j.label == job.costs_more_than)
            pairs = list(zip(job.results, base.results, strict=True))
            wall, cpu = (
                median((j[key] / j["files"] - b[key] / b["files"]) * 1000 for j, b in pairs)
                for key in ("seconds", "cpu")
            )
            print(f"| {job.server} | cost: {wall:+.2f} ms wall-clock, {cpu:+.2f} ms client CPU "
                  f"per document (against {base.label}) | | | | | | | | | | | |")  # fmt: skip


def rate(result: dict) -> float:
    return result["files"] / result["seconds"]


def per_file(job: Job, key: str) -> str:
    """The rounds' median of `key` (CPU seconds) in milliseconds per file."""
    return f"{median(r.get(key, 0) / max(1, r['files']) for r in job.results) * 1000:.2f}"


def gather_benchmark(args: argparse.Namespace) -> None:
    """Claim `changed` owed deliveries in a store of `store_patients` already-delivered patients."""
    import random
    from datetime import UTC, datetime

    from sqlalchemy import insert

    from patient_delivery import ingest, ledger
    from patient_delivery.store import open_store
    from patient_delivery.store.models import Delivery, DocumentVersion, Patient, Share

    work = Path(tempfile.mkdtemp(prefix="bench-gather-"))
    store = open_store(f"sqlite:///{work / 'store.db'}")
    ingest.add_organization(store, "Bench", "bench")
    ingest.add_project(store, "bench", "Bench", "bench")
    now = datetime.now(UTC)
    chunk = 50_000
    started = time.perf_counter()
    print(
        f"building a store of {args.store_patients} patients (metadata only) ...", file=sys.stderr
    )
    for start in range(0, args.store_patients, chunk):
        ids = [f"hx_{n:020d}" for n in range(start, min(start + chunk, args.store_patients))]
        with store.session() as session:
            session.execute(insert(Patient), [{"id": i, "created_at": now} for i in ids])
            session.execute(insert(Share), [{"project_id": "bench", "patient_id": i,
                            "external_id": i[3:], "created_at": now} for i in ids])  # fmt: skip
            session.execute(insert(DocumentVersion), [
                {"id": start * 2 + k * 2 + t + 1, "patient_id": i, "data_type": dt, "version": 1,
                 "sha256": "0" * 64, "size": 100_000, "created_at": now}
                for k, i in enumerate(ids) for t, dt in enumerate(("ccda", "fhir"))])  # fmt: skip
            session.execute(insert(Delivery), [
                {"version_id": start * 2 + k * 2 + t + 1, "patient_id": i, "project_id": "bench",
                 "organization_id": "bench", "data_type": dt, "destination": "x/bench",
                 "purpose": "p", "status": "delivered", "attempts": 1, "path": f"{i}/{dt}",
                 "created_at": now, "updated_at": now, "delivered_at": now}
                for k, i in enumerate(ids) for t, dt in enumerate(("ccda", "fhir"))])  # fmt: skip
    print(f"built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    changed = random.Random(1).sample(range(args.store_patients), args.changed)
    with store.session() as session:
        session.execute(insert(Delivery), [
            {"version_id": n * 2 + 1, "patient_id": f"hx_{n:020d}", "project_id": "bench",
             "organization_id": "bench", "data_type": "ccda", "destination": "x/bench2",
             "purpose": "p", "status": "queued", "attempts": 0, "created_at": now,
             "updated_at": now} for n in changed])  # fmt: skip
    timings = []
    for attempt in range(3):
        started = time.perf_counter()
        claimed = ledger.claim(store, f"bench-{attempt}", limit=args.changed)
        timings.append((time.perf_counter() - started) * 1000)
        assert sum(len(v) for v in claimed.values()) == args.changed
        with store.session() as session:  # give them back for the next timing
            session.execute(
                __import__("sqlalchemy")
                .update(Delivery)
                .where(Delivery.status == "pending")
                .values(status="queued", claimed_by=None, lease_expires_at=None)
            )
    print("\n| store patients | owed deliveries | claim ms (3 runs) | best |")
    print("| --- | --- | --- | --- |")
    print(f"| {args.store_patients} | {args.changed} | "
          f"{', '.join(f'{t:.0f}' for t in timings)} | {min(timings):.0f} |")  # fmt: skip
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of the benchmark process: {rss:.0f} MB")
    store.engine.dispose()
    shutil.rmtree(work, ignore_errors=True)


def memory_benchmark(args: argparse.Namespace) -> None:
    """Peak RSS of whole delivery runs as the backlog grows: flat in N is the target.

    Small documents (`--size-scale`, default 0.02: a few KB each) keep 100,000 patients
    seedable in minutes; delivered into a folder on /dev/shm, so the flow is what is measured.
    """
    from loopback.servers import PrefectServer

    server = PrefectServer()
    os.environ.update(server.client_env())
    from patient_delivery import ingest
    from patient_delivery.blocks.local import LocalDestination
    from patient_delivery.seed import seed_project
    from patient_delivery.store import close_stores, open_store

    rows = []
    try:
        for patients in (int(n) for n in args.sizes.split(",")):
            work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
            url = f"sqlite:///{work / 'store.db'}"
            os.environ["PATIENT_DELIVERY_STORE_URL"] = url
            store = open_store(url)
            ingest.add_organization(store, "Bench", "bench")
            ingest.add_project(store, "bench", "Bench", "bench")
            name = f"memory-{patients}"
            target = Path(tempfile.mkdtemp(prefix="bench-memory-", dir="/dev/shm"))
            LocalDestination(root=target, max_connections=8).save(name, overwrite=True)
            ingest.subscribe(store, "bench", f"local-destination/{name}")
            started = time.perf_counter()
            print(f"seeding {patients} patients ...", file=sys.stderr)
            seed_project(store, "bench", patients, size_scale=args.size_scale)
            print(f"seeded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            close_stores()
            config = {"export": str(work), "destination": f"local-destination/{name}",
                      "batch": args.batch}  # fmt: skip
            # As prefect.yaml's deployments run it (see there), unless set otherwise.
            env = {"MALLOC_ARENA_MAX": "2", **os.environ}
            result = run_child("flow", config, env)
            rows.append((patients, result["files"], result["seconds"], result["rss_mb"]))
            subprocess.run(["rm", "-rf", str(target), str(work)], check=False)
    finally:
        server.stop()
    smallest = rows[0][3]
    print("\n| patients | documents | seconds | documents/s | peak RSS MB | vs smallest |")
    print("| --- | --- | --- | --- | --- | --- |")
    for patients, files, seconds, rss in rows:
        print(f"| {patients} | {files} | {seconds:.1f} | {files / seconds:.0f} | {rss:.0f} | "
              f"{rss / smallest:.2f}x |")  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        result = child(sys.argv[2], json.loads(sys.argv[3]))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "mode", nargs="?", default="throughput", choices=["throughput", "gather", "memory"]
    )
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--size-scale", type=float, default=1.0, help="document size factor")
    parser.add_argument("--batch", type=int, default=100, help="documents per upload task")
    parser.add_argument("--connections", type=int, default=8, help="SFTP connections (flow)")
    parser.add_argument(
        "--in-flight", type=int, default=4, help="files on their way per SFTP connection (flow)"
    )
    parser.add_argument(
        "--sftp-variants",
        default="",
        help="more SFTP flow rows, e.g. 8x1,2x4 (connections x files)",
    )
    parser.add_argument("--s3-lanes", type=int, default=8, help="S3 upload lanes (flow)")
    parser.add_argument("--s3-in-flight", type=int, default=2, help="puts on their way per lane")
    parser.add_argument("--s3-variants", default="", help="more S3 flow rows: 4x4 (lanes x puts)")
    parser.add_argument(
        "--only", default="sftp,s3,sftp-v3", help="sftp (OpenSSH), s3, sftp-v3 (a strict server)"
    )
    parser.add_argument(
        "--encrypted",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the SFTP flow with files encrypted to an OpenPGP key",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="times each row runs, in alternating order"
    )
    parser.add_argument(
        "--dask", type=int, default=0, help="also the SFTP flow on a Dask cluster of N processes"
    )
    parser.add_argument("--profile", help="folder for py-spy profiles (collapsed stacks) per mode")
    parser.add_argument("--store-patients", type=int, default=1_000_000)
    parser.add_argument("--changed", type=int, default=1000)
    parser.add_argument("--sizes", default="1000,10000,100000", help="patients, memory mode")
    args = parser.parse_args()
    args.only = set(args.only.split(","))
    if args.mode == "gather":
        gather_benchmark(args)
    elif args.mode == "memory":
        if args.size_scale == 1.0:
            args.size_scale = 0.02
        memory_benchmark(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
