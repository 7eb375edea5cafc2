"""How the delivery deployment's collision strategy handles a trickle and a burst of updates.

    uv run --group dev python bench/collisions.py     # CANCEL_NEW:15, CANCEL_NEW:0, ENQUEUE:0
    uv run --group dev python bench/collisions.py --updates 20 --over 30 --setups ENQUEUE:15

For each setup (STRATEGY:LINGER, the collision strategy and the runs' `linger_seconds`): a real
`prefect server start` on loopback, `prefect deploy --all` from this checkout's prefect.yaml
(with only those two changed), a process worker, a project
subscribed to a local folder. Then a trickle (one `document put` every OVER/UPDATES seconds)
and a burst (one `import` of UPDATES patients). For each, it prints the delivery runs the
trigger asked for, how many started a process, how many of those found nothing to send, how
many were cancelled before starting, and how long an update waited for its file (median and
worst). The schedule's own runs are left out. Every update's file must arrive.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loopback.servers import PrefectServer  # noqa: E402

BIN = Path(sys.executable).parent
SETTLE_SECONDS = 20.0
"""After the last file: past the trigger's 10 s window, so every run it would start has."""


def document(label: str) -> bytes:
    return (
        f'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>{label}</title></ClinicalDocument>'
    ).encode()


class Service:
    """One strategy's server, deployments, worker, store and receiving folder."""

    def __init__(self, strategy: str, linger: float, work: Path) -> None:
        self.work = work
        self.server = PrefectServer()
        self.env = {
            **self.server.client_env(),
            "PATIENT_DELIVERY_HOME": str(work / "home"),
            "PATIENT_DELIVERY_STORE_URL": f"sqlite:///{work / 'store.db'}",
            "PATIENT_DELIVERY_CHECKOUT": str(ROOT),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "0",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
        for deployment in config["deployments"]:
            if deployment["name"] == "deliver-updates":
                deployment["concurrency_limit"]["collision_strategy"] = strategy
                deployment["parameters"]["linger_seconds"] = linger
        variant = work / "prefect.yaml"
        variant.write_text(yaml.safe_dump(config))
        self.prefect("block", "register", "-m", "patient_delivery.blocks")
        self.prefect("work-pool", "create", "patient-delivery", "--type", "process")
        self.prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(variant))
        self.deployment_id = self.deployments()["deliver-updates"]
        self.folder = work / "org-folder"
        self.cli("org", "add", "Acme", "--id", "acme")
        self.cli("project", "add", "acme", "Study", "--id", "study")
        self.cli("destination", "local", "bench-folder", "--root", str(self.folder))
        self.cli("subscribe", "study", "local-destination/bench-folder")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "patient-delivery"],
            env=self.env, cwd=ROOT, stdout=(work / "worker.log").open("wb"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        time.sleep(3)

    def run(self, *command: str, stdin: bytes | None = None) -> str:
        done = subprocess.run(command, env=self.env, cwd=ROOT, input=stdin,
                              capture_output=True, timeout=300, check=False)  # fmt: skip
        if done.returncode:
            raise SystemExit(f"{command[:3]} failed: {done.stderr.decode()[-2000:]}")
        return done.stdout.decode()

    def cli(self, *args: str, stdin: bytes | None = None) -> str:
        return self.run(str(BIN / "patient-delivery"), *args, stdin=stdin)

    def prefect(self, *args: str) -> str:
        return self.run(sys.executable, "-m", "prefect", *args)

    def deployments(self) -> dict[str, str]:
        found = httpx.post(f"{self.server.url}/deployments/filter", json={}, timeout=30).json()
        return {d["name"]: d["id"] for d in found}

    def files(self) -> dict[str, float]:
        """Each delivered file's title and the time it landed (its modification time)."""
        landed = {}
        for path in self.folder.rglob("*.xml") if self.folder.exists() else []:
            title = path.read_text().split("<title>")[1].split("</title>")[0]
            landed[title] = path.stat().st_mtime
        return landed

    def runs_since(self, moment: float) -> list[dict]:
        after = datetime.fromtimestamp(moment, UTC).isoformat()
        return httpx.post(f"{self.server.url}/flow_runs/filter", timeout=30, json={
            "deployments": {"id": {"any_": [self.deployment_id]}},
            "flow_runs": {"expected_start_time": {"after_": after}},
        }).json()  # fmt: skip

    def stop(self) -> None:
        os.killpg(self.worker.pid, 15)
        try:
            self.worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.worker.pid, 9)
            self.worker.wait()
        self.server.stop()


def trickle(service: Service, updates: int, over: float) -> dict[str, float]:
    """One new patient's document every `over / updates` seconds; when each was stored."""
    sent = {}
    gap = over / updates
    start = time.monotonic()
    for i in range(updates):
        time.sleep(max(0.0, start + i * gap - time.monotonic()))
        patient = service.cli("patient", "add", "study").strip()
        sent[f"trickle {i}"] = time.time()
        service.cli("document", "put", patient, "ccda", "-", stdin=document(f"trickle {i}"))
    return sent


def burst(service: Service, updates: int) -> dict[str, float]:
    """One import of `updates` new patients' documents; when the import began."""
    files = []
    for i in range(updates):
        files.append(service.work / f"burst-{i}.xml")
        files[-1].write_bytes(document(f"burst {i}"))
    began = time.time()
    service.cli("import", "ccda", *map(str, files), "--project", "study")
    return {f"burst {i}": began for i in range(updates)}


def measure(service: Service, name: str, send) -> dict[str, object]:  # type: ignore[no-untyped-def]
    began = time.time()
    sent = send()
    deadline = time.monotonic() + 300
    while not set(sent) <= set(service.files()) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(SETTLE_SECONDS)
    landed = service.files()
    missing = set(sent) - set(landed)
    if missing:
        raise SystemExit(f"{name}: {len(missing)} update(s) never arrived")
    waits = [landed[title] - sent[title] for title in sent]
    runs = [run for run in service.runs_since(began - 1) if not run["auto_scheduled"]]
    started = [run for run in runs if run["run_count"]]  # it ran (a cancelled one has a
    # start time: the moment it was cancelled)
    ledger = json.loads(service.cli("deliveries", "--json", "--limit", "100000"))["deliveries"]
    sending = {row["flow_run_id"] for row in ledger if row["status"] == "delivered"}
    idle = [run for run in started if run["id"] not in sending]
    unstarted = [run for run in runs if not run["run_count"]]
    cancelled = [run for run in unstarted if run["state"]["type"] == "CANCELLED"]
    return {
        "pattern": name,
        "asked": len(runs),
        "started": len(started),
        "found nothing": len(idle),
        "cancelled unstarted": len(cancelled),
        "wait median s": round(statistics.median(waits), 1),
        "wait worst s": round(max(waits), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--over", type=float, default=60.0, help="trickle length, seconds")
    parser.add_argument("--setups", default="CANCEL_NEW:15,CANCEL_NEW:0,ENQUEUE:0")
    args = parser.parse_args()
    rows = []
    for setup in args.setups.split(","):
        strategy, _, linger = setup.partition(":")
        work = Path(tempfile.mkdtemp(prefix=f"bench-collisions-{strategy.lower()}-"))
        os.chmod(work, 0o700)
        service = Service(strategy, float(linger or 0), work)
        try:
            for name, send in (
                ("trickle", lambda s=service: trickle(s, args.updates, args.over)),
                ("burst", lambda s=service: burst(s, args.updates)),
            ):
                row = measure(service, name, send)
                rows.append({"strategy": strategy, "linger s": float(linger or 0), **row})
                print(rows[-1], flush=True)
            delivered = len(service.files())
            if delivered != 2 * args.updates:
                raise SystemExit(f"{strategy}: {delivered} files for {2 * args.updates} updates")
        finally:
            service.stop()
            shutil.rmtree(work, ignore_errors=True)
    import pandas as pd

    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
