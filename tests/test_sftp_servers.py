"""The SFTP destination against SFTP servers other than OpenSSH's, as organizations run them:
AsyncSSH's (OpenSSH's extensions), one on Node's ssh2 (version 3, no extension, renames that
replace) and a strict version 3 server (no extension, no SETSTAT, no rename over an existing
file, a chroot whose root `stat` will not describe). Every case of the destination contract runs
against each, and so do a refused login, an unknown host key, and the landing each gets."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from loopback.servers import SFTP_PASSWORD, SFTP_SERVERS, SFTP_USER, SftpServer
from patient_delivery.blocks.contract import TerminalDeliveryError
from patient_delivery.blocks.sftp import SftpDestination
from patient_delivery.store import Store
from patient_delivery.store.models import Delivery
from tests.destination_contract import BODY, DestinationContract, connect, sha
from tests.test_local_destination import FolderRemote

CCDA = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>%d</title></ClinicalDocument>'

LANDING = {"asyncssh": "posix-rename", "node-ssh2": "rename", "strict-v3": "rename"}
"""The landing `auto` chooses on each server, from what it offers."""


@pytest.fixture(params=sorted(SFTP_SERVERS))
def server(request: pytest.FixtureRequest, sftp_servers: Callable[[str], SftpServer]) -> SftpServer:
    return sftp_servers(request.param)


@pytest.fixture
def folder(server: SftpServer) -> tuple[Path, str]:
    return server.make_folder(f"in-{uuid.uuid4().hex[:10]}")


def block(server: SftpServer, root: str, **overrides: object) -> SftpDestination:
    fields: dict[str, object] = {
        "host": "127.0.0.1", "port": server.port, "username": SFTP_USER,
        "password": SFTP_PASSWORD, "host_keys": [server.host_key_line()], "root": root,
        "connect_timeout": 5, "operation_timeout": 10,
    }  # fmt: skip
    return SftpDestination(**{**fields, **overrides})


@pytest.fixture
def destination(server: SftpServer, folder: tuple[Path, str]) -> SftpDestination:
    return block(server, folder[1])


@pytest.fixture
def remote(folder: tuple[Path, str]) -> FolderRemote:
    return FolderRemote(folder[0])


@pytest.fixture
def secrets() -> list[str]:
    return [SFTP_PASSWORD]


class TestContractOnEveryServer(DestinationContract):
    pass


def test_each_server_gets_the_landing_it_allows_and_a_changed_file_replaces_the_old(
    server: SftpServer, folder: tuple[Path, str]
) -> None:
    on_disk, root = folder
    with block(server, root).open_session() as session:
        assert session.landing == LANDING[server.name]
        first = session.upload("p/doc.xml", BODY, sha(BODY))
        changed = BODY.replace(b"x", b"y")
        second = session.upload("p/doc.xml", changed, sha(changed))
    assert first.landing == second.landing == LANDING[server.name]
    assert (on_disk / "p" / "doc.xml").read_bytes() == changed
    assert sorted(p.name for p in (on_disk / "p").iterdir()) == ["doc.xml"]


def test_landing_directly_writes_the_final_name_and_leaves_nothing_else(
    server: SftpServer, folder: tuple[Path, str]
) -> None:
    on_disk, root = folder
    with block(server, root, landing="direct").open_session() as session:
        for content in (BODY, BODY[:1000]):  # the second, shorter, over the first
            receipt = session.upload("d/doc.xml", content, sha(content))
    assert receipt.landing == "direct" and (on_disk / "d" / "doc.xml").read_bytes() == BODY[:1000]
    assert sorted(p.name for p in (on_disk / "d").iterdir()) == ["doc.xml"]


@pytest.mark.bad_input
def test_a_refused_login_is_terminal_and_says_so(
    server: SftpServer, folder: tuple[Path, str]
) -> None:
    wrong = block(server, folder[1], password=SecretStr("not-the-password"))
    with pytest.raises(TerminalDeliveryError, match="was refused: check the username"):
        connect(wrong)


@pytest.mark.security
def test_an_unknown_host_key_is_refused_before_anything_is_sent(
    server: SftpServer, folder: tuple[Path, str]
) -> None:
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    with pytest.raises(TerminalDeliveryError, match="does not match the pinned key"):
        connect(block(server, folder[1], host_keys=[other]))
    assert list(folder[0].iterdir()) == []


def test_a_server_that_limits_open_files_gets_fewer_at_once_and_every_file(
    sftp_servers: Callable[[str], SftpServer],
) -> None:
    from loopback.strict_sftp import MOST_OPEN
    from patient_delivery.blocks.contract import Upload

    server = sftp_servers("strict-v3")
    on_disk, root = server.make_folder(f"limit-{uuid.uuid4().hex[:10]}")
    uploads = [(n, Upload(f"l/{n}.xml", BODY, sha(BODY))) for n in range(12)]
    with block(server, root, files_in_flight=8).open_session() as session:
        results = dict(session.upload_many(uploads))
        assert session.files_in_flight <= MOST_OPEN
    assert all(r.size == len(BODY) for r in results.values()), results  # type: ignore[union-attr]
    assert sorted(p.name for p in (on_disk / "l").iterdir()) == sorted(
        f"{n}.xml" for n in range(12)
    )


def test_destination_test_names_the_version_the_extensions_and_the_landing(
    server: SftpServer, folder: tuple[Path, str]
) -> None:
    report = block(server, folder[1]).test_connection()
    assert report.ok, report.checks
    found = {check.step: check.detail for check in report.checks}
    assert found["SFTP version"] == "3"
    assert found["landing"].startswith(LANDING[server.name])
    offers = found["extensions offered"]
    assert ("posix-rename@openssh.com" in offers) == (LANDING[server.name] == "posix-rename")


@pytest.mark.usefixtures("prefect_api")
def test_a_changed_document_replaces_the_old_at_the_same_path_with_the_landing_on_record(
    sftp_servers: Callable[[str], SftpServer], store: Store
) -> None:
    """On the strict server, a template without {timestamp} puts version 2 over version 1:
    the rename is refused, the old file removed and the rename made again. The ledger and the
    manifest say which landing each file had."""
    from patient_delivery import ingest
    from patient_delivery.flows.deliver import deliver

    server = sftp_servers("strict-v3")
    on_disk, root = server.make_folder(f"same-{uuid.uuid4().hex[:10]}")
    name = f"strict-{uuid.uuid4().hex[:8]}"
    block(server, root, path_template="{projectId}/{healthexPatientId}/{dataType}").save(name)
    ingest.add_organization(store, "Acme", "acme")
    project = ingest.add_project(store, "acme", "Study", "study")
    ingest.subscribe(store, project, f"sftp-destination/{name}")
    patient = ingest.add_patient(store, project)
    versions = [CCDA % number for number in (1, 2)]
    arrived = on_disk / project / patient / "ccda.xml"
    for version in versions:
        ingest.put_document(store, patient, "ccda", version)
        assert (deliver().delivered, arrived.read_bytes()) == (1, version)
    with store.session() as session:
        landings = session.scalars(select(Delivery.landing)).all()
    assert landings == ["rename", "rename"]
    manifests = sorted((on_disk / "acme" / project / "_manifests").iterdir())
    assert [json.loads(m.read_bytes())["output"][0]["landing"] for m in manifests] == [
        "rename",
        "rename",
    ]
    assert sorted(p.name for p in arrived.parent.iterdir()) == ["ccda.xml"]


@pytest.mark.bad_input
def test_a_server_offering_only_sha1_algorithms_is_refused_with_the_reason() -> None:
    from loopback.servers import Sha1OnlySftpServer

    server = Sha1OnlySftpServer()
    try:
        _, root = server.make_folder("old")
        with pytest.raises(TerminalDeliveryError, match=r"SHA-1 ones .* are not supported"):
            connect(block(server, root))
        report = block(server, root).test_connection()
        assert not report.ok and "not supported" in report.checks[-1].detail
    finally:
        server.stop()


@pytest.mark.usefixtures("prefect_api")
def test_a_full_disk_on_a_strict_server_says_its_usual_causes_and_is_retried_once(
    store: Store,
) -> None:
    """The strict server answers a write past its space with a bare failure: the reason names
    what usually causes it, and the document is sent twice in the run, not four times."""
    from loopback.servers import StrictV3SftpServer
    from patient_delivery import ingest
    from patient_delivery.flows.deliver import deliver

    server = StrictV3SftpServer(file_size_limit=4096)
    try:
        on_disk, root = server.make_folder(f"full-{uuid.uuid4().hex[:10]}")
        name = f"full-{uuid.uuid4().hex[:8]}"
        block(server, root).save(name)
        ingest.add_organization(store, "Acme", "acme")
        project = ingest.add_project(store, "acme", "Study", "study")
        ingest.subscribe(store, project, f"sftp-destination/{name}")
        document = CCDA.replace(b"%d", b"x" * 20_000)  # past what the disk holds
        ingest.put_document(store, ingest.add_patient(store, project), "ccda", document)

        summary = deliver()

        assert (summary.delivered, summary.failed) == (0, 1)
        with store.session() as session:
            [row] = session.scalars(select(Delivery)).all()
        assert row.attempts == 2
        assert "a full disk, a quota or a read-only folder are usual" in (row.last_error or "")
        assert not [p for p in on_disk.rglob("*.xml") if p.is_file()]  # nothing at a final name
    finally:
        server.stop()
