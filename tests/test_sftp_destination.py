"""SftpDestination against a real OpenSSH sshd on loopback."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from pydantic import SecretStr, ValidationError

from loopback.servers import SFTP_PASSWORD, SFTP_USER, SshServer, free_port
from patient_delivery.blocks.contract import (
    Receipt,
    TerminalDeliveryError,
    TransientDeliveryError,
    Upload,
)
from patient_delivery.blocks.sftp import HostKeyPin, SftpDestination, fetch_host_key, fingerprint
from patient_delivery.blocks.sftp.pipeline import EVERY_SERVER
from tests.destination_contract import BODY, DestinationContract, connect, sha
from tests.faults import FaultProxy
from tests.test_local_destination import FolderRemote


@pytest.fixture
def folder(sshd: SshServer, request: pytest.FixtureRequest) -> Path:
    return sshd.make_folder(f"in-{request.node.name[:40]}-{free_port()}")


def sftp_block(sshd: SshServer, folder: Path, **overrides: object) -> SftpDestination:
    fields: dict[str, object] = {
        "host": "127.0.0.1",
        "port": sshd.port,
        "username": SFTP_USER,
        "password": SFTP_PASSWORD,
        "host_keys": [sshd.host_key_line()],
        "root": str(folder),
        "connect_timeout": 5,
        "operation_timeout": 10,
    }
    fields.update(overrides)
    return SftpDestination(**fields)


@pytest.fixture
def destination(sshd: SshServer, folder: Path) -> SftpDestination:
    return sftp_block(sshd, folder)


@pytest.fixture
def remote(folder: Path) -> FolderRemote:
    return FolderRemote(folder)


@pytest.fixture
def secrets() -> list[str]:
    return [SFTP_PASSWORD]


class TestSftpDestinationContract(DestinationContract):
    pass


def test_key_login_and_fingerprint_pin(sshd: SshServer, folder: Path) -> None:
    pin = fingerprint(fetch_host_key("127.0.0.1", sshd.port))
    block = sftp_block(
        sshd, folder, password=None, private_key=sshd.client_private_key(), host_keys=[pin]
    )
    with block.open_session() as session:
        session.upload("k/doc.xml", BODY, sha(BODY))
    assert (folder / "k" / "doc.xml").read_bytes() == BODY
    assert "PRIVATE KEY" not in repr(block) + str(block)


def test_fetched_host_key_matches_the_servers_own(sshd: SshServer) -> None:
    key = fetch_host_key("127.0.0.1", sshd.port)
    expected = subprocess.run(
        ["ssh-keygen", "-l", "-f", f"{sshd.host_key}.pub"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    assert fingerprint(key) == expected
    assert HostKeyPin.parse(sshd.host_key_line()).fingerprint == expected


@pytest.mark.bad_input
def test_wrong_password_is_refused_clearly(sshd: SshServer, folder: Path) -> None:
    block = sftp_block(sshd, folder, password="not-the-password")
    with pytest.raises(TerminalDeliveryError, match=f"login as '{SFTP_USER}'.*refused"):
        connect(block)
    assert "not-the-password" not in repr(block)


@pytest.mark.bad_input
def test_changed_host_key_is_refused_and_nothing_is_sent(
    sshd: SshServer, folder: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, blob = Path(f"{other}.pub").read_text().split()[:2]
    block = sftp_block(sshd, folder, host_keys=[f"[127.0.0.1]:{sshd.port} {kind} {blob}"])
    seen = fingerprint(fetch_host_key("127.0.0.1", sshd.port))
    with pytest.raises(TerminalDeliveryError, match="does not match the pinned") as error:
        connect(block)
    assert seen in str(error.value)
    assert list(folder.iterdir()) == []
    report = block.test_connection()
    assert not report.ok and report.checks[0].step == "connect" and seen in report.checks[0].detail


@pytest.mark.bad_input
def test_unreachable_server_is_a_transient_error(sshd: SshServer, folder: Path) -> None:
    block = sftp_block(sshd, folder, port=free_port())
    with pytest.raises(TransientDeliveryError, match="cannot reach"), block.open_session():
        pass


@pytest.mark.bad_input
def test_a_root_that_does_not_exist_is_named_never_created_and_not_retried(
    sshd: SshServer, folder: Path
) -> None:
    from patient_delivery.flows.engine.retries import ATTEMPTS
    from patient_delivery.flows.engine.sending import send_documents
    from patient_delivery.flows.engine.sessions import SessionPool
    from patient_delivery.ledger import UploadItem

    missing = folder / "nosuch"
    block = sftp_block(sshd, missing)
    expected = f"folder {missing} does not exist on the server"
    with pytest.raises(TerminalDeliveryError, match=expected), block.open_session():
        pass
    report = block.test_connection()
    assert not report.ok and report.checks[-1].step == "connect"
    assert expected in report.checks[-1].detail
    pool = SessionPool(block)
    documents = iter([(UploadItem(n, n, f"p/{n}.xml", sha(BODY), len(BODY), 0), BODY)
                      for n in range(3)])  # fmt: skip
    with pool.lease() as lease:
        outcomes = list(send_documents(lease, pool, documents))
    assert ATTEMPTS > 1 and [o.attempts for o in outcomes] == [1, 1, 1]  # not retried
    assert all(expected in (o.error or "") and "not retried" in (o.error or "") for o in outcomes)
    assert pool.down is not None and expected in pool.down  # the run's other batches stop too
    assert not missing.exists()  # the root is never created

    locked = folder / "locked"
    locked.mkdir(mode=0o700)  # owned by root: the SFTP user may not look inside
    refused = pytest.raises(TerminalDeliveryError, match=f"permission denied on folder {locked}")
    with refused, sftp_block(sshd, locked / "in").open_session():
        pass


def test_folder_without_write_permission_fails_clearly(sshd: SshServer, folder: Path) -> None:
    locked = folder / "locked"
    locked.mkdir()  # owned by root, 0755: the SFTP user may not write in it
    block = sftp_block(sshd, folder)
    with block.open_session() as session, pytest.raises(TerminalDeliveryError, match="permission"):
        session.upload("locked/doc.xml", BODY, sha(BODY))
    assert list(locked.iterdir()) == []


def test_upload_cut_off_midway_leaves_nothing_at_the_final_path(
    sshd: SshServer, folder: Path
) -> None:
    big = b"<ClinicalDocument xmlns='urn:hl7-org:v3'>" + b"y" * 3_000_000 + b"</ClinicalDocument>"
    proxy = FaultProxy(sshd.port, reset_after=1_000_000)
    try:
        block = sftp_block(sshd, folder, port=proxy.port)
        with pytest.raises(TransientDeliveryError), block.open_session() as session:
            session.upload("cut/doc.xml", big, sha(big))
    finally:
        proxy.stop()
    assert not (folder / "cut" / "doc.xml").exists()
    # The next attempt, on a good connection, puts the whole file in place.
    with sftp_block(sshd, folder).open_session() as session:
        session.upload("cut/doc.xml", big, sha(big))
    assert (folder / "cut" / "doc.xml").read_bytes() == big


@pytest.mark.bad_input
def test_settings_are_checked_when_the_block_is_built(sshd: SshServer, folder: Path) -> None:
    with pytest.raises(ValidationError, match="password or a private key"):
        sftp_block(sshd, folder, password=None)
    with pytest.raises(ValidationError, match="known_hosts line"):
        sftp_block(sshd, folder, host_keys=["nonsense"])
    with pytest.raises(ValidationError):
        sftp_block(sshd, folder, host_keys=[])
    block = sftp_block(sshd, folder, password=SecretStr("x"))
    assert block.describe() == f"sftp://{SFTP_USER}@127.0.0.1:{sshd.port}{folder}"


def test_many_connections_at_once(sshd: SshServer, folder: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    block = sftp_block(sshd, folder)

    def send(worker: int) -> None:
        with block.open_session() as session:
            for i in range(10):
                session.upload(f"w{worker}/{i}.xml", BODY, sha(BODY))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(send, range(8)))
    assert sum(1 for p in folder.rglob("*.xml")) == 80
    assert not [p for p in folder.rglob("*") if p.name.endswith(".partial")]
    shutil.rmtree(folder / "w0")


def test_each_write_fits_one_ssh_packet(sshd: SshServer, folder: Path) -> None:
    """On a server that does not say what it takes (32 KiB writes), a document of 8 full writes
    goes out as 8 data packets, not 16: paramiko splits a write larger than the server's packet
    size less 64 (OpenSSH: 32 KiB) into two encrypted packets."""
    from patient_delivery.blocks.sftp.pipeline import write_size

    block = sftp_block(sshd, folder)
    with block.open_session() as session:
        session.limits = EVERY_SERVER  # as on a server without the limits@openssh.com request
        session.upload("warm/up.xml", BODY, sha(BODY))  # folders made, connection settled
        with session.sftp.open(str(folder / "warm" / "handle"), "w") as opened:
            size = write_size(session.sftp, opened.handle, EVERY_SERVER)  # its handle length
        content = bytes(range(256)) * (size * 8 // 256) + bytes(size * 8 % 256)
        packetizer = session.transport.packetizer
        before = packetizer._Packetizer__sent_packets  # read, not patched
        session.upload("warm/doc.xml", content, sha(content))
        sent = packetizer._Packetizer__sent_packets - before
    # open, 8 writes, close, rename (the folder exists): 11 packets; splitting would be 19
    assert sent == 11, sent
    assert size == 32_768 - 64 - 25 - 4  # OpenSSH: 32 KiB packets, 4-byte handles
    assert (folder / "warm" / "doc.xml").read_bytes() == content


def test_a_server_that_says_it_takes_larger_writes_gets_them(sshd: SshServer, folder: Path) -> None:
    """OpenSSH answers `limits@openssh.com` with 255 KiB writes: a document of two and a bit
    such writes goes in 3 of them instead of 16 (each one a request and a reply), and arrives
    whole either way."""
    import os

    block = sftp_block(sshd, folder)
    with block.open_session() as session:
        said = session.limits
        assert said.write == 256 * 1024 - 1024  # OpenSSH's own figure
        session.upload("warm/up.xml", BODY, sha(BODY))  # folders made, connection settled
        content = os.urandom(2 * said.write + 5)
        requests = {}
        for limits in (EVERY_SERVER, said):
            session.limits = limits
            before = session.sftp.request_number  # paramiko numbers each request it sends
            session.upload(f"warm/{limits.write}.xml", content, sha(content))
            requests[limits] = session.sftp.request_number - before
            assert (folder / "warm" / f"{limits.write}.xml").read_bytes() == content
    # open, the writes (32 KiB less what fits one SSH packet, as above), close, rename
    assert (requests[EVERY_SERVER], requests[said]) == (3 + 16, 3 + 3)


class _PlainSftpServer(paramiko.ServerInterface):
    """paramiko's own SFTP server, which does not know `limits@openssh.com`: one login, one
    SFTP session, on loopback."""

    def check_auth_password(self, username: str, password: str) -> int:
        return paramiko.AUTH_SUCCESSFUL if password == "pw" else paramiko.AUTH_FAILED

    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return (
            paramiko.OPEN_SUCCEEDED
            if kind == "session"
            else paramiko.OPEN_FAILED_UNKNOWN_CHANNEL_TYPE
        )


def test_a_server_that_does_not_say_what_it_takes_gets_32_kib_writes(folder: Path) -> None:
    host_key = paramiko.ECDSAKey.generate()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    serving: list[paramiko.Transport] = []

    def serve() -> None:
        connection, _ = listener.accept()
        transport = paramiko.Transport(connection)
        transport.add_server_key(host_key)
        transport.set_subsystem_handler("sftp", paramiko.SFTPServer, paramiko.SFTPServerInterface)
        serving.append(transport)
        transport.start_server(server=_PlainSftpServer())

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    block = SftpDestination(
        host="127.0.0.1", port=port, username="someone", password=SecretStr("pw"), root="/",
        host_keys=[f"{host_key.get_name()} {host_key.get_base64()}"],
    )  # fmt: skip
    try:
        with block.open_session() as session:
            assert session.limits == EVERY_SERVER  # it answered "unsupported"; nothing broke
            assert session.sftp.normalize(".")  # the connection is still good
    finally:
        server.join(10)
        for transport in serving:
            transport.close()
        listener.close()


def _tracked(uploads: list[Upload], taken: list[int]) -> Iterator[tuple[int, Upload]]:
    """The uploads keyed by number, counting in `taken` how many upload_many has taken."""
    for number, upload in enumerate(uploads):
        taken.append(number)
        yield number, upload


def test_several_files_are_on_their_way_at_once_and_no_more(
    sshd: SshServer, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploads = [Upload(f"flight/{i}.xml", BODY, sha(BODY)) for i in range(10)]
    for files_in_flight, flight_bytes, most in ((3, 10**9, 3), (8, 2 * len(BODY) - 1, 2)):
        monkeypatch.setattr("patient_delivery.blocks.sftp.session.FLIGHT_BYTES", flight_bytes)
        taken: list[int] = []
        on_their_way: list[int] = []  # files taken and not yet reported, at each report
        block = sftp_block(sshd, folder, files_in_flight=files_in_flight)
        with block.open_session() as session:
            for done, (_, receipt) in enumerate(session.upload_many(_tracked(uploads, taken))):
                assert isinstance(receipt, Receipt), receipt
                on_their_way.append(len(taken) - done)
        assert max(on_their_way) == most  # the first report came after `most` were sent
        assert sorted(p.name for p in (folder / "flight").iterdir()) == sorted(
            f"{i}.xml" for i in range(10)
        )
        shutil.rmtree(folder / "flight")


def test_a_refused_file_fails_alone_among_files_on_their_way(sshd: SshServer, folder: Path) -> None:
    (folder / "locked").mkdir()  # owned by root, 0755: the SFTP user may not write in it
    uploads = [
        Upload(f"{'locked' if i % 3 == 1 else 'open'}/{i}.xml", BODY, sha(BODY)) for i in range(9)
    ]
    with sftp_block(sshd, folder, files_in_flight=4).open_session() as session:
        results = dict(session.upload_many(enumerate(uploads)))
        session.upload("open/after.xml", BODY, sha(BODY))  # the session goes on
    for i, result in results.items():
        if i % 3 == 1:
            assert isinstance(result, TerminalDeliveryError) and "permission" in str(result)
        else:
            assert isinstance(result, Receipt), result
    assert list((folder / "locked").iterdir()) == []
    assert sorted(p.name for p in (folder / "open").iterdir()) == sorted(
        [f"{i}.xml" for i in range(9) if i % 3 != 1] + ["after.xml"]
    )


def test_a_broken_connection_fails_the_files_on_their_way_but_not_an_answered_rename(
    sshd: SshServer, folder: Path
) -> None:
    """Two files on their way; the connection breaks once the second one's rename has been
    answered but before that answer was read: it is delivered; the next file fails
    temporarily, naming its temporary file for the retry; nothing more is taken."""
    uploads = [Upload(f"broken/{i}.xml", BODY, sha(BODY)) for i in range(5)]
    taken: list[int] = []
    results: dict[int, Receipt | object] = {}
    with sftp_block(sshd, folder, files_in_flight=2).open_session() as session:
        for number, result in session.upload_many(_tracked(uploads, taken)):
            results[number] = result
            if number == 0:
                deadline = time.monotonic() + 10
                while not (session.sftp.sock.recv_ready() and (folder / "broken/1.xml").exists()):
                    assert time.monotonic() < deadline, "the second rename was never answered"
                    time.sleep(0.01)
                session.transport.sock.shutdown(socket.SHUT_RDWR)
    assert isinstance(results[0], Receipt) and isinstance(results[1], Receipt)
    assert taken == [0, 1, 2]  # the third was started when the connection broke, no more
    lost = results[2]
    assert isinstance(lost, TransientDeliveryError) and "connection was lost" in str(lost)
    assert lost.leftover and lost.leftover.startswith("broken/.2.xml.")
    assert (folder / "broken/1.xml").read_bytes() == BODY
    assert not (folder / "broken/2.xml").exists()
