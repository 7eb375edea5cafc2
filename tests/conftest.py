"""Shared fixtures: a fresh store per test, the real-world fixtures, a Prefect test server."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Before Prefect is imported anywhere: no analytics (no network here), a private Prefect home,
# and enough time for the temporary server to start on a 2-core machine.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# A pytest-xdist worker has COLUMNS=80 in its environment, which the CLI's consoles would keep
# as their width for good; each test sets the width it renders at (COLUMNS per invocation).
os.environ.pop("COLUMNS", None)

from patient_delivery.settings import get_settings
from patient_delivery.store import Store, close_stores, open_store

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The real-world data in `tests/fixtures` (HL7 C-CDA examples, a Synthea bulk export)."""
    return FIXTURES


STORE_BACKENDS = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `both_stores` run once on SQLite and once on PostgreSQL."""
    if "store" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_stores"):
        metafunc.parametrize("store", STORE_BACKENDS, indirect=True)


@pytest.fixture
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Store]:
    """A new store (SQLite unless parametrized), also the one the delivery flow opens."""
    backend = getattr(request, "param", "sqlite")
    if backend == "postgresql":
        url = request.getfixturevalue("postgres").database()
    else:
        url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("PATIENT_DELIVERY_STORE_URL", url)
    monkeypatch.setenv("PATIENT_DELIVERY_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield open_store(url)
    close_stores()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A temporary Prefect server and database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def sshd():  # type: ignore[no-untyped-def]
    """OpenSSH sshd on loopback with an SFTP-only test user."""
    from loopback.servers import SshServer

    server = SshServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto():  # type: ignore[no-untyped-def]
    """moto in server mode for S3, STS and IAM, with authorization enforced."""
    from loopback.servers import MotoServer

    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres():  # type: ignore[no-untyped-def]
    """PostgreSQL on loopback; each test that uses it gets its own database."""
    from loopback.servers import PostgresServer

    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweed():  # type: ignore[no-untyped-def]
    """SeaweedFS as a real S3 server (it verifies checksums)."""
    from loopback.servers import SeaweedServer

    server = SeaweedServer("deliveries")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sftp_servers():  # type: ignore[no-untyped-def]
    """The SFTP servers besides OpenSSH's (`loopback.servers.SFTP_SERVERS`), each started the
    first time a test asks for it by name, and stopped at the end of the session."""
    from loopback.servers import SFTP_SERVERS, SftpServer

    started: dict[str, SftpServer] = {}

    def get(name: str) -> SftpServer:
        if name not in started:
            started[name] = SFTP_SERVERS[name]()
        elif started[name].process.poll() is not None:
            started[name].start()  # a test crashed it and failed before restarting it
        return started[name]

    yield get
    for server in started.values():
        server.stop()


@pytest.fixture(scope="session")
def pgp_keys():  # type: ignore[no-untyped-def]
    """OpenPGP keys made by GnuPG's `gpg`: the receiving organization's (whose keyring decrypts
    what arrived), ours to sign with, and keys that must be refused."""
    from tests.gnupg import make_keys

    keys, keyrings = make_keys()
    yield keys
    for keyring in keyrings:
        keyring.close()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count the bad-input cases that passed (each was refused as it should be), and the
    security cases tried and refused (an attack that got through fails its test)."""
    from tests.faults import REPORT

    if report.when == "call" and report.passed and "bad_input" in report.keywords:
        REPORT.bad_inputs_refused += 1
    if report.when == "call" and "security" in report.keywords:
        REPORT.security_tried += 1
        REPORT.security_refused += report.passed


EXCLUSIVE = {"sshd": "openssh"}
"""Session fixtures that hold something of the whole machine (the OpenSSH server's test user,
`loopback.servers.SFTP_USER`): every test using one runs on the same pytest-xdist worker."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group the tests that need a machine-wide fixture (`EXCLUSIVE`) on one worker
    (`--dist loadgroup`); every other test goes wherever a worker is free."""
    for item in items:
        for fixture, group in EXCLUSIVE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))
                break


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A pytest-xdist worker ships its fault figures to the controlling process."""
    from tests.faults import REPORT

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["fault_report"] = REPORT.shipped()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """The controlling process adds a finished worker's fault figures to its own."""
    from tests.faults import REPORT

    found = getattr(node, "workeroutput", {}).get("fault_report")
    if found:
        REPORT.add_shipped(found)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault suite's figures: faults injected, delivered, lost, duplicated, ..."""
    from tests.faults import REPORT

    lines = REPORT.lines()
    if lines:
        terminalreporter.section("faults and bad input: figures")
        for line in lines:
            terminalreporter.write_line(line)
