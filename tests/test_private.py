"""Patient data and secrets at rest, and the temporary Prefect server, as a second local user sees
them: the embedded default (store, Prefect's home with the key that decrypts block secrets, local
deliveries) and the server a command starts, tried as user `nobody`."""

from __future__ import annotations

import encodings.idna  # noqa: F401 - loaded here: the child as nobody cannot load modules
import json
import os
import pickle
import pwd
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.test_local_api import embedded_env

CANARY = "canary-secret-7f3b2c"

DRIVER = f"""
import sys
from patient_delivery.cli.common import prefect
prefect()
from patient_delivery.cli.demo import run_demo
from patient_delivery.settings import get_settings
run_demo(get_settings().home, 1, 0)
from prefect.blocks.system import Secret
Secret(value={CANARY!r}).save("canary", overwrite=True)
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    print("API", client.api_url, flush=True)
sys.stdin.read()
"""


def as_nobody(check: Callable[[], Any]) -> Any:
    """`check()` run in a forked child that has become user `nobody` (no exec, so nothing it
    needs must be readable by that user); its result."""
    return answer_of(*start_as_nobody(check))


def start_as_nobody(check: Callable[[], Any], close: tuple[int, ...] = ()) -> tuple[int, int]:
    """Fork a child that closes the descriptors `close`, becomes user `nobody` and runs
    `check()`; the child's pid and the descriptor its answer comes on (`answer_of`)."""
    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            for descriptor in (read, *close):
                os.close(descriptor)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            result: tuple[str, Any] = ("ok", check())
        except BaseException as exc:
            result = ("error", repr(exc))
        with os.fdopen(write, "wb") as out:
            pickle.dump(result, out)
        os._exit(0)
    os.close(write)
    return pid, read


def answer_of(pid: int, read: int) -> Any:
    """What the child `start_as_nobody` forked returned, once it has ended."""
    with os.fdopen(read, "rb") as source:
        kind, value = pickle.load(source)  # noqa: S301 - our own child's answer
    os.waitpid(pid, 0)
    assert kind == "ok", f"the check as nobody broke: {value}"
    return value


def readable(paths: list[Path]) -> list[str]:
    """Those of `paths` the current user can open (files) or list (folders)."""
    opened = []
    for path in paths:
        try:
            if path.is_dir():
                os.listdir(path)
            else:
                with open(path, "rb") as handle:
                    handle.read(1)
            opened.append(str(path))
        except OSError:
            continue
    return opened


def secrets_from(api_url: str) -> tuple[int, bool]:
    """Ask the server for every block document with its secrets; the status, and whether the
    canary came back."""
    request = urllib.request.Request(  # noqa: S310 - the loopback server under test
        f"{api_url.rstrip('/')}/block_documents/filter", method="POST",
        data=json.dumps({"include_secrets": True}).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, CANARY in response.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, CANARY in refused.read().decode()


@pytest.mark.security
def test_a_second_local_user_reads_no_file_of_the_embedded_default_and_no_secret_from_its_server(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test runs as root: it becomes user nobody to try the files")
    tmp_path.chmod(0o755)  # the test's own folder is open: only our modes protect the files
    home = tmp_path / "home"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], env=embedded_env(home), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        api_url = ""
        for line in driver.stdout:  # type: ignore[union-attr]
            if line.startswith("API "):
                api_url = line.split()[1]
                break
        assert api_url, "the driver did not start its temporary Prefect server"

        status, leaked = as_nobody(lambda: secrets_from(api_url))
        assert (status, leaked) == (401, False)  # while the server runs

        paths = [home, *home.rglob("*")]
        files = [p for p in paths if p.is_file()]
        assert {p.name for p in files} >= {"store.db", "prefect.db"}
        assert any(p.suffix == ".xml" for p in files)  # the demo's deliveries
        assert as_nobody(lambda: readable(paths)) == []
        loose = {str(p): oct(p.stat().st_mode & 0o777) for p in paths
                 if p.stat().st_mode & 0o077}  # fmt: skip
        assert loose == {}  # owner-only even where the home's own mode would not protect
    finally:
        driver.communicate(input="", timeout=120)


def test_a_store_other_users_can_read_gets_a_warning_with_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from patient_delivery.store.schema import create_store_engine

    made = tmp_path / "new" / "store.db"
    create_store_engine(f"sqlite:///{made}").dispose()
    assert oct(made.stat().st_mode & 0o777) == oct(0o600)
    assert oct(made.parent.stat().st_mode & 0o777) == oct(0o700)
    assert not caplog.records
    made.chmod(0o644)
    create_store_engine(f"sqlite:///{made}").dispose()
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert f"chmod -R go-rwx {made}" in warning.getMessage()
