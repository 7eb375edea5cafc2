"""Reads per second from the pull API, loaded from a second process.

    uv run --group dev python bench/pull.py  # 200 synthetic patients, 8 clients, 5 s each
    uv run --group dev python bench/pull.py --patients 1000 --clients 16 --seconds 10
    uv run --group dev python bench/pull.py --patients 10000 --export --clients 1

Seeds a SQLite store with synthetic patients (the project's generator), creates an API key,
starts `patient-delivery serve` on a loopback port, then loads it from this process (a
different one) with httpx clients in threads: the CapabilityStatement (no key, no store: the
baseline), a patient read, a search by type, and a `$everything` page, over random patients.
Prints reads/s and latency, with each ratio to the baseline. With `--export`, then a FHIR
bulk export of the whole project (a Prefect flow run in the server's process): resources
exported per second against resources read per second through `$everything` pages (500 a page,
`--clients` readers), and the server's peak RSS (VmHWM) before and after the export.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
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
    parser.add_argument("--export", action="store_true", help="also a bulk export")
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
        if args.export:  # first, on a fresh server: its memory is the export's
            export_rows = export_case(base, key, patients, server.pid, args)
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
        if args.export:
            print()
            for line in export_rows:
                print(line)
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident set (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def export_case(base: str, key: str, patients: list[str], pid: int, args) -> list[str]:  # type: ignore[no-untyped-def]
    """Export the project; read the same kind of resources through `$everything` pages for
    as long, as the baseline."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    before = peak_rss_mb(pid)
    started = time.perf_counter()
    kick = httpx.get(f"{base}/Group/pull/$export", timeout=60,
                     headers={**headers, "Prefer": "respond-async"})  # fmt: skip
    if kick.status_code != 202:
        raise SystemExit(f"kick-off refused: {kick.status_code} {kick.text[:300]}")
    status_url = kick.headers["Content-Location"]
    while (answer := httpx.get(status_url, headers=headers, timeout=60)).status_code == 202:
        time.sleep(1.0)
    seconds = time.perf_counter() - started
    manifest = answer.json()
    exported = sum(entry["count"] for entry in manifest["output"])
    after = peak_rss_mb(pid)
    downloaded = 0
    for entry in manifest["output"]:
        with httpx.stream("GET", entry["url"], headers=headers, timeout=120) as body:
            for chunk in body.iter_bytes():
                downloaded += len(chunk)

    read, latencies = 0, 0.0
    reading = time.perf_counter()
    deadline = reading + min(seconds, args.seconds * 6)
    rng = random.Random(0)
    with httpx.Client(headers=headers, timeout=60) as http:
        while time.perf_counter() < deadline:
            url: str | None = f"{base}/Patient/{rng.choice(patients)}/$everything?_count=500"
            while url and time.perf_counter() < deadline:
                page = http.get(url).json()
                read += len(page.get("entry", []))
                url = next((link["url"] for link in page["link"] if link["relation"] == "next"),
                           None)  # fmt: skip
    latencies = time.perf_counter() - reading
    export_rate, read_rate = exported / seconds, read / latencies
    return [
        f"bulk export of {len(patients)} patients: {exported} resources in {seconds:.1f} s "
        f"({export_rate:.0f} resources/s), {downloaded / 1e6:.0f} MB of NDJSON",
        f"$everything pages (500 each), one reader: {read} resources in {latencies:.1f} s "
        f"({read_rate:.0f} resources/s)",
        f"export vs $everything: {export_rate / read_rate:.2f}x",
        f"server peak RSS: {before:.0f} MB started, {after:.0f} MB after the export",
    ]


if __name__ == "__main__":
    main()
