"""Many destination blocks saved at once in the deployed setup: how long saving takes, how many
check-destination runs the saves start, and the machine's load meanwhile.

    uv run --group dev python bench/saves.py              # 200 saves
    uv run --group dev python bench/saves.py --saves 500

The setup is bench/latency.py's `worker` one: a real `prefect server start` on loopback,
`prefect deploy --all` from this checkout's prefect.yaml (its check-destination trigger fires at
the first save, then at most once per 10 s window) and `prefect worker start --limit 4`. The
blocks are saved as the UI's form saves them (a POST of the values, nothing in between), one
after another. It then waits until every check run has ended and prints: the saves' seconds,
the check runs and their states, and the highest 1-minute load average sampled every second
from the first save to the last run's end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import Service

ENDED = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def save_as_the_ui_does(url: str, slug: str, name: str, data: dict) -> int:
    """Save a block as the UI's form does; a 503 (Prefect's database busy) is tried again after
    a second, as Prefect's own client does. How many 503s it took."""
    kind = httpx.get(f"{url}/block_types/slug/{slug}", timeout=30).json()
    [schema] = httpx.post(f"{url}/block_schemas/filter", timeout=30, json={
        "block_schemas": {"block_type_id": {"any_": [kind["id"]]}}, "limit": 1,
    }).json()  # fmt: skip
    busy = 0
    while True:
        saved = httpx.post(f"{url}/block_documents/", timeout=30, json={
            "name": name, "data": data, "block_schema_id": schema["id"],
            "block_type_id": kind["id"],
        })  # fmt: skip
        if saved.status_code != 503 or busy >= 10:
            saved.raise_for_status()
            return busy
        busy += 1
        time.sleep(1)


class Load:
    """The highest 1-minute load average, sampled every second until `stop`."""

    def __init__(self) -> None:
        self.most = os.getloadavg()[0]
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(1.0):
            self.most = max(self.most, os.getloadavg()[0])

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.most


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, default=200, help="blocks saved, one after another")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-saves-"))
    os.chmod(work, 0o700)
    service = Service("worker", work)
    try:
        check = service.deployments()["check-destination"]
        time.sleep(10)  # the machine settles after the setup's start
        since = datetime.now(UTC).isoformat()
        load = Load()
        began = time.monotonic()
        busy: Counter[int] = Counter()
        for number in range(args.saves):
            busy[number] = save_as_the_ui_does(
                service.server.url,
                "local-destination",
                f"saved-{number}",
                {"root": str(work / f"folder-{number}")},
            )
        saving = time.monotonic() - began
        time.sleep(12)  # past the last window: every run the trigger starts is asked for
        deadline = time.monotonic() + 600
        while True:
            runs = httpx.post(f"{service.server.url}/flow_runs/filter", timeout=30, json={
                "deployments": {"id": {"any_": [check]}},
                "flow_runs": {"expected_start_time": {"after_": since}},
            }).json()  # fmt: skip
            if all(r["state"]["type"] in ENDED for r in runs) or time.monotonic() > deadline:
                break
            time.sleep(1)
        ended = time.monotonic() - began
        most = load.stop()
    finally:
        service.stop()
        shutil.rmtree(work, ignore_errors=True)
    states = Counter(r["state"]["type"] for r in runs)
    print(
        f"{args.saves} saves in {saving:.1f} s; {len(runs)} check runs {dict(states)}, the "
        f"last ended {ended:.1f} s after the first save; highest 1-minute load {most:.2f} "
        f"on {os.cpu_count()} cores; Prefect answered 503 (busy) {sum(busy.values())} times, "
        f"to saves {sorted(n for n, c in busy.items() if c)[:20]}"
    )


if __name__ == "__main__":
    main()
