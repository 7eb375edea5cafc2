"""The embedded setup's temporary Prefect API: each command that needs Prefect starts its own on
loopback, waits for it, and stops it when it ends; one that cannot start is one line, exit 1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

CLI = str(Path(sys.executable).parent / "patient-delivery")


def embedded(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`patient-delivery ARGS` in the embedded setup: no Prefect of the user's, our home."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "PATIENT_DELIVERY_"))}  # fmt: skip
    env.update({"PATIENT_DELIVERY_HOME": str(home), "HOME": str(home.parent)})
    return subprocess.run(
        [CLI, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_a_command_starts_its_own_api_and_stops_it_when_it_ends(tmp_path: Path) -> None:
    home = tmp_path / "home"
    listed = embedded(home, "destination", "list")
    assert listed.returncode == 0, listed.stderr

    log = home / "prefect" / "local-api.log"
    assert oct(log.stat().st_mode & 0o777) == oct(0o600)
    [url] = set(re.findall(r"PREFECT_API_URL=(http://127\.0\.0\.1:\d+/api)", log.read_text()))
    try:
        urllib.request.urlopen(f"{url}/health", timeout=5)  # noqa: S310 - loopback
    except urllib.error.URLError as refused:
        assert isinstance(refused.reason, ConnectionRefusedError)
    else:
        raise AssertionError("the temporary API still answers after its command ended")


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
