"""A data engineer's mistakes, each answered in one line with a non-zero exit, before anything
runs: names that do not exist, a destination name taken, a re-delivery without a scope, and a
Prefect API that cannot be reached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loopback.servers import free_port
from patient_delivery.store import Store
from tests.test_cli import CCDA, run

pytestmark = pytest.mark.bad_input

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def world(store: Store, tmp_path: Path) -> str:
    run("org", "add", "Acme", "--id", "acme")
    run("project", "add", "acme", "Study", "--id", "study")
    patient = run("patient", "add", "study").strip()
    run("document", "put", patient, "ccda", "-", input=CCDA)
    return patient


def one_line(out: str, *expected: str) -> None:
    lines = out.strip().splitlines()
    assert len(lines) == 1 and all(e in lines[0] for e in expected), out


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["deliver", "--destination", "local-destination/nope"], "no project delivers to"),
        (["deliver", "--patient", "hx_nope"], "no patient 'hx_nope'"),
        (["deliveries", "--project", "nosuch"], "no project 'nosuch'"),
        (["deliveries", "--patient", "hx_nope"], "no patient 'hx_nope'"),
        (["disclosures", "--patient", "hx_nope"], "no patient 'hx_nope'"),
        (["subscriptions", "--project", "nosuch"], "no project 'nosuch'"),
        (["project", "list", "nosuchorg"], "no organization 'nosuchorg'"),
        (["redeliver", "--full"], "--full: needs --project and --destination"),
        (["redeliver", "--destination", "local-destination/nope"], "no project delivers to"),
        (["deliver", "--watch"], "--watch: only with --deployment"),
        (["deliver", "--name", "foo"], "--name: only with --deployment"),
        (["backfill", "--watch"], "--watch: only with --deployment"),
        (["redeliver", "--name", "foo"], "--name: only with --deployment"),
        (
            ["document", "put", "hx_nope", "ccda", "missing.xml"],
            "FILE: cannot read missing.xml: No such file or directory",
        ),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, list) else None,
)
def test_a_name_that_does_not_exist_is_one_line_and_exit_2(
    world: str, command: list[str], expected: str
) -> None:
    one_line(run(*command, code=2), expected)


@pytest.mark.usefixtures("prefect_api")
def test_a_destination_name_taken_says_how_to_replace_it(store: Store, tmp_path: Path) -> None:
    run("destination", "local", "taken", "--root", str(tmp_path / "a"))
    out = run("destination", "local", "taken", "--root", str(tmp_path / "b"), code=2)
    one_line(out, "local-destination/taken exists already; --overwrite replaces it")
    assert "overwrite=True" not in out
    run("destination", "local", "taken", "--root", str(tmp_path / "b"), "--overwrite")


def test_an_unreachable_prefect_api_is_one_line(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{closed}/api",
           "PATIENT_DELIVERY_HOME": str(tmp_path), "COLUMNS": "200"}  # fmt: skip
    done = subprocess.run(
        [str(Path(sys.executable).parent / "patient-delivery"), "destination", "list"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert (
        len(lines) == 1
        and f"cannot reach the Prefect API at http://127.0.0.1:{closed}/api" in (lines[0])
    ), done.stderr[-3000:]


@pytest.mark.usefixtures("prefect_api")
def test_a_relative_root_is_refused_as_the_ui_refuses_it(store: Store) -> None:
    """`--root relative/x` was saved as an absolute folder made from wherever the command ran;
    the block refuses it as the UI's form does, without pydantic's "Value error," prefix."""
    out = run("destination", "local", "relative", "--root", "relative/x", code=2)
    one_line(out, "root: must be an absolute folder")
    assert "Value error" not in out
    assert "local-destination/relative" not in run("destination", "list", "--json")


@pytest.mark.usefixtures("prefect_api")
def test_an_sftp_root_with_a_parent_folder_is_refused(store: Store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`--root ../outside` was saved and listed as `~/outside`: a folder beside the one the
    organization chose."""
    monkeypatch.setenv("ORG_SFTP_PASSWORD", "secret-3f1a")
    out = run("destination", "sftp", "beside", "--host", "sftp.example", "--username", "u",
              "--password-env", "ORG_SFTP_PASSWORD", "--host-key", "SHA256:" + "A" * 43,
              "--root", "../outside", code=2)  # fmt: skip
    one_line(out, "root: must not hold a `..` folder")
    assert "secret-3f1a" not in out and "beside" not in run("destination", "list", "--json")
