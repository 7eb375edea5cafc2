"""An organization's SFTP server: pinned host key, password or key login, atomic writes where the
server allows them.

- The server's host key must match one pinned in the block (`host_keys`).
- Login as the server asks: a key, a password (or keyboard-interactive with it, for servers
  that turn "password" off), or a key and then a password (`AuthenticationMethods
  publickey,password`).
- Files are put in place as the server allows (`landing`, from what it offers by default).
- paramiko never sets `TCP_NODELAY`; we open the socket ourselves and set it, or each small
  request waits on Nagle's algorithm.
- AES-GCM is offered first: it needs no separate MAC pass, so both ends spend less CPU per file.
- Each file goes through `session.SftpSession`: a temporary name, checked writes, a rename.
"""

from __future__ import annotations

import io
import socket
import stat
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Annotated, Literal

import paramiko
from pydantic import (
    BeforeValidator,
    Field,
    PlainSerializer,
    SecretStr,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from patient_delivery.blocks.base import Destination
from patient_delivery.blocks.contract import (
    DeliveryError,
    TerminalDeliveryError,
    TransientDeliveryError,
)
from patient_delivery.blocks.sftp import paramiko_adapter as sftp_protocol
from patient_delivery.blocks.sftp import pipeline
from patient_delivery.blocks.sftp.host_keys import HostKeyPin, algorithms, fingerprint
from patient_delivery.blocks.sftp.session import SftpSession


def _prefer_aead(ciphers: tuple[str, ...]) -> list[str]:
    """AES-GCM first, then paramiko's own order (AES-CTR...): the server picks the first of ours
    it also allows. GCM needs no separate MAC pass, so both ends spend less CPU per file than
    with AES-CTR and an HMAC."""
    aead = [c for c in ciphers if "-gcm@" in c]
    return aead + [c for c in ciphers if c not in aead]


class NoCommonAlgorithm(TerminalDeliveryError):
    """The SSH handshake found no algorithm both ends accept."""


ROOT_PATTERN = r"^(?!(.*[/\\])?\.\.([/\\]|$))"
"""A remote folder with no `..` folder in it (JSON Schema, for the block's form)."""


def _lines(value: object) -> object:
    """Pins as typed in the block form (one per line) or as a list."""
    if isinstance(value, str):
        return [line.strip() for line in value.splitlines() if line.strip()]
    return value


Pins = Annotated[
    list[str],
    BeforeValidator(_lines),
    PlainSerializer(lambda pins: "\n".join(pins), return_type=str),
    WithJsonSchema({"type": "string", "pattern": r"\S"}),  # a pin, not only blank lines
]
"""Pinned host keys: a list in Python; saved, and shown in the block form, as text with one pin
per line (Prefect's block form can show a list of strings only as a JSON editor)."""


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
    host_keys: Pins = Field(
        title="Pinned host keys",
        description=(
            "The server's public host key(s), one per line: known_hosts lines or SHA256 "
            "fingerprints. Get them with `patient-delivery destination host-key HOST:PORT` and "
            "check them with the organization. Several are allowed for key rotation; any other "
            "key is refused."
        ),
        min_length=1,
    )
    root: str = Field(
        default=".",
        title="Remote folder",
        description=(
            "Folder on the server that paths are relative to (absolute or from login). It must "
            "exist: folders under it are created, the root itself never is. No `..` folder."
        ),
        json_schema_extra={"pattern": ROOT_PATTERN},  # the UI's form refuses `..` as well
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
    landing: Literal["auto", "posix-rename", "rename", "direct"] = Field(
        default="auto",
        title="Landing",
        description=(
            "How each file is put at its final name. auto: posix-rename where the server "
            "offers it, else rename. posix-rename: a temporary name, then OpenSSH's atomic "
            "rename over the final one. rename: a temporary name, then the standard SFTP "
            "rename (atomic for a new file; a file being replaced is removed first). direct: "
            "the final name is written itself, for servers that refuse or mishandle renames "
            "(S3-backed ones); the manifest, written last, says the drop is complete."
        ),
    )

    @field_validator("root")
    @classmethod
    def _check_root(cls, value: str) -> str:
        if ".." in value.replace("\\", "/").split("/"):
            raise ValueError("must not hold a `..` folder: the organization chose the folder, "
                             "not one beside it")  # fmt: skip
        return value

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

    def pins(self) -> list[HostKeyPin]:
        return [HostKeyPin.parse(entry) for entry in self.host_keys]

    def connect(
        self, wanted: set[str] | None = None, refused: Collection[str] = ()
    ) -> paramiko.Transport:
        """Open the SSH transport, asking for host keys of the `wanted` algorithms (None: any
        paramiko takes) and not the `refused` ones."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise TransientDeliveryError(
                f"cannot reach {self.host}:{self.port} ({exc.strerror or type(exc).__name__})"
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = paramiko.Transport(sock)
        transport.banner_timeout = self.connect_timeout
        transport.auth_timeout = self.connect_timeout
        transport.handshake_timeout = self.connect_timeout
        options = transport.get_security_options()
        options.ciphers = _prefer_aead(options.ciphers)
        options.key_types = [t for t in options.key_types
                             if (wanted is None or t in wanted) and t not in refused]  # fmt: skip
        try:
            transport.start_client(timeout=self.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport.close()
            if "Incompatible" in str(exc):  # nothing in common
                raise NoCommonAlgorithm(
                    f"SSH handshake with {self.host}:{self.port} failed: the server offers no "
                    "key exchange, host key or cipher we accept (SHA-1 ones such as ssh-rsa "
                    "and diffie-hellman-group14-sha1 are not supported); ask the organization "
                    "to enable current algorithms"
                ) from None
            raise TransientDeliveryError(
                f"SSH handshake with {self.host}:{self.port} failed ({type(exc).__name__})"
            ) from None
        return transport

    def handshake(self) -> paramiko.Transport:
        """Connect to a server presenting a pinned host key, or refuse, naming the key it
        presented. Known_hosts pins ask for their kinds of key, so a server holding several
        presents one of them. A bare fingerprint says no kind: the server presents its first
        choice, and the kinds it holds besides are asked for in turn before the key counts as
        not matching."""
        pins = self.pins()
        expected = {pin.fingerprint for pin in pins}
        typed = all(pin.key_type for pin in pins)
        wanted = {a for pin in pins for a in algorithms(pin.key_type or "")} if typed else None
        refused: set[str] = set()
        presented: paramiko.PKey | None = None
        while True:
            try:
                transport = self.connect(wanted, refused)
            except NoCommonAlgorithm:
                if presented is None and wanted is not None:  # none of the pinned kinds
                    wanted = None  # ask for any, to name the key the server has
                    continue
                if presented is None:
                    raise
                raise self._mismatch(presented) from None
            key = transport.get_remote_server_key()
            if fingerprint(key) in expected:
                return transport
            transport.close()
            presented = presented or key
            if typed:
                raise self._mismatch(presented)
            refused |= set(algorithms(key.get_name()))

    def _mismatch(self, key: paramiko.PKey) -> TerminalDeliveryError:
        return TerminalDeliveryError(
            f"host key of {self.host}:{self.port} does not match the pinned key(s): the server "
            f"presented {key.get_name()} {fingerprint(key)}. Nothing was sent. If the "
            "organization confirms a new key, pin it; otherwise this may be an attack."
        )

    def login(self, transport: paramiko.Transport) -> None:
        """The key first, if there is one; then the password, where the server still asks for
        one (after a key, `AuthenticationMethods publickey,password`) or there is no key."""
        try:
            if self.private_key is not None:
                key = _load_private_key(self.private_key, self.private_key_passphrase)
                if not transport.auth_publickey(self.username, key):
                    return  # logged in
                if self.password is None:
                    raise paramiko.AuthenticationException("the server asks for more than a key")
            assert self.password is not None
            _password_login(transport, self.username, self.password.get_secret_value())
        except paramiko.AuthenticationException:
            transport.close()
            raise TerminalDeliveryError(
                f"login as {self.username!r} to {self.host}:{self.port} was refused: check the "
                "username and password or key"
            ) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport.close()
            raise TransientDeliveryError(
                f"login to {self.host}:{self.port} failed ({type(exc).__name__})"
            ) from None

    @contextmanager
    def open_session(self) -> Iterator[SftpSession]:
        transport = self.handshake()
        self.login(transport)
        try:
            sftp = sftp_protocol.open_client(transport)
            channel = sftp.get_channel()
            assert channel is not None
            channel.settimeout(self.operation_timeout)
            root = _existing_root(sftp, self.root)
            limits = pipeline.server_limits(sftp)
        except DeliveryError:
            transport.close()
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport.close()
            raise TransientDeliveryError(
                f"cannot start SFTP on {self.host}:{self.port} ({type(exc).__name__})"
            ) from None
        landing = self.landing_on(sftp)
        session = SftpSession(transport, sftp, root, self.files_in_flight, limits, landing)
        try:
            yield session
        finally:
            session.close()

    def landing_on(self, sftp: sftp_protocol.Client) -> pipeline.Landing:
        """The landing set, or for `auto` the one the server's offer allows."""
        if self.landing != "auto":
            return pipeline.Landing(self.landing)
        if pipeline.POSIX_RENAME in sftp.extensions:
            return pipeline.Landing.POSIX_RENAME
        return pipeline.Landing.RENAME


def _password_login(transport: paramiko.Transport, username: str, password: str) -> None:
    """Log in with the password, or with keyboard-interactive answering the password to its
    prompt, for servers that turn "password" off."""
    try:
        transport.auth_password(username, password)
    except paramiko.BadAuthenticationType as refused:
        if "keyboard-interactive" not in refused.allowed_types:
            raise

        def answer(_title: str, _instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
            return [password for _prompt, _echo in prompts]

        transport.auth_interactive(username, answer)


def _existing_root(sftp: paramiko.SFTPClient, folder: str) -> str:
    """The root as the server resolves it. It must be a folder that exists: it is never
    created (a typo would otherwise scatter files), while folders under it are."""
    root = folder
    try:
        root = sftp.normalize(folder)
        mode = sftp.stat(root).st_mode or 0
    except FileNotFoundError:
        raise TerminalDeliveryError(
            f"folder {root} does not exist on the server (the destination's root is never "
            "created; create it, or correct the root)"
        ) from None
    except PermissionError:
        if root == "/":  # a chroot's root, which some servers will not describe: writes will
            return root
        raise TerminalDeliveryError(f"permission denied on folder {root} on the server") from None
    except OSError as exc:
        if "unsupported" not in str(exc).lower():
            raise
        return root  # a server that cannot say: its writes will
    if not stat.S_ISDIR(mode):
        raise TerminalDeliveryError(f"{root} on the server is not a folder")
    return root


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
