"""OpenPGP for destinations: files encrypted to the receiving organization's public key (and
signed with a key of ours, when one is set) before they are sent.

The one module that uses the OpenPGP library, PySequoia (Python bindings to Sequoia-PGP): its
API is young, so every call to it is here. Keys are checked when a block is built, whether by
the CLI, from Python or when a block saved elsewhere (the Prefect UI) is loaded: a key that is
revoked, expired or cannot encrypt (or sign) is refused with a one-line reason that never
quotes the key. The library encrypts to an expired subkey when it finds no other, so validity
is judged here, from the certificate's own self-signatures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import pysequoia
from pysequoia import Cert, Tsk
from pysequoia.packet import KeyFlags, PacketPile, SignatureType, Tag

from patient_delivery.blocks.contract import (
    DeliveryError,
    DestinationSession,
    Receipt,
    TerminalDeliveryError,
    Upload,
    check_content,
)

if TYPE_CHECKING:
    from patient_delivery.blocks.base import Destination

K = TypeVar("K")

USED = {
    pysequoia: ["encrypt", "sign"],
    Cert: ["split_bytes", "fingerprint", "expiration", "is_revoked"],
    Tsk: ["from_bytes", "signer"],
    PacketPile: ["from_bytes"],
    Tag: ["PublicKey", "SecretKey", "PublicSubkey", "SecretSubkey", "Signature"],
    SignatureType: ["SubkeyRevocation"],
    KeyFlags: ["signing", "transport_encryption", "storage_encryption"],
}
"""What this module uses of PySequoia, whose API is not declared stable: `missing()` names
what an upgrade took away (a test runs it)."""


def missing() -> list[str]:
    """The names in `USED` the installed PySequoia lacks."""
    return [
        f"{getattr(owner, '__name__', owner)}.{name}"
        for owner, names in USED.items()
        for name in names
        if not hasattr(owner, name)
    ]


class KeyProblem(ValueError):
    """A key that cannot be used, with the reason (never the key itself)."""


@dataclass(frozen=True)
class KeyInfo:
    """What people check a key by: its fingerprint, and until when it is valid."""

    fingerprint: str
    expires: datetime | None

    def __str__(self) -> str:
        until = f"expires {self.expires:%Y-%m-%d}" if self.expires else "does not expire"
        return f"OpenPGP {self.fingerprint.upper()} ({until})"


def recipient(armored: str, now: datetime | None = None) -> Cert:
    """The organization's certificate, if it can be encrypted to now; `KeyProblem` if not."""
    cert = _one_cert(armored, "public key")
    if _has_secret_keys(armored):
        raise KeyProblem("holds a secret key; give the organization's public key only")
    _check_usable(cert, now, _encrypts, "no encryption key")
    return cert


def signing_key(armored: str, passphrase: str | None, now: datetime | None = None) -> Tsk:
    """Our secret key, if it can sign now (with its passphrase); `KeyProblem` if not."""
    cert = _one_cert(armored, "secret key")
    if not _has_secret_keys(armored):
        raise KeyProblem("holds no secret key material; give our secret key")
    _check_usable(cert, now, _signs, "no signing key")
    key = Tsk.from_bytes(armored.encode())
    try:
        pysequoia.sign(key.signer(passphrase), b"patient-delivery key check")
    except Exception:
        raise KeyProblem("cannot sign: the passphrase is wrong or missing") from None
    return key


def info(armored: str) -> KeyInfo:
    """Fingerprint and expiry of a key already checked."""
    cert = _one_cert(armored, "key")
    return KeyInfo(cert.fingerprint, cert.expiration)


class Sealer:
    """Encrypts (and signs) documents for one receiver; one per session, one thread at a time."""

    def __init__(self, receiver: str, signer: str | None, passphrase: str | None) -> None:
        self._recipients = [recipient(receiver)]
        self._signer = signing_key(signer, passphrase).signer(passphrase) if signer else None

    def seal(self, content: bytes) -> bytes:
        try:
            return pysequoia.encrypt(
                content, recipients=self._recipients, signer=self._signer, armor=False
            )
        except Exception as exc:  # the library's errors carry no document content
            raise TerminalDeliveryError(
                f"could not encrypt to the receiver's key ({type(exc).__name__})"
            ) from None


class SealedSession(DestinationSession):
    """A session that encrypts each file before the session under it sends it: what is checked
    on arrival and reported in the `Receipt` is what was sent. The stored document's SHA-256 is
    checked before encrypting, so a corrupt store copy is refused as it would be unencrypted."""

    def __init__(self, inner: DestinationSession, sealer: Sealer) -> None:
        self.inner = inner
        self.sealer = sealer

    def _sealed(self, upload: Upload) -> Upload:
        check_content(upload.content, upload.sha256)
        content = self.sealer.seal(upload.content)
        return Upload(upload.path, content, hashlib.sha256(content).hexdigest())

    def upload(self, path: str, content: bytes, sha256: str) -> Receipt:
        return self.inner.upload(*self._sealed(Upload(path, content, sha256)))

    def upload_many(
        self, uploads: Iterable[tuple[K, Upload]]
    ) -> Iterator[tuple[K, Receipt | DeliveryError]]:
        refused: list[tuple[K, Receipt | DeliveryError]] = []

        def sealed() -> Iterator[tuple[K, Upload]]:
            for key, upload in uploads:
                try:
                    yield key, self._sealed(upload)
                except DeliveryError as exc:  # answered here, never sent
                    refused.append((key, exc))

        for result in self.inner.upload_many(sealed()):
            yield from _drained(refused)
            yield result
        yield from _drained(refused)

    def remove(self, path: str) -> None:
        self.inner.remove(path)

    def discard_leftovers(self, path: str) -> None:
        self.inner.discard_leftovers(path)

    def facts(self) -> list[tuple[str, str]]:
        return self.inner.facts()

    def close(self) -> None:
        self.inner.close()


def _drained(
    results: list[tuple[K, Receipt | DeliveryError]],
) -> Iterator[tuple[K, Receipt | DeliveryError]]:
    while results:
        yield results.pop(0)


def _one_cert(armored: str, what: str) -> Cert:
    try:
        certs = Cert.split_bytes(armored.encode())
    except Exception:
        certs = []
    if len(certs) != 1:
        found = "no" if not certs else str(len(certs))
        raise KeyProblem(
            f"is not one OpenPGP {what} ({found} found); give one ASCII-armored key block"
        )
    return certs[0]


def _has_secret_keys(armored: str) -> bool:
    secret = (Tag.SecretKey, Tag.SecretSubkey)
    return any(packet.tag in secret for packet in PacketPile.from_bytes(armored.encode()))


def _encrypts(flags: KeyFlags) -> bool:
    return flags.transport_encryption or flags.storage_encryption


def _signs(flags: KeyFlags) -> bool:
    return flags.signing


def _check_usable(
    cert: Cert, now: datetime | None, capable: Callable[[KeyFlags], bool], missing: str
) -> None:
    """Refuse a revoked or expired certificate, and one with no key valid now for the job."""
    now = now or datetime.now(UTC)
    if cert.is_revoked:
        raise KeyProblem(f"key {cert.fingerprint.upper()} is revoked")
    if cert.expiration is not None and cert.expiration <= now:
        raise KeyProblem(f"key {cert.fingerprint.upper()} expired on {cert.expiration:%Y-%m-%d}")
    if not any(capable(flags) for flags in _valid_key_flags(cert, now)):
        raise KeyProblem(
            f"key {cert.fingerprint.upper()} has {missing} valid now "
            "(none made for it, or those expired or were revoked)"
        )


@dataclass
class _Key:
    created: datetime | None
    flags: KeyFlags | None = None
    lifetime: timedelta | None = None
    bound_at: datetime | None = None
    revoked: bool = False


def _valid_key_flags(cert: Cert, now: datetime) -> Iterator[KeyFlags]:
    """The capabilities of each of the certificate's keys that is valid at `now`: the primary
    key (its newest self-signature that states them) and each subkey (its newest binding),
    leaving out subkeys that expired or were revoked."""
    keys: list[_Key] = []
    for packet in PacketPile.from_bytes(bytes(cert)):
        if packet.tag in (Tag.PublicKey, Tag.SecretKey, Tag.PublicSubkey, Tag.SecretSubkey):
            keys.append(_Key(packet.key_created))
        elif packet.tag == Tag.Signature and keys:
            key, kind = keys[-1], packet.signature_type
            if kind == SignatureType.SubkeyRevocation:
                key.revoked = True
            elif packet.key_flags is not None and (
                key.bound_at is None or (packet.signature_created or now) > key.bound_at
            ):
                key.flags, key.lifetime = packet.key_flags, packet.key_validity_period
                key.bound_at = packet.signature_created
    for key in keys:
        if key.flags is None or key.revoked:
            continue
        if key.lifetime and key.created and key.created + key.lifetime <= now:
            continue
        yield key.flags


@contextmanager
def sealed(destination: Destination) -> Iterator[DestinationSession]:
    """A session of `destination` that encrypts every file to the receiver's key (and signs it
    with ours, when the block has one) before it is sent."""
    secret, passphrase = destination.signing_key, destination.signing_key_passphrase
    sealer = Sealer(
        destination.encryption_key or "",
        secret.get_secret_value() if secret else None,
        passphrase.get_secret_value() if passphrase else None,
    )
    with destination.open_session() as session:
        yield SealedSession(session, sealer)
