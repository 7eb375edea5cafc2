"""Every use of paramiko's internals, in one place.

paramiko's public SFTP calls wait for each reply, one round trip per request. Sending several
requests before reading any reply (what `pipeline.Put` does) needs the request machinery that
paramiko's own pipelined writes and prefetching use: `SFTPClient._async_request` sends a request
whose reply is handed to an owner's `_async_response`, `_read_response` reads one reply, and
`_request` sends one and waits. The SFTP command numbers and `int64` come from `paramiko.sftp`,
and a channel's `out_max_packet_size` says how large one message may be.

paramiko reads the server's VERSION packet and keeps only the version number; `Client` keeps
its extensions too (what the server offers: `posix-rename@openssh.com`, `limits@openssh.com`),
by reading that packet itself in `_send_version`.

`missing()` names whatever of these an upgraded paramiko no longer has; a test calls it, so an
upgrade that removes one fails by this module's name rather than somewhere in a run.
"""

from __future__ import annotations

import inspect

import paramiko
from paramiko import sftp as protocol
from paramiko.message import Message

CLOSE = protocol.CMD_CLOSE
INIT = protocol.CMD_INIT
REMOVE = protocol.CMD_REMOVE
RENAME = protocol.CMD_RENAME
VERSION = protocol.CMD_VERSION
EXTENDED = protocol.CMD_EXTENDED
EXTENDED_REPLY = protocol.CMD_EXTENDED_REPLY
HANDLE = protocol.CMD_HANDLE
MKDIR = protocol.CMD_MKDIR
OPEN = protocol.CMD_OPEN
STATUS = protocol.CMD_STATUS
WRITE = protocol.CMD_WRITE
FLAG_CREATE = protocol.SFTP_FLAG_CREATE
FLAG_TRUNC = protocol.SFTP_FLAG_TRUNC
FLAG_WRITE = protocol.SFTP_FLAG_WRITE
NO_SUCH_FILE = protocol.SFTP_NO_SUCH_FILE
OK = protocol.SFTP_OK
FAILURE = protocol.SFTP_FAILURE
BAD_MESSAGE = protocol.SFTP_BAD_MESSAGE
OP_UNSUPPORTED = protocol.SFTP_OP_UNSUPPORTED
PERMISSION_DENIED = protocol.SFTP_PERMISSION_DENIED
int64 = protocol.int64

Reply = tuple[int, Message]

REQUIRED = (
    "BaseSFTP._send_version (called when SFTPClient starts)",
    "BaseSFTP._send_packet",
    "BaseSFTP._read_packet",
    "SFTPClient._async_request",
    "SFTPClient._read_response",
    "SFTPClient._request",
    "reply owners' _async_response",
    "Channel.out_max_packet_size",
)
"""paramiko's internals this module relies on, as `missing()` reports them."""


SFTP_VERSION = 3
"""The protocol version we ask for: the one every server speaks, and the one paramiko knows."""


class Client(paramiko.SFTPClient):
    """paramiko's SFTP client, which also keeps what the server said it speaks: `version` and
    `extensions` (name to data, from the server's VERSION packet)."""

    version: int = SFTP_VERSION
    extensions: dict[str, bytes]

    def _send_version(self) -> int:
        """paramiko's own exchange (INIT, then VERSION), keeping the extensions it drops."""
        hello = Message()
        hello.add_int(SFTP_VERSION)
        self._send_packet(INIT, hello)
        kind, data = self._read_packet()
        if kind != VERSION:
            raise paramiko.SFTPError("Incompatible sftp protocol")
        answer = Message(data)
        self.version = answer.get_int()
        self.extensions = {}
        while answer.get_remainder():
            name = answer.get_string().decode("utf-8", "replace")
            self.extensions[name] = answer.get_string()
        return self.version


def open_client(transport: paramiko.Transport) -> Client:
    """Start SFTP on a logged-in connection."""
    client = Client.from_transport(transport)
    if client is None:
        raise paramiko.SSHException("the server did not start SFTP")
    return client


class ReplyOwner:
    """What paramiko hands the replies of `send`'s requests to: subclasses define `on_reply`."""

    def on_reply(self, kind: int, message: Message, number: int) -> None:
        raise NotImplementedError

    def _async_response(self, kind: int, message: Message, number: int) -> None:
        """paramiko's name for `on_reply`."""
        self.on_reply(kind, message, number)


def send(sftp: paramiko.SFTPClient, owner: ReplyOwner, command: int, *arguments: object) -> int:
    """Send one request without waiting; its reply goes to `owner`. The request's number."""
    return sftp._async_request(owner, command, *arguments)


def read_reply(sftp: paramiko.SFTPClient) -> None:
    """Read the next reply and hand it to its owner (raises when the connection fails)."""
    sftp._read_response()


def request(sftp: paramiko.SFTPClient, command: int, *arguments: object) -> Reply:
    """Send one request and wait for its reply (an error status raises OSError)."""
    return sftp._request(command, *arguments)


def largest_message(sftp: paramiko.SFTPClient) -> int:
    """Most bytes the server takes in one channel message."""
    return sftp.sock.out_max_packet_size


def missing() -> list[str]:
    """The internals of `REQUIRED` this paramiko no longer has (empty when all are there)."""
    client = paramiko.SFTPClient
    gone = [
        f"SFTPClient.{name}"
        for name in ("_async_request", "_read_response", "_request")
        if not callable(getattr(client, name, None))
    ]
    gone += [
        f"BaseSFTP.{name}"
        for name in ("_send_version", "_send_packet", "_read_packet")
        if not callable(getattr(protocol.BaseSFTP, name, None))
    ]
    if "_send_version" not in inspect.getsource(client.__init__):
        gone.append("BaseSFTP._send_version (called when SFTPClient starts)")
    reads = getattr(client, "_read_response", None)
    if reads is not None and "_async_response" not in inspect.getsource(reads):
        gone.append("reply owners' _async_response")
    if not hasattr(paramiko.Channel(0), "out_max_packet_size"):
        gone.append("Channel.out_max_packet_size")
    return gone
