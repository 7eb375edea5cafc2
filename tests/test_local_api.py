"""The embedded setup's temporary Prefect API: each command that needs Prefect starts its own on
loopback, waits for it, and stops it when it ends, even killed; one that cannot start is one
line, exit 1."""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from patient_delivery import private
from patient_delivery.prefect_setup import LocalApi

CLI = str(Path(sys.executable).parent / "patient-delivery")


DRIVER = """
import os, sys
from patient_delivery.cli.common import prefect
prefect()
print(os.environ["PREFECT_API_URL"], flush=True)
sys.stdin.read()
"""
"""A command that holds its API until its stdin closes."""


def embedded_env(home: Path) -> dict[str, str]:
    """The embedded setup: no Prefect of the user's, our home."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "PATIENT_DELIVERY_"))}  # fmt: skip
    env.update({"PATIENT_DELIVERY_HOME": str(home), "HOME": str(home.parent)})
    return env


def embedded(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`patient-delivery ARGS` in the embedded setup."""
    return subprocess.run(
        [CLI, *args], env=embedded_env(home), capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip


def answers(url: str) -> bool:
    """Whether a Prefect API answers at `url`; False once its port refuses connections."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:  # noqa: S310
            return response.status == 200
    except urllib.error.URLError as refused:
        assert isinstance(refused.reason, ConnectionRefusedError), refused
        return False


def test_a_command_starts_its_own_api_and_stops_it_when_it_ends(tmp_path: Path) -> None:
    home = tmp_path / "home"
    listed = embedded(home, "destination", "list")
    assert listed.returncode == 0, listed.stderr

    log = home / "prefect" / "local-api.log"
    assert oct(log.stat().st_mode & 0o777) == oct(0o600)
    [url] = set(re.findall(r"PREFECT_API_URL=(http://127\.0\.0\.1:\d+/api)", log.read_text()))
    assert not answers(url), "the temporary API still answers after its command ended"


def test_a_command_killed_takes_its_api_with_it(tmp_path: Path) -> None:
    command = subprocess.Popen(
        [sys.executable, "-c", DRIVER], env=embedded_env(tmp_path / "home"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = command.stdout.readline().strip()  # type: ignore[union-attr]
        assert answers(url)
    finally:
        command.kill()  # no atexit, no `stop`: only the kernel can end the server now
        command.wait()
    deadline = time.monotonic() + 30
    while answers(url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not answers(url), "the temporary API outlived the command that started it"


def test_an_api_that_cannot_start_is_one_line_naming_its_log(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert embedded(home, "destination", "list").returncode == 0  # Prefect's home made
    (home / "prefect" / "prefect.db").write_bytes(b"not a database")

    failed = embedded(home, "destination", "list")
    assert failed.returncode == 1
    log = home / "prefect" / "local-api.log"
    [line] = failed.stderr.strip().splitlines()
    assert re.fullmatch(
        rf"error: Prefect's temporary API stopped while starting \(exit \d+\); its log: {log}",
        line,
    )
    assert "Traceback" not in failed.stderr


def bind_refused(port: int) -> str:
    """Try to take `port` on loopback (bind and listen, as a squatter would); the error's name,
    or "bound" if it worked."""
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
        except OSError as refused:
            return type(refused).__name__ if refused.errno != errno.EADDRINUSE else "EADDRINUSE"
    return "bound"


def listening(port: int) -> bool:
    """Whether any socket listens on TCP `port` of this machine (from /proc/net/tcp)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "0A":  # 0A: LISTEN
                return True
    return False


def command_lines() -> list[str]:
    """Every process's command line, as any local user can read them."""
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
    return lines


@pytest.mark.security
def test_another_local_user_cannot_take_the_api_port_or_read_it_off_a_command_line(
    tmp_path: Path,
) -> None:
    from tests.test_private import as_nobody

    password = "patient-delivery:sentinel-3c9e1f"
    os.environ["PREFECT_SERVER_API_AUTH_STRING"] = password
    try:
        api = LocalApi(private.make_folder(tmp_path / "prefect"))
    finally:
        del os.environ["PREFECT_SERVER_API_AUTH_STRING"]
    try:
        # Before the server has even started, and while it runs, the port is this command's.
        assert as_nobody(lambda: bind_refused(api.port)) == "EADDRINUSE"
        api.wait(timeout=120)
        assert as_nobody(lambda: bind_refused(api.port)) == "EADDRINUSE"
        seen = [line for line in as_nobody(command_lines)
                if str(api.port) in line or password in line]  # fmt: skip
        assert seen == []
        # A server that died leaves the port with the command, not free for the taking.
        api.process.kill()
        api.process.wait()
        assert as_nobody(lambda: bind_refused(api.port)) == "EADDRINUSE"
    finally:
        api.stop()
    # Given up once the command stops it: nothing listens there any more. (Binding it to find
    # out would race other processes' outgoing connections, which may take the number now.)
    assert not listening(api.port)
