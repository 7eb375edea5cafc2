"""Fault injection on loopback, the delivery invariant, and the figures the fault suite reports.

- `FaultProxy`: a TCP proxy (no toxiproxy or netem on these machines) that adds latency, caps
  bandwidth, resets connections after N bytes, or refuses the first K connections.
- `S3FaultProxy`: an HTTP proxy in front of an S3 server that answers chosen PUTs with S3
  errors (503 SlowDown, 500 InternalError, 403 AccessDenied, ...) and counts every PUT per key.
- `check_invariant`: compares the ledger with what a server really holds.
- `sigkill_once_files_arrive`: kill a delivery process in the middle of its run.
- `REPORT`: what the suite injected and found, printed at the end of the test session.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from patient_delivery.store import Store
from patient_delivery.store.models import Delivery, Disclosure
from tests.destination_contract import Remote

_LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: close() sends RST


def _reset(*ends: socket.socket) -> None:
    """Drop connections at once. `shutdown` first: a plain close does not wake the other pipe
    thread's blocked recv, and the peer would wait for its read timeout."""
    for end in ends:
        with contextlib.suppress(OSError):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            end.close()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of `target_port`, with faults that can change live.

    - `latency`: seconds added to every chunk, each way;
    - `bandwidth`: bytes per second per direction and connection;
    - `reset_after`: reset a connection once the client sent this many bytes, for the first
      `resets` connections (every connection when `resets` is None);
    - `refuse_first`: reset this many connections as soon as they are accepted.
    """

    def __init__(
        self,
        target_port: int,
        *,
        latency: float = 0.0,
        bandwidth: int | None = None,
        reset_after: int | None = None,
        resets: int | None = None,
        refuse_first: int = 0,
    ) -> None:
        self.target_port = target_port
        self.latency = latency
        self.bandwidth = bandwidth
        self.reset_after = reset_after
        self.resets = resets
        self.refuse_first = refuse_first
        self.connections = 0
        self.open = 0
        self.peak = 0
        """Most connections open through the proxy at once (as the server sees them)."""
        self._open_clients: dict[socket.socket, threading.Event] = {}
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
            if number <= self.refuse_first:
                self.injected["refused connection"] += 1
                _reset(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _reset(client)  # the server is down: so is the proxy, for this connection
                continue
            server.settimeout(None)
            cut = self.reset_after if self.resets is None or number <= self.resets else None
            ended = threading.Event()
            with self._lock:
                self._count_ended()
                self.open += 1
                self.peak = max(self.peak, self.open)
                self._open_clients[client] = ended
            for source, sink, limit in ((client, server, cut), (server, client, None)):
                threading.Thread(
                    target=self._pipe, args=(source, sink, limit, ended), daemon=True
                ).start()

    def _pipe(
        self, source: socket.socket, sink: socket.socket, limit: int | None, ended: threading.Event
    ) -> None:
        sent = 0
        chunk = 65536 if not self.bandwidth else max(1024, min(65536, self.bandwidth // 50))
        try:
            while data := source.recv(chunk):
                if limit is not None and sent + len(data) > limit:
                    sink.sendall(data[: limit - sent])
                    self.injected["connection reset mid-transfer"] += 1
                    break
                if self.latency:
                    time.sleep(self.latency)
                sink.sendall(data)
                sent += len(data)
                if self.bandwidth:
                    time.sleep(len(data) / self.bandwidth)
        except OSError:
            pass
        finally:
            _reset(source, sink)
            with self._lock:
                if not ended.is_set():  # the first of the connection's two pipes to end
                    ended.set()
                    self.open -= 1
                self._open_clients = {
                    c: e for c, e in self._open_clients.items() if c is not source
                }

    def _count_ended(self) -> None:
        """Count as ended the connections whose client has already closed: a client that closes
        one connection and opens the next sends the close first, but this proxy's threads may
        see the new connection before the old one's pipe wakes up."""
        for client, ended in list(self._open_clients.items()):
            if ended.is_set():
                continue
            try:
                peeked = client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue  # nothing to read: still open
            except OSError:
                peeked = b""
            if peeked == b"":  # the client has closed it
                ended.set()
                self.open -= 1

    def shaped(self) -> None:
        """Count the latency and bandwidth faults of this proxy's connections as injected."""
        if self.latency:
            self.injected["added latency (connections)"] += self.connections
        if self.bandwidth:
            self.injected["bandwidth cap (connections)"] += self.connections

    def stop(self) -> None:
        self._stopped.set()
        self.listener.close()
        self._thread.join(timeout=2)


S3_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchBucket", "The specified bucket does not exist"),
    400: ("BadDigest", "The SHA256 you specified did not match the calculated checksum."),
}


class S3FaultProxy:
    """An HTTP proxy in front of an S3 server that fails chosen PUTs the way S3 does.

    `script` holds statuses for the next PUTs, in order; `always` fails every PUT with one
    status; `posts_fail` every POST (STS's AssumeRole, when the proxy is the STS endpoint).
    Other requests, and PUTs once the script is spent, go to the server unchanged.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.script: deque[int] = deque()
        self.always: int | None = None
        self.posts_fail: int | None = None
        self.posts = 0
        self.puts: Counter[str] = Counter()
        """PUT requests per object key: the documents' and the runs' manifests."""
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return  # silent: the test output stays readable

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status = proxy._planned(self.command, self.path)
                if status is not None:
                    code, message = S3_ERRORS[status]
                    payload = (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>{message}</Message></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("expect", "connection")}  # fmt: skip
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                except OSError:
                    self.close_connection = True
                    _reset(self.connection)
                    return
                finally:
                    upstream.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def document_puts(self) -> Counter[str]:
        """PUT requests per document (the runs' manifests left out)."""
        return Counter({key: n for key, n in self.puts.items() if MANIFESTS not in key})

    def _planned(self, method: str, path: str) -> int | None:
        if method == "POST":
            with self._lock:
                self.posts += 1
                return self.posts_fail
        if method != "PUT":
            return None
        with self._lock:
            self.puts[path.split("?")[0]] += 1
            status = self.script.popleft() if self.script else self.always
            if status is not None:
                self.injected[f"S3 {status} {S3_ERRORS[status][0]}"] += 1
            return status

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def sigkill_once_files_arrive(
    process: subprocess.Popen[bytes],
    root: Path,
    files: int,
    holding: Callable[[], bool] | None = None,
    seconds: float = 180,
) -> None:
    """SIGKILL a delivery process (started in its own session) and its children as soon as
    `files` files are in `root` and, if given, `holding()` is true: a crash in the middle of
    its run.

    `holding` is checked with the process group stopped (SIGSTOP), so what it sees is still
    true at the kill: a run caught between two pages, holding no claims, is let go on and
    caught again a moment later.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            error = process.stderr.read().decode()[-3000:] if process.stderr else ""
            raise AssertionError(f"the delivery ended before it could be killed: {error}")
        if len(list(root.rglob("*.*"))) >= files:
            os.killpg(process.pid, signal.SIGSTOP)
            if holding is None or holding():
                break
            os.killpg(process.pid, signal.SIGCONT)
        time.sleep(0.02)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        arrived = len(list(root.rglob("*.*")))
        raise AssertionError(f"not caught mid-run within {seconds:.0f} s ({arrived} files)")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@dataclass
class Figures:
    """The invariant, counted: what a server holds against what the ledger says."""

    rows: int = 0
    delivered: int = 0
    owed: int = 0
    lost: int = 0
    duplicated: int = 0
    partial: int = 0
    leftovers: int = 0


MANIFESTS = "/_manifests/"
"""Where runs write their manifests (the default manifest template)."""


def documents(names: list[str]) -> list[str]:
    """The delivered documents among a destination's file names (not the runs' manifests)."""
    return [name for name in names if MANIFESTS not in name]


def check_invariant(store: Store, remotes: Mapping[str, Remote]) -> Figures:
    """Check every (document version, destination) of `remotes` against the server's files.

    A delivered row must have its file, whole (the recorded SHA-256), at its final path: else
    it is *lost*, or *partial* if other bytes sit there. A row not yet delivered is *owed*
    (the next run sends it). A file that is no row's path but holds a version's bytes is a
    *duplicate*, and so is a second disclosure of one version to one destination. A row
    *replaced* by a newer version at its path counts as lost unless that version is delivered
    there. Temporary
    files (`*.partial`) are *leftovers*: never at a final path, but counted.
    """
    figures = Figures()
    with store.session() as session:
        rows = session.scalars(
            select(Delivery).where(
                Delivery.destination.in_(list(remotes)),
                Delivery.status.not_in(["superseded", "replaced"]),
            )
        ).all()
        replaced = session.scalars(
            select(Delivery).where(
                Delivery.destination.in_(list(remotes)), Delivery.status == "replaced"
            )
        ).all()
        sends = session.execute(
            select(Disclosure.destination, Disclosure.version_id, func.count())
            .where(Disclosure.destination.in_(list(remotes)))
            .group_by(Disclosure.destination, Disclosure.version_id)
        ).all()
        contents = {
            row.sha256: row.id for row in session.scalars(select(Delivery)).all() if row.sha256
        }
    figures.duplicated += sum(count - 1 for _, _, count in sends if count > 1)
    paths: dict[str, set[str]] = {reference: set() for reference in remotes}
    for row in rows:
        figures.rows += 1
        if row.path:
            paths[row.destination].add(row.path)
        if row.status != "delivered":
            figures.owed += 1
            continue
        body = remotes[row.destination].read(row.path or "")
        if body is None:
            figures.lost += 1
        elif hashlib.sha256(body).hexdigest() != row.sha256:
            figures.partial += 1
        else:
            figures.delivered += 1
    # A replaced row's path must hold the newer version of its document that overwrote it.
    holders = {(r.destination, r.path, r.patient_id, r.data_type) for r in rows
               if r.status == "delivered"}  # fmt: skip
    for row in replaced:
        if (row.destination, row.path, row.patient_id, row.data_type) not in holders:
            figures.lost += 1
    for reference, remote in remotes.items():
        for name in remote.names():
            if MANIFESTS in name and name.endswith(".json"):  # must list only whole files
                listed = json.loads(remote.read(name) or b"{}").get("output", [])
                figures.partial += sum(  # a file a later version replaced holds that version
                    hashlib.sha256(remote.read(entry["url"]) or b"").hexdigest() not in contents
                    for entry in listed
                )
            elif name.rsplit("/", 1)[-1].endswith(".partial"):
                figures.leftovers += 1
            elif name not in paths[reference]:
                body = remote.read(name) or b""
                if hashlib.sha256(body).hexdigest() in contents:
                    figures.duplicated += 1
                else:
                    figures.partial += 1
    return figures


@dataclass
class FaultReport:
    """The suite's figures, printed by `pytest_terminal_summary` (tests/conftest.py)."""

    faults: Counter[str] = field(default_factory=Counter)
    scenarios: list[tuple[str, Figures]] = field(default_factory=list)
    bad_inputs_refused: int = 0
    security_tried: int = 0
    security_refused: int = 0
    canary_places: int = 0
    canary_hits: int = 0

    def record(self, scenario: str, figures: Figures, injected: Mapping[str, int]) -> None:
        self.scenarios.append((scenario, figures))
        self.faults.update(injected)

    def shipped(self) -> dict[str, object]:
        """What a test worker found (pytest-xdist): its scenarios, faults and canary search.
        The bad-input and security counts are not shipped: the controlling process counts the
        reports of every worker itself."""
        return {
            "faults": dict(self.faults),
            "scenarios": [(name, asdict(figures)) for name, figures in self.scenarios],
            "canary_places": self.canary_places,
            "canary_hits": self.canary_hits,
        }

    def add_shipped(self, found: Mapping[str, Any]) -> None:
        """Add what a worker found (`shipped`)."""
        self.faults.update(found["faults"])
        self.scenarios += [(name, Figures(**figures)) for name, figures in found["scenarios"]]
        self.canary_places += found["canary_places"]
        self.canary_hits += found["canary_hits"]

    def lines(self) -> list[str]:
        if not (self.scenarios or self.bad_inputs_refused or self.security_tried
                or self.canary_places):  # fmt: skip
            return []
        total = Figures()
        for _, figures in self.scenarios:
            for name in ("delivered", "lost", "duplicated", "partial", "leftovers"):
                setattr(total, name, getattr(total, name) + getattr(figures, name))
        lines = [f"{'scenario':58} delivered lost dup partial leftover"]
        for scenario, f in self.scenarios:
            lines.append(
                f"{scenario[:58]:58} {f.delivered:9} {f.lost:4} {f.duplicated:3} "
                f"{f.partial:7} {f.leftovers:8}"
            )
        lines += [
            "",
            f"faults injected:              {sum(self.faults.values())} "
            f"({', '.join(f'{n} {k}' for k, n in sorted(self.faults.items()))})",
            f"documents delivered:          {total.delivered}",
            f"lost:                         {total.lost}",
            f"duplicated by retries:        {total.duplicated}",
            f"partial files at final paths: {total.partial}",
            f"temporary files left behind:  {total.leftovers} (never at a final path)",
            f"bad inputs tried and refused: {self.bad_inputs_refused}",
            f"security cases tried / refused: {self.security_tried} / {self.security_refused}",
            f"canary hits:                  {self.canary_hits} "
            f"(searched {self.canary_places} places)",
        ]
        return lines


REPORT = FaultReport()
