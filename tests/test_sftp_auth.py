"""Logging in as real servers ask for it, on OpenSSH: public keys (Ed25519, ECDSA, RSA signed
with SHA-2), a key and then a password (`AuthenticationMethods publickey,password`), and
keyboard-interactive only (servers that turn "password" off); a server that offers only
algorithms we do not accept is refused with the reason."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from loopback.servers import SFTP_PASSWORD, SFTP_USER, SshServer
from patient_delivery import ingest
from patient_delivery.blocks.contract import TerminalDeliveryError
from patient_delivery.blocks.sftp import SftpDestination
from patient_delivery.blocks.sftp.host_keys import HostKeyPin
from patient_delivery.flows.deliver import deliver
from patient_delivery.store import Store
from tests.destination_contract import BODY, sha
from tests.test_sftp_destination import sftp_block


@pytest.fixture(scope="module")
def key_then_password() -> Iterator[SshServer]:
    server = SshServer({"AuthenticationMethods": "publickey,password"}, user_home=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyboard_interactive() -> Iterator[SshServer]:
    server = SshServer({"PasswordAuthentication": "no", "KbdInteractiveAuthentication": "yes",
                        "UsePAM": "yes"}, user_home=False)  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def three_host_keys() -> Iterator[SshServer]:
    """An OpenSSH server holding RSA, ECDSA and ed25519 host keys (paramiko asks for ed25519
    first, then ECDSA, then RSA)."""
    server = SshServer(user_home=False, more_host_keys=("rsa", "ecdsa"))
    yield server
    server.stop()


def _delivers(block: SftpDestination) -> None:
    with block.open_session() as session:
        receipt = session.upload(f"auth/{uuid.uuid4().hex}.xml", BODY, sha(BODY))
    assert receipt.size == len(BODY)


@pytest.mark.parametrize(("kind", "bits"), [("ed25519", None), ("ecdsa", 256), ("rsa", 3072)])
def test_public_keys_of_every_current_kind_log_in(
    sshd: SshServer, kind: str, bits: int | None
) -> None:
    """OpenSSH refuses RSA signatures made with SHA-1 (`ssh-rsa`): an RSA key that logs in was
    used with rsa-sha2-256 or -512."""
    key = sshd.authorize(kind, bits)
    folder = sshd.make_folder(f"key-{kind}-{uuid.uuid4().hex[:6]}")
    _delivers(sftp_block(sshd, folder, password=None, private_key=SecretStr(key)))


def test_a_key_and_then_a_password_when_the_server_asks_for_both(
    key_then_password: SshServer,
) -> None:
    server = key_then_password
    folder = server.make_folder(f"both-{uuid.uuid4().hex[:6]}")
    key = SecretStr(server.client_private_key())
    _delivers(sftp_block(server, folder, private_key=key))  # the block holds both
    with pytest.raises(TerminalDeliveryError, match="was refused"):
        _delivers(sftp_block(server, folder, password=None, private_key=key))  # a key alone
    with pytest.raises(TerminalDeliveryError, match="was refused"):
        _delivers(sftp_block(server, folder))  # a password alone


def test_keyboard_interactive_when_the_server_turns_password_off(
    keyboard_interactive: SshServer,
) -> None:
    server = keyboard_interactive
    folder = server.make_folder(f"kbd-{uuid.uuid4().hex[:6]}")
    _delivers(sftp_block(server, folder))
    wrong = sftp_block(server, folder, password=SecretStr(SFTP_PASSWORD + "-not"))
    with pytest.raises(TerminalDeliveryError, match="was refused"):
        _delivers(wrong)


@pytest.mark.parametrize("kind", ["rsa", "ecdsa", None])
def test_each_kind_of_host_key_is_pinned_by_its_line_or_by_its_fingerprint_alone(
    three_host_keys: SshServer, kind: str | None
) -> None:
    """The line `destination host-key` prints for an RSA key (`ssh-rsa AAAA...`) is asked for
    as RSA with SHA-2 signatures; a bare fingerprint of a key the server holds besides its
    first choice is found by asking for the other kinds in turn."""
    server = three_host_keys
    line = server.host_key_line(kind)
    folder = server.make_folder(f"pins-{kind}-{uuid.uuid4().hex[:6]}")
    _delivers(sftp_block(server, folder, host_keys=[line]))
    _delivers(sftp_block(server, folder, host_keys=[HostKeyPin.parse(line).fingerprint]))


def test_a_key_the_server_does_not_hold_is_refused_naming_the_key_it_presented(
    three_host_keys: SshServer, sshd: SshServer
) -> None:
    """Pinned: another server's ed25519 key, as a line and as a fingerprint. Refused with the
    key this server presented (its ed25519 one: what an operator compares), never "no
    algorithm in common"."""
    server = three_host_keys
    folder = server.make_folder(f"other-{uuid.uuid4().hex[:6]}")
    presented = HostKeyPin.parse(server.host_key_line()).fingerprint
    other = sshd.host_key_line()
    for pin in (other, HostKeyPin.parse(other).fingerprint):
        with pytest.raises(TerminalDeliveryError) as refused:
            _delivers(sftp_block(server, folder, host_keys=[pin]))
        assert "does not match the pinned key(s)" in str(refused.value)
        assert f"presented ssh-ed25519 {presented}" in str(refused.value)
    rsa_elsewhere = f"[127.0.0.1]:{server.port} ssh-rsa {other.split()[-1]}"  # not this one's
    with pytest.raises(TerminalDeliveryError, match="presented ssh-rsa SHA256:"):
        _delivers(sftp_block(server, folder, host_keys=[rsa_elsewhere]))
    # A server with no key of the pinned kind (ECDSA only, as some servers ship): the key it
    # has is named, not "no algorithm in common".
    ecdsa_only = SshServer({"HostKeyAlgorithms": "ecdsa-sha2-nistp256"}, user_home=False,
                           more_host_keys=("ecdsa",))  # fmt: skip
    try:
        block = sftp_block(ecdsa_only, ecdsa_only.make_folder("in"), host_keys=[other])
        with pytest.raises(TerminalDeliveryError) as refused:
            _delivers(block)
        assert "presented ecdsa-sha2-nistp256 SHA256:" in str(refused.value), refused.value
    finally:
        ecdsa_only.stop()


@pytest.mark.usefixtures("prefect_api")
def test_a_refused_password_is_tried_once_per_run_however_many_lanes(
    sshd: SshServer, store: Store
) -> None:
    """A run of 200 documents over up to 8 connections, with a wrong password: sshd's log
    shows one failed login for the run (not one per lane or warm-up: an account lockout
    policy counts each), every document failed with the reason. The destination is then
    down: the next run tries no login at all, and a probe due tries one."""
    from patient_delivery import destination_health

    ingest.add_organization(store, "Acme Research", "acme")
    project = ingest.add_project(store, "acme", "Study", "study")
    name = f"wrong-{uuid.uuid4().hex[:8]}"
    block = sftp_block(sshd, sshd.make_folder(name), password=SecretStr("not-the-password"),
                       max_connections=8)  # fmt: skip
    block.save(name)
    ingest.subscribe(store, project, f"sftp-destination/{name}")
    for number in range(200):
        patient = ingest.add_patient(store, project, f"MRN-{number}")
        ingest.put_document(store, patient, "ccda", BODY)

    def failed_logins() -> int:
        return sshd.log.read_text().count(f"Failed password for {SFTP_USER} ")

    def logins_in_a_run() -> tuple[int, int]:
        before = failed_logins()
        summary = deliver()
        time.sleep(0.5)  # sshd writes its log line as it closes the connection
        assert summary.delivered == 0
        return summary.failed, failed_logins() - before

    assert logins_in_a_run() == (200, 1)
    assert logins_in_a_run() == (0, 0)  # down: skipped, its deliveries wait
    destination_health.probe_now(store)  # its probe due (a minute after it went down)
    assert logins_in_a_run() == (0, 1)  # the probe's login, refused: still down
