"""SFTP host keys: their fingerprints, a pinned key, and a server's key for an operator to pin.

The server's host key must match one pinned in the block (a known_hosts line or a `SHA256:`
fingerprint; several for key rotation). Anything else is refused and the key that was seen is
reported, so an operator can check it and pin it; nothing is ever auto-accepted.
"""

from __future__ import annotations

import base64
import hashlib
import socket
from dataclasses import dataclass

import paramiko


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint of a public key, e.g. `SHA256:Xr0...` (no padding)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_line(host: str, port: int, key: paramiko.PKey) -> str:
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {key.get_name()} {key.get_base64()}"


def algorithms(key_type: str) -> tuple[str, ...]:
    """The host key algorithms under which a server presents a key of this type. An RSA key
    (`ssh-rsa` in known_hosts) signs with SHA-2, as `rsa-sha2-512` or `rsa-sha2-256`; the SHA-1
    algorithm also named `ssh-rsa` is off in current servers and in paramiko."""
    return ("rsa-sha2-512", "rsa-sha2-256") if key_type == "ssh-rsa" else (key_type,)


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


def fetch_host_key(host: str, port: int = 22, timeout: float = 15.0) -> paramiko.PKey:
    """Connect and return the server's host key without logging in: for an operator to pin."""
    sock = socket.create_connection((host, port), timeout=timeout)
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    finally:
        transport.close()
