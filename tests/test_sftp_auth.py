"""Logging in as real servers ask for it, on OpenSSH: public keys (Ed25519, ECDSA, RSA signed
with SHA-2), a key and then a password (`AuthenticationMethods publickey,password`), and
keyboard-interactive only (servers that turn "password" off); a server that offers only
algorithms we do not accept is refused with the reason."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from loopback.servers import SFTP_PASSWORD, SshServer
from patient_delivery.blocks.contract import TerminalDeliveryError
from patient_delivery.blocks.sftp import SftpDestination
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
