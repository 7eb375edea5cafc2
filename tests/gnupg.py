"""GnuPG's own `gpg` binary, in a home of its own: it makes the keys the tests use and decrypts
what arrived, as a receiving organization would.

Keys that are no longer valid are made the way they come about: an expired one is generated
with the clock set back (`--faked-system-time`), a revoked one gets the revocation certificate
gpg wrote when it made the key.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PASSPHRASE = "correct horse battery staple"
LONG_AGO = "20200101T000000"  # keys made then with a one-year expiry expired in 2021
A_MINUTE_LATER = "20200101T000100"
"""For a subkey added to a key made LONG_AGO: each gpg process starts its faked clock afresh,
so the same start could date the subkey at or before its primary key (gpg then refuses it,
"Key not changed"), which happened on a loaded machine."""


class GnuPG:
    """One person's keyring: `gpg --homedir` in a short temporary folder (its agent's socket
    path must fit), removed with its agent by `close()`."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="gpg-", dir="/tmp"))
        self.home.chmod(0o700)

    def gpg(self, *args: str, input: bytes | None = None, at: str | None = None) -> bytes:
        clock = ["--faked-system-time", at] if at else []
        result = subprocess.run(
            ["gpg", "--homedir", str(self.home), "--batch", "--yes", "--pinentry-mode",
             "loopback", *clock, *args],
            input=input, capture_output=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise GpgFailed(result.stderr.decode(errors="replace"), result.stdout)
        return result.stdout

    def new_key(
        self,
        uid: str,
        algo: str = "future-default",
        usage: str = "default",
        expire: str = "1y",
        passphrase: str = "",
        at: str | None = None,
    ) -> str:
        """Generate a key; its fingerprint."""
        self.gpg("--passphrase", passphrase, "--quick-gen-key", uid, algo, usage, expire, at=at)
        return self.fingerprint(uid)

    def fingerprint(self, uid: str) -> str:
        listing = self.gpg("--with-colons", "--list-keys", uid).decode()
        return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr"))

    def public(self, uid: str) -> str:
        return self.gpg("--armor", "--export", uid).decode()

    def secret(self, uid: str, passphrase: str = "") -> str:
        return self.gpg("--passphrase", passphrase, "--armor", "--export-secret-keys", uid).decode()

    def revoke(self, uid: str) -> None:
        """Import the revocation certificate gpg made with the key."""
        stored = (self.home / "openpgp-revocs.d" / f"{self.fingerprint(uid)}.rev").read_text()
        self.gpg("--import", input=stored.replace(":-----BEGIN", "-----BEGIN").encode())

    def add_public(self, armored: str) -> None:
        self.gpg("--import", input=armored.encode())

    def decrypt(self, message: bytes) -> Decrypted:
        """`gpg --decrypt`: the plaintext, and the fingerprint of a good signature on it."""
        status_file = self.home / "status"
        plaintext = self.gpg("--status-file", str(status_file), "--decrypt", input=message)
        signer = None
        for line in status_file.read_text(errors="replace").splitlines():
            words = line.split()
            if words[1:2] == ["VALIDSIG"]:
                signer = words[-1]  # the primary key's fingerprint
        return Decrypted(plaintext, signer)

    def close(self) -> None:
        subprocess.run(
            ["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"],
            capture_output=True, check=False,
        )  # fmt: skip
        shutil.rmtree(self.home, ignore_errors=True)


@dataclass(frozen=True)
class Decrypted:
    plaintext: bytes
    signed_by: str | None


class GpgFailed(Exception):
    def __init__(self, stderr: str, stdout: bytes) -> None:
        super().__init__(stderr.strip().splitlines()[-1] if stderr.strip() else "gpg failed")
        self.stderr = stderr


@dataclass(frozen=True)
class Keys:
    """The keys of the encryption tests, armored: the receiving organization's, ours (to sign
    with), and keys that must be refused."""

    receiver: GnuPG
    receiver_public: str
    ours_secret: str
    ours_fingerprint: str
    expired: str
    revoked: str
    signing_only: str
    encryption_subkey_expired: str
    receiver_secret: str
    ours_public: str
    expired_secret: str


def make_keys() -> tuple[Keys, list[GnuPG]]:
    """The receiver's keyring (it can decrypt, and knows our public key), and every key. If
    making them fails, the keyrings made so far are closed (their gpg-agents stopped)."""
    keyrings = [GnuPG(), GnuPG(), GnuPG()]
    try:
        return _made(*keyrings), keyrings
    except BaseException:
        for keyring in keyrings:
            keyring.close()
        raise


def _made(receiver: GnuPG, ours: GnuPG, others: GnuPG) -> Keys:
    receiver.new_key("Receiving Org <pgp@receiver.example>")
    ours_fingerprint = ours.new_key("Patient Delivery <pgp@sender.example>", passphrase=PASSPHRASE)
    receiver.add_public(ours.public("pgp@sender.example"))
    others.new_key("Expired <expired@example.org>", at=LONG_AGO)
    others.new_key("Revoked <revoked@example.org>")
    others.revoke("revoked@example.org")
    others.new_key("Signing only <sign@example.org>", algo="ed25519", usage="sign")
    primary = others.new_key(
        "Old subkey <subkey@example.org>", algo="ed25519", usage="sign", expire="never",
        at=LONG_AGO,
    )  # fmt: skip
    others.gpg("--passphrase", "", "--quick-add-key", primary, "cv25519", "encr", "1y",
               at=A_MINUTE_LATER)  # fmt: skip
    keys = Keys(
        receiver=receiver,
        receiver_public=receiver.public("pgp@receiver.example"),
        ours_secret=ours.secret("pgp@sender.example", PASSPHRASE),
        ours_fingerprint=ours_fingerprint,
        expired=others.public("expired@example.org"),
        revoked=others.public("revoked@example.org"),
        signing_only=others.public("sign@example.org"),
        encryption_subkey_expired=others.public("subkey@example.org"),
        receiver_secret=receiver.secret("pgp@receiver.example"),
        ours_public=ours.public("pgp@sender.example"),
        expired_secret=others.secret("expired@example.org"),
    )
    return keys
