"""The block commands on the embedded default, as the README runs them: a clean environment (no
`PREFECT_API_URL`, no `PREFECT_HOME`, an empty `HOME`), each block saved and listed, while a
second local user poses as any Prefect server whose port a process announces and receives
nothing."""

from __future__ import annotations

import encodings.idna  # noqa: F401 - loaded here: the child as nobody cannot load modules
import os
import re
import select
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.test_local_api import CLI, embedded_env
from tests.test_private import answer_of, start_as_nobody

ANNOUNCED = re.compile(rb"(?:uvicorn|prefect).*--port\x00?\s*(\d+)|--port\x00(\d+).*uvicorn")
"""A command line that starts a Prefect server or uvicorn on a port it names."""


HEALTHY = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
    b"connection: close\r\n\r\n{}"
)
"""What the posing server answers to anything: a healthy API's 200."""


def _announced_ports(ours: int, before: frozenset[int]) -> set[int]:
    """The ports that the command line of a process started by `ours` (the test) since
    `before`, as any local user reads it, says a Prefect server or uvicorn listens on. (Other
    processes are the test session's own servers, or another test worker's.)"""
    ports = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in before:
            continue
        if not _descends_from(int(entry.name), ours):
            continue
        try:
            line = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        for found in ANNOUNCED.finditer(line):
            ports.add(int(found.group(1) or found.group(2)))
    return ports


def _descends_from(pid: int, ancestor: int) -> bool:
    """Whether process `pid` was started by `ancestor` (or a process it started)."""
    for _ in range(64):
        if pid == ancestor:
            return True
        try:
            fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return False
        pid = int(fields[1])  # the parent, after the state
        if pid <= 1:
            return False
    return False


def _pose_as_servers(stop: int, ours: int, before: frozenset[int]) -> dict[str, list[str]]:
    """As the second user: until `stop` is readable, take every port announced by a process not
    in `before` first (bind and listen on it), answer each request as a healthy Prefect API
    would, and keep what arrives."""
    listeners: dict[int, socket.socket] = {}
    announced: list[str] = []
    received: list[str] = []
    while not select.select([stop], [], [], 0)[0]:
        for port in _announced_ports(ours, before) - {int(p) for p in announced}:
            announced.append(str(port))
            squatter = socket.socket()
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                squatter.bind(("127.0.0.1", port))
                squatter.listen()
            except OSError:
                squatter.close()
                continue
            listeners[port] = squatter
        ready, _, _ = select.select(list(listeners.values()), [], [], 0.02)
        for listener in ready:
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(2)
                try:
                    request = connection.recv(65536)
                    connection.sendall(HEALTHY)
                except OSError:
                    continue
                received.append(request.decode("latin-1").split("\r\n", 1)[0])
    for listener in listeners.values():
        listener.close()
    return {"announced": announced, "received": received}


@contextmanager
def second_user_posing_as_servers() -> Iterator[dict[str, list[str]]]:
    """`nobody`, in a forked child, posing as every Prefect server announced while the block
    runs; the dict is filled with what it saw once the block ends."""
    ours = os.getpid()
    before = frozenset(int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    stop_read, stop_write = os.pipe()
    pid, answer = start_as_nobody(lambda: _pose_as_servers(stop_read, ours, before),
                                  close=(stop_write,))  # fmt: skip
    os.close(stop_read)
    seen: dict[str, list[str]] = {}
    try:
        yield seen
    finally:
        os.close(stop_write)  # the child's cue to stop and answer
        seen.update(answer_of(pid, answer))


def host_key() -> str:
    """A server's public host key as known_hosts writes it (`ssh-ed25519 AAAA...`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(serialization.Encoding.OpenSSH,
                               serialization.PublicFormat.OpenSSH).decode()  # fmt: skip


def run(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`patient-delivery ARGS` in a clean environment: no Prefect of the user's, an empty HOME
    (beside the store's home, made once)."""
    empty = home.parent / "empty-home"
    empty.mkdir(exist_ok=True)
    return subprocess.run(
        [CLI, *args], env={**embedded_env(home), "HOME": str(empty), **env}, capture_output=True,
        text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.mark.security
def test_block_commands_save_through_the_commands_own_api_and_nobody_elses(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    folder = tmp_path / "acme"
    commands = [
        ("org", "add", "Acme Research", "--id", "acme"),
        ("project", "add", "acme", "Cardiology study", "--id", "cardio"),
        ("destination", "local", "acme-folder", "--root", str(folder),
         "--template", "{projectId}/{externalId}"),
        ("destination", "sftp", "acme-sftp", "--host", "127.0.0.1", "--port", "2222",
         "--username", "healthex", "--password-env", "ORG_SFTP_PASSWORD",
         "--host-key", f"[127.0.0.1]:2222 {host_key()}",
         "--root", "/incoming"),
        ("destination", "s3", "acme-s3", "--bucket", "org-bucket",
         "--role-arn", "arn:aws:iam::222222222222:role/healthex-writer",
         "--external-id-env", "ORG_EXTERNAL_ID", "--region", "us-east-1",
         "--template", "incoming/{projectId}/{externalId}/{dataType}-{timestamp}"),
        ("destination", "test", "local-destination/acme-folder"),
        ("subscribe", "cardio", "local-destination/acme-folder", "--types", "ccda,fhir"),
    ]  # fmt: skip
    secrets = {"ORG_SFTP_PASSWORD": "sftp-password-5e1d", "ORG_EXTERNAL_ID": "external-id-9a4c"}
    with second_user_posing_as_servers() as seen:
        done = [run(home, *command, **secrets) for command in commands]
        listed = run(home, "destination", "list", "--json")
        subscribed = run(home, "subscriptions", "--json")
    assert seen["announced"] == [], "a Prefect server's port was on a command line"
    assert seen["received"] == [], "a request reached the second user's listener"
    for command, result in zip(commands, done, strict=True):
        assert result.returncode == 0, (command, result.stderr)
        assert "Traceback" not in result.stderr
        assert not any(secret in result.stdout + result.stderr for secret in secrets.values())
    assert listed.returncode == 0, listed.stderr
    for reference in ("local-destination/acme-folder", "sftp-destination/acme-sftp",
                      "s3-destination/acme-s3"):  # fmt: skip
        assert reference in listed.stdout
    assert "local-destination/acme-folder" in subscribed.stdout, subscribed.stderr


def test_a_command_that_imported_prefect_first_is_refused(tmp_path: Path) -> None:
    """Prefect imported before its local defaults would read the settings then and start its own
    temporary server: the defaults refuse to be applied after it, loudly."""
    import sys

    driver = ("import prefect\nfrom patient_delivery.cli.common import start_prefect\n"
              "start_prefect()\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", driver], env=embedded_env(tmp_path / "home"),
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode != 0
    assert "PrefectImportedTooEarly: Prefect was imported before its local defaults" in done.stderr
