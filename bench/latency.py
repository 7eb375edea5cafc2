"""Update-to-landed latency in the deployed setup: one update, a burst, a trickle.

    uv run --group dev python bench/latency.py                  # both setups, a table
    uv run --group dev python bench/latency.py --setups listen --json

For each setup, the production shape the README documents: a real `prefect server start` on
loopback, the block types, a process work pool, `prefect deploy --all` from this checkout's
prefect.yaml, `prefect worker start --limit 4`, a project subscribed to a local folder, and
- `listen`: `patient-delivery listen` beside the worker (it pauses the update trigger);
- `worker`: the worker alone, runs started by the deployment's update trigger.
Then single updates (`--singles`, `--gap` seconds apart), one `import` of `--burst` patients,
and a trickle (`--trickle` updates, one `document put` every `--over / --trickle` seconds).

An update's latency runs from its document version's creation (the store's clock) to its file's
modification time in the folder. For each scenario it prints min, median, p95 and max, the
delivery runs updates started (listener runs, and deployment runs the trigger asked for, the
schedule's left out), how many of those delivered nothing (`idle_runs`) and how many were
cancelled before starting. With `--json`: one object per scenario. Every update's file must
arrive, once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loopback.servers import PrefectServer  # noqa: E402

BIN = Path(sys.executable).parent
SETTLE_SECONDS = 20.0
"""After the last file: past the trigger's 10 s window and a run's 15 s linger."""


def document(label: str) -> bytes:
    return (
        f'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>{label}</title></ClinicalDocument>'
    ).encode()


class Service:
    """One setup's server, deployments, worker (and listener), store and receiving folder."""

    def __init__(self, setup: str, work: Path) -> None:
        self.work = work
        self.server = PrefectServer()
        self.env = {
            **self.server.client_env(),
            "PATIENT_DELIVERY_HOME": str(work / "home"),
            "PATIENT_DELIVERY_STORE_URL": f"sqlite:///{work / 'store.db'}",
            "PATIENT_DELIVERY_CHECKOUT": str(ROOT),
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        self.prefect("block", "register", "-m", "patient_delivery.blocks")
        self.prefect("work-pool", "create", "patient-delivery", "--type", "process")
        self.prefect("--no-prompt", "deploy", "--all")
        self.deployment_id = self.deployments()["deliver-updates"]
        self.folder = work / "org-folder"
        self.cli("org", "add", "Acme", "--id", "acme")
        self.cli("project", "add", "acme", "Study", "--id", "study")
        self.cli("destination", "local", "bench-folder", "--root", str(self.folder))
        self.cli("subscribe", "study", "local-destination/bench-folder")
        worker = ["worker", "start", "--pool", "patient-delivery", "--limit", "4"]
        self.processes = [self.start("worker.log", sys.executable, "-m", "prefect", *worker)]
        if setup == "listen":
            log = work / "listen.log"
            self.processes.append(self.start("listen.log", str(BIN / "patient-delivery"), "listen"))
            deadline = time.monotonic() + 60
            while "listening" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
        time.sleep(3)  # the worker registers, the listener pauses the trigger
        self.listener = setup == "listen"

    def start(self, log: str, *command: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env=self.env, cwd=ROOT,
                                stdout=(self.work / log).open("wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip

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

    def landed(self) -> dict[str, tuple[float, float, str]]:
        """Each delivered file's title: its version's creation, its landing (mtime), its run."""
        from sqlalchemy import select

        from patient_delivery.store import open_store
        from patient_delivery.store.models import Delivery, DocumentVersion

        statement = (
            select(DocumentVersion.created_at, Delivery.path, Delivery.flow_run_id)
            .join(DocumentVersion, DocumentVersion.id == Delivery.version_id)
            .where(Delivery.status == "delivered")
        )
        with open_store(self.env["PATIENT_DELIVERY_STORE_URL"]).session() as session:
            rows = session.execute(statement).all()
        found = {}
        for created, path, run in rows:
            file = self.folder / path
            title = file.read_text().split("<title>")[1].split("</title>")[0]
            found[title] = (created.timestamp(), file.stat().st_mtime, run)
        return found

    def runs_since(self, moment: float) -> list[dict]:
        """Delivery runs updates started: the trigger's (scheduled ones left out) and the
        listener's (no deployment)."""
        after = datetime.fromtimestamp(moment, UTC).isoformat()
        asked = httpx.post(f"{self.server.url}/flow_runs/filter", timeout=30, json={
            "deployments": {"id": {"any_": [self.deployment_id]}},
            "flow_runs": {"expected_start_time": {"after_": after}},
        }).json()  # fmt: skip
        listener = httpx.post(f"{self.server.url}/flow_runs/filter", timeout=30, json={
            "flows": {"name": {"any_": ["deliver-updates"]}},
            "flow_runs": {"deployment_id": {"is_null_": True}, "start_time": {"after_": after}},
        }).json()  # fmt: skip
        return [run for run in asked if not run["auto_scheduled"]] + listener

    def stop(self) -> None:
        for process in reversed(self.processes):
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.server.stop()


def singles(service: Service, count: int, gap: float) -> list[str]:
    """`count` updates, each alone: one `document put`, then `gap` seconds."""
    titles = []
    for i in range(count):
        patient = service.cli("patient", "add", "study").strip()
        titles.append(f"single {i}")
        service.cli("document", "put", patient, "ccda", "-", stdin=document(titles[-1]))
        time.sleep(gap)
    return titles


def trickle(service: Service, updates: int, over: float) -> list[str]:
    """One new patient's document every `over / updates` seconds."""
    patients = [service.cli("patient", "add", "study").strip() for _ in range(updates)]
    titles, gap, start = [], over / updates, time.monotonic()
    for i, patient in enumerate(patients):
        time.sleep(max(0.0, start + i * gap - time.monotonic()))
        titles.append(f"trickle {i}")
        service.cli("document", "put", patient, "ccda", "-", stdin=document(titles[-1]))
    return titles


def burst(service: Service, updates: int) -> list[str]:
    """One import of `updates` new patients' documents."""
    files = []
    for i in range(updates):
        files.append(service.work / f"burst-{i}.xml")
        files[-1].write_bytes(document(f"burst {i}"))
    service.cli("import", "ccda", *map(str, files), "--project", "study")
    return [f"burst {i}" for i in range(updates)]


def p95(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def measure(service: Service, name: str, send: Callable[[], list[str]]) -> dict[str, object]:
    began = time.time()
    titles = send()
    deadline = time.monotonic() + 300
    while not set(titles) <= set(service.landed()) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(SETTLE_SECONDS)
    landed = service.landed()
    missing = set(titles) - set(landed)
    if missing:
        raise SystemExit(f"{name}: {len(missing)} update(s) never arrived")
    waits = [landed[t][1] - landed[t][0] for t in titles]
    runs = service.runs_since(began - 1)
    started = [run for run in runs if run["run_count"]]  # a cancelled one never ran
    sending = {run for _, _, run in landed.values()}
    return {
        "setup": "listen" if service.listener else "worker",
        "scenario": name,
        "updates": len(titles),
        "min_s": round(min(waits), 2),
        "median_s": round(statistics.median(waits), 2),
        "p95_s": round(p95(waits), 2),
        "max_s": round(max(waits), 2),
        "runs": len(started),
        "idle_runs": len([run for run in started if run["id"] not in sending]),
        "cancelled_runs": len([run for run in runs if not run["run_count"]]),
    }


def scenarios(
    service: Service, args: argparse.Namespace
) -> list[tuple[str, Callable[[], list[str]]]]:
    return [
        ("one", lambda: singles(service, args.singles, args.gap)),
        (f"burst of {args.burst}", lambda: burst(service, args.burst)),
        (f"trickle of {args.trickle}", lambda: trickle(service, args.trickle, args.over)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default="listen,worker", help="listen, worker or both")
    parser.add_argument("--singles", type=int, default=5, help="single updates")
    parser.add_argument("--gap", type=float, default=20.0, help="seconds after each single")
    parser.add_argument("--burst", type=int, default=30, help="patients in the burst's import")
    parser.add_argument("--trickle", type=int, default=10, help="updates in the trickle")
    parser.add_argument("--over", type=float, default=20.0, help="the trickle's seconds")
    parser.add_argument("--json", action="store_true", help="one JSON object per scenario")
    args = parser.parse_args()
    rows = []
    for setup in args.setups.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"bench-latency-{setup}-"))
        os.chmod(work, 0o700)
        service = Service(setup, work)
        try:
            for name, send in scenarios(service, args):
                rows.append(measure(service, name, send))
                if args.json:
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            service.stop()
            shutil.rmtree(work, ignore_errors=True)
    if not args.json:
        import pandas as pd

        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
