"""An organization's SFTP server: pinned host key, password or key login, atomic writes.

- The server's host key must match one pinned in the block (a known_hosts line or a
  `SHA256:` fingerprint; several for key rotation). Anything else is refused and the key that
  was seen is reported, so an operator can check it and pin it; nothing is ever auto-accepted.
- paramiko never sets `TCP_NODELAY`; we open the socket ourselves and set it (measured on
  loopback: 67 files/s without it, 529 with it, one connection).
- Each file is written under a temporary name in its folder, every write's reply checked, then
  moved into place with `posix-rename@openssh.com` (plain `rename` fails over an existing file
  on OpenSSH): three round trips per file, requests pipelined (`sftp_pipeline`).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import posixpath
import secrets
import socket
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Generic

import paramiko
from pydantic import Field, SecretStr, field_validator, model_validator

from blocks import sftp_pipeline
from blocks.base import (
    DeliveryError,
    Destination,
    DestinationSession,
    K,
    Receipt,
    TerminalDeliveryError,
    TransientDeliveryError,
    Upload,
    check_content,
)


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint of a public key, e.g. `SHA256:Xr0...` (no padding)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_line(host: str, port: int, key: paramiko.PKey) -> str:
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {key.get_name()} {key.get_base64()}"


@dataclass(frozen=True)
class HostKeyPin:
    """One pinned key: a key type and blob from a known_hosts line, or a SHA256 fingerprint."""

    fingerprint: str
    key_type: str | None = None

    @classmethod
    def parse(cls, text: str) -> HostKeyPin:
        text = text.strip()
        if text.startswith("SHA256:"):
            if len(text) < 20:
                raise ValueError("a SHA256 fingerprint looks like SHA256:<43 base64 characters>")
            return cls(fingerprint=text)
        parts = text.split()
        # "host keytype base64" or "keytype base64"
        if len(parts) >= 3 and not parts[0].startswith(("ssh-", "ecdsa-")):
            parts = parts[1:]
        if len(parts) < 2:
            raise ValueError(
                "a host key is a known_hosts line ('host ssh-ed25519 AAAA...') or 'SHA256:...'"
            )
        key_type, blob = parts[0], parts[1]
        try:
            raw = base64.b64decode(blob, validate=True)
        except ValueError:
            raise ValueError("the known_hosts line's key is not valid base64") from None
        digest = base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")
        return cls(fingerprint="SHA256:" + digest, key_type=key_type)


def _transient(message: str) -> TransientDeliveryError:
    return TransientDeliveryError(message)


class SftpSession(DestinationSession):
    def __init__(
        self,
        transport: paramiko.Transport,
        sftp: paramiko.SFTPClient,
        root: str,
        files_in_flight: int,
        limits: sftp_pipeline.Limits,
    ) -> None:
        self.transport = transport
        self.sftp = sftp
        self.root = root
        self.files_in_flight = files_in_flight
        self.limits = limits
        """How much each write may carry on this server (asked once per connection)."""
        self._folders: set[str] = {posixpath.normpath(root)}  # exists: normalize() found it

    def _remote(self, path: str) -> str:
        full = posixpath.normpath(posixpath.join(self.root, path))
        root = posixpath.normpath(self.root)
        if not (full == root or full.startswith(root.rstrip("/") + "/")):
            raise TerminalDeliveryError("rendered path leaves the destination root; refused")
        return full

    def _missing_folders(self, folder: str) -> list[str]:
        """`folder` and the parents this session has not made or seen yet, top-down."""
        missing: list[str] = []
        while folder not in self._folders and folder not in ("", "/"):
            missing.append(folder)
            folder = posixpath.dirname(folder)
        return missing[::-1]

    def upload(self, path: str, content: bytes, sha256: str) -> Receipt:
        return self._upload_through_many(path, content, sha256)

    def upload_many(
        self, uploads: Iterable[tuple[K, Upload]]
    ) -> Iterator[tuple[K, Receipt | DeliveryError]]:
        """Several files on their way over the one channel: up to `files_in_flight` of them
        (fewer when they hold `FLIGHT_BYTES`), each advanced as its replies arrive.

        A refused request fails its file alone, and its temporary file is removed. A broken
        connection fails every file on its way, each handing its temporary file's name to the
        retry (`leftover`), and no more uploads are taken.
        """
        ready: list[sftp_pipeline.Put] = []  # puts whose step's replies are all in
        flights: dict[sftp_pipeline.Put, _Flight[K]] = {}
        source = iter(uploads)
        while True:
            while self._room(flights.values()) and (taken := next(source, None)) is not None:
                key, upload = taken
                try:
                    flight = _Flight(key, upload, *self._names(upload))
                except DeliveryError as exc:
                    yield key, exc
                    continue
                try:
                    put = sftp_pipeline.Put(self.sftp, flight.folders, flight.temporary,
                                            flight.final, upload.content, ready,
                                            self.limits)  # fmt: skip
                except (OSError, paramiko.SSHException, EOFError) as exc:
                    yield from self._lost([*flights.items(), (None, flight)], exc)
                    return
                flights[put] = flight
            if not flights:
                return
            try:
                while not ready:
                    self.sftp._read_response()
                put = ready.pop(0)
                flight = flights[put]
                if not put.advance():
                    continue
            except sftp_pipeline.Refused as refused:
                del flights[put]
                yield flight.key, self._discard(flight.temporary, _refusal(refused.error))
                continue
            except (OSError, paramiko.SSHException, EOFError) as exc:
                yield from self._lost(flights.items(), exc)
                return
            del flights[put]
            yield flight.key, self._arrived(flight)

    def _lost(
        self,
        flights: Iterable[tuple[sftp_pipeline.Put | None, _Flight[K]]],
        exc: BaseException,
    ) -> Iterator[tuple[K, Receipt | DeliveryError]]:
        """The connection broke with files on their way.

        Replies that came in before it broke are read first: a file whose rename was answered
        is in place, and delivered (with several files on their way, a rename's answer can wait
        behind the next file's writes). Every other file failed, temporarily, and hands its
        temporary file's name to the retry, which removes it over a new connection (a timed-out
        one may never answer a remove).
        """
        with suppress(OSError, paramiko.SSHException, EOFError):
            while self.sftp.sock.recv_ready():
                self.sftp._read_response()
        timed_out = isinstance(exc, socket.timeout | TimeoutError)
        for put, flight in flights:
            if put is not None and put.step == put.RENAME and not put.waiting:
                with suppress(sftp_pipeline.Refused):
                    put.advance()  # reads the answer; sends nothing more
                    yield flight.key, self._arrived(flight)
                    continue
            error = _transient(
                "the SFTP server did not answer in time"
                if timed_out
                else "the SFTP connection was lost during the upload"
            )
            error.leftover = self._relative(flight.temporary)
            yield flight.key, error

    def _arrived(self, flight: _Flight[K]) -> Receipt:
        self._folders.update(flight.folders)
        upload = flight.upload
        return Receipt(upload.path, len(upload.content), upload.sha256)

    def _relative(self, remote: str) -> str:
        return posixpath.relpath(remote, posixpath.normpath(self.root))

    def _room(self, flights: Collection[_Flight[K]]) -> bool:
        """Another file may start: fewer than `files_in_flight` on their way, holding less than
        `FLIGHT_BYTES` between them (a large document goes alone rather than not at all)."""
        if len(flights) >= self.files_in_flight:
            return False
        return sum(len(f.upload.content) for f in flights) < FLIGHT_BYTES

    def _names(self, upload: Upload) -> tuple[str, str, list[str]]:
        """Checked content; the final name, a fresh temporary one beside it, and the folders
        to make first (those this session has not made or seen yet)."""
        check_content(upload.content, upload.sha256)
        final = self._remote(upload.path)
        folder, name = posixpath.split(final)
        temporary = posixpath.join(folder, f".{name}.{secrets.token_hex(6)}.partial")
        return final, temporary, self._missing_folders(folder)

    def discard_leftovers(self, path: str) -> None:
        """One listing of the folder, only for deliveries being retried."""
        folder, name = posixpath.split(self._remote(path))
        with suppress(OSError, paramiko.SSHException, EOFError):
            for entry in self.sftp.listdir(folder):
                if entry.startswith(f".{name}.") and entry.endswith(".partial"):
                    self.sftp.remove(posixpath.join(folder, entry))

    def _discard(self, temporary: str, error: DeliveryError) -> DeliveryError:
        """Remove a failed write's temporary file; when the connection is gone, hand its
        name to the retry (`error.leftover`), which removes it over the next connection."""
        try:
            self.sftp.remove(temporary)
        except FileNotFoundError:
            pass
        except (OSError, paramiko.SSHException, EOFError):
            error.leftover = self._relative(temporary)
        return error

    def remove(self, path: str) -> None:
        try:
            self.sftp.remove(self._remote(path))
        except FileNotFoundError:
            return
        except PermissionError:
            raise TerminalDeliveryError("permission denied removing a file") from None
        except OSError as exc:
            raise _sftp_error(exc) from None

    def close(self) -> None:
        with suppress(Exception):
            self.sftp.close()
        self.transport.close()


@dataclass
class _Flight(Generic[K]):
    """A file on its way: the caller's key, the upload, and the names it goes by."""

    key: K
    upload: Upload
    final: str
    temporary: str
    folders: list[str]


FLIGHT_BYTES = 8 * 1024 * 1024
"""Most content bytes of files on their way over one connection: their writes go out whole,
and each stays in memory until its reply comes back."""


def _refusal(error: OSError) -> DeliveryError:
    """What the server's answer to a file's request means for its delivery."""
    if isinstance(error, PermissionError):
        return TerminalDeliveryError(
            "permission denied on the SFTP server: the user may not write in that folder"
        )
    return _sftp_error(error)


def _prefer_aead(ciphers: tuple[str, ...]) -> list[str]:
    """AES-GCM first, then paramiko's own order (AES-CTR...): the server picks the first of ours
    it also allows. GCM needs no separate MAC pass: measured here, 8 connections of bare
    paramiko went from 1,088-1,386 files/s with AES-CTR + HMAC-SHA2 to 1,607-1,680 with GCM,
    and both ends spent about a third less CPU per file."""
    aead = [c for c in ciphers if "-gcm@" in c]
    return aead + [c for c in ciphers if c not in aead]


def _sftp_error(exc: OSError) -> TransientDeliveryError | TerminalDeliveryError:
    if isinstance(exc, socket.timeout | TimeoutError):
        return _transient("the SFTP server did not answer in time")
    if exc.errno == errno.ENOSPC:
        return TerminalDeliveryError("the SFTP server's disk is full")
    # OpenSSH answers most refusals (disk full, quota, read-only) with a bare "Failure".
    reason = exc.strerror or (str(exc.args[0]) if exc.args else type(exc).__name__)
    return _transient(f"the SFTP server refused the write ({reason}); disk full or not writable?")


class SftpDestination(Destination):
    """Deliver to an SFTP server: pinned host key, reused connections, atomic writes."""

    _block_type_name = "SFTP Destination"
    _block_type_slug = "sftp-destination"
    _description = "Deliver patient documents to an organization's SFTP server."

    host: str = Field(title="Host", description="The SFTP server's host name or IP address.")
    port: int = Field(default=22, ge=1, le=65535, title="Port", description="SSH port.")
    username: str = Field(title="Username", description="The account we log in as.")
    password: SecretStr | None = Field(
        default=None, title="Password", description="Password login (or use a private key)."
    )
    private_key: SecretStr | None = Field(
        default=None,
        title="Private key",
        description="An OpenSSH or PEM private key (the file's text) for key login.",
    )
    private_key_passphrase: SecretStr | None = Field(
        default=None, title="Key passphrase", description="Passphrase of the private key, if any."
    )
    host_keys: list[str] = Field(
        title="Pinned host keys",
        description=(
            "The server's public host key(s): known_hosts lines or SHA256 fingerprints. "
            "Get them with `patient-delivery destination host-key HOST:PORT` and check them with "
            "the organization. Several are allowed for key rotation; any other key is refused."
        ),
        min_length=1,
    )
    root: str = Field(
        default=".",
        title="Remote folder",
        description="Folder on the server that paths are relative to (absolute or from login).",
    )
    connect_timeout: float = Field(
        default=15.0, gt=0, title="Connect timeout (s)", description="TCP, SSH handshake, login."
    )
    operation_timeout: float = Field(
        default=60.0, gt=0, title="Operation timeout (s)", description="Each SFTP request."
    )
    files_in_flight: int = Field(
        default=4,
        ge=1,
        le=32,
        title="Files in flight per connection",
        description=(
            "Files on their way over one connection at once: while one waits for the server's "
            "replies, the next one's requests are already sent. More helps on a slow link."
        ),
    )

    @field_validator("host_keys")
    @classmethod
    def _check_pins(cls, value: list[str]) -> list[str]:
        for entry in value:
            HostKeyPin.parse(entry)
        return value

    @model_validator(mode="after")
    def _check_login(self) -> SftpDestination:
        if self.password is None and self.private_key is None:
            raise ValueError("give a password or a private key to log in with")
        return self

    def describe(self) -> str:
        root = self.root if self.root.startswith("/") else "/~/" + self.root.lstrip("./")
        return f"sftp://{self.username}@{self.host}:{self.port}{root.rstrip('/') or '/'}"

    def _pins(self) -> list[HostKeyPin]:
        return [HostKeyPin.parse(entry) for entry in self.host_keys]

    def _connect(self) -> paramiko.Transport:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise _transient(
                f"cannot reach {self.host}:{self.port} ({exc.strerror or type(exc).__name__})"
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        transport.banner_timeout = self.connect_timeout
        transport.auth_timeout = self.connect_timeout
        transport.handshake_timeout = self.connect_timeout
        options = transport.get_security_options()
        options.ciphers = _prefer_aead(options.ciphers)
        key_types = sorted({p.key_type for p in self._pins() if p.key_type})
        if key_types and all(p.key_type for p in self._pins()):
            # Ask for the kinds of key we pinned, so a server holding several presents one of them.
            options.key_types = [t for t in options.key_types if t in key_types] or key_types
        try:
            transport.start_client(timeout=self.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport.close()
            raise _transient(
                f"SSH handshake with {self.host}:{self.port} failed ({type(exc).__name__})"
            ) from None
        return transport

    def _verify_host_key(self, transport: paramiko.Transport) -> None:
        key = transport.get_remote_server_key()
        seen = fingerprint(key)
        if not any(pin.fingerprint == seen for pin in self._pins()):
            transport.close()
            raise TerminalDeliveryError(
                f"host key of {self.host}:{self.port} does not match the pinned key(s): the "
                f"server presented {key.get_name()} {seen}. Nothing was sent. If the "
                "organization confirms a new key, pin it; otherwise this may be an attack."
            )

    def _login(self, transport: paramiko.Transport) -> None:
        try:
            if self.private_key is not None:
                transport.auth_publickey(self.username, _load_private_key(
                    self.private_key, self.private_key_passphrase))  # fmt: skip
            else:
                assert self.password is not None
                transport.auth_password(self.username, self.password.get_secret_value())
        except paramiko.AuthenticationException:
            transport.close()
            raise TerminalDeliveryError(
                f"login as {self.username!r} to {self.host}:{self.port} was refused: check the "
                "username and password or key"
            ) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport.close()
            raise _transient(
                f"login to {self.host}:{self.port} failed ({type(exc).__name__})"
            ) from None

    @contextmanager
    def open_session(self) -> Iterator[SftpSession]:
        transport = self._connect()
        self._verify_host_key(transport)
        self._login(transport)
        try:
            sftp = paramiko.SFTPClient.from_transport(transport)
            assert sftp is not None
            channel = sftp.get_channel()
            assert channel is not None
            channel.settimeout(self.operation_timeout)
            root = sftp.normalize(self.root)
            limits = sftp_pipeline.server_limits(sftp)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport.close()
            raise _transient(
                f"cannot start SFTP on {self.host}:{self.port} ({type(exc).__name__})"
            ) from None
        session = SftpSession(transport, sftp, root, self.files_in_flight, limits)
        try:
            yield session
        finally:
            session.close()


def _load_private_key(key: SecretStr, passphrase: SecretStr | None) -> paramiko.PKey:
    text = key.get_secret_value()
    password = passphrase.get_secret_value() if passphrase else None
    for kind in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return kind.from_private_key(io.StringIO(text), password=password)
        except paramiko.PasswordRequiredException:
            raise TerminalDeliveryError("the private key needs a passphrase") from None
        except (paramiko.SSHException, ValueError):
            continue
    raise TerminalDeliveryError(
        "the private key cannot be read (wrong passphrase or unsupported key type)"
    )


def fetch_host_key(host: str, port: int = 22, timeout: float = 15.0) -> paramiko.PKey:
    """Connect and return the server's host key without logging in: for an operator to pin."""
    sock = socket.create_connection((host, port), timeout=timeout)
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    finally:
        transport.close()
