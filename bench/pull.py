"""Reads per second from the pull API, loaded from a second process.

    uv run --group dev python bench/pull.py  # 200 synthetic patients, 8 clients, 5 s each
    uv run --group dev python bench/pull.py --patients 1000 --clients 16 --seconds 10

Seeds a SQLite store with synthetic patients (the project's generator), creates an API key,
starts `patient-delivery serve` on a loopback port, then loads it from this process (a
different one) with httpx clients in threads: the CapabilityStatement (no key, no store: the
baseline), a patient read, a search by type, and a `$everything` page, over random patients.
Prints reads/s and latency, with each ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load(url_for, key: str, clients: int, seconds: float) -> tuple[int, list[float]]:  # type: ignore[no-untyped-def]
    """`clients` threads reading `url_for(rng)` for `seconds`; (reads, latencies)."""
    import httpx

    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(number: int) -> None:
        rng = random.Random(number)
        mine: list[float] = []
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            while time.monotonic() < stop:
                started = time.perf_counter()
                response = http.get(url_for(rng))
                mine.append(time.perf_counter() - started)
                if response.status_code != 200:
                    errors.append(response.status_code)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{len(errors)} reads failed: {sorted(set(errors))}")
    return len(latencies), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    env = {**os.environ, "PATIENT_DELIVERY_HOME": str(home),
           "PATIENT_DELIVERY_STORE_URL": f"sqlite:///{home / 'store.db'}",
           "PATIENT_DELIVERY_EMIT_EVENTS": "false"}  # fmt: skip
    os.environ.update(env)
    from patient_delivery import ingest
    from patient_delivery.pull.keys import create_key
    from patient_delivery.seed import seed_project
    from patient_delivery.store import open_store

    store = open_store(env["PATIENT_DELIVERY_STORE_URL"])
    ingest.add_organization(store, "Bench", "bench")
    ingest.add_project(store, "bench", "Pull", "pull")
    print(f"seeding {args.patients} patients ...", file=sys.stderr)
    patients = seed_project(store, "pull", args.patients)
    _, key = create_key(store, "bench", "benchmark")

    port = free_port()
    base = f"http://127.0.0.1:{port}/fhir"
    command = [str(BIN / "patient-delivery"), "serve", "--port", str(port)]
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/metadata", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the API server did not start") from None
                time.sleep(0.2)
        cases = [
            ("GET /fhir/metadata (no key, no store)", lambda rng: f"{base}/metadata"),
            ("GET /fhir/Patient/{id}", lambda rng: f"{base}/Patient/{rng.choice(patients)}"),
            ("GET /fhir/Condition?patient={id}",
             lambda rng: f"{base}/Condition?patient={rng.choice(patients)}"),
            ("GET /fhir/Patient/{id}/$everything (50 a page)",
             lambda rng: f"{base}/Patient/{rng.choice(patients)}/$everything"),
        ]  # fmt: skip
        rows = []
        for name, url_for in cases:
            load(url_for, key, 2, 1.0)  # warm: bundle cache, connections
            count, latencies = load(url_for, key, args.clients, args.seconds)
            rows.append((name, count / args.seconds, statistics.median(latencies),
                         statistics.quantiles(latencies, n=100)[98]))  # fmt: skip
        base_rate = rows[0][1]
        print(f"\n{args.patients} patients, {args.clients} clients, {args.seconds:.0f} s each, "
              "one uvicorn process, SQLite store\n")  # fmt: skip
        print("| read | reads/s | median ms | p99 ms | vs metadata |")
        print("| --- | --- | --- | --- | --- |")
        for name, rate, median, p99 in rows:
            print(f"| {name} | {rate:.0f} | {median * 1000:.1f} | {p99 * 1000:.1f} | "
                  f"{rate / base_rate:.2f}x |")  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
