"""Pipelined SFTP requests: several sent before any reply is read, and every reply checked.

paramiko's public calls wait for each reply, one round trip per request, and its pipelined file
writes drop the server's replies to the writes, so a full disk goes unnoticed until a size
check. A verified, atomic upload here takes three round trips whatever its size and however
many folders it needs:

    [mkdir ..., open temporary]  ->  [write ..., close]  ->  [posix-rename to the final name]

and reads every reply: a write the server refused fails the upload before the rename.

Built on `SFTPClient._async_request` and `_read_response`, the two methods paramiko's own
pipelined writes and prefetching use; paramiko is pinned in uv.lock and the SFTP tests run
against a real OpenSSH server, so a change there shows.
"""

from __future__ import annotations

import errno

import paramiko
from paramiko.message import Message
from paramiko.sftp import (
    CMD_CLOSE,
    CMD_EXTENDED,
    CMD_HANDLE,
    CMD_MKDIR,
    CMD_OPEN,
    CMD_STATUS,
    CMD_WRITE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_TRUNC,
    SFTP_FLAG_WRITE,
    SFTP_NO_SUCH_FILE,
    SFTP_OK,
    SFTP_PERMISSION_DENIED,
    int64,
)

WRITE_SIZE = 32_768
"""Most bytes per write request: the size every SFTP server must accept (OpenSSH takes more, but
that gained under 5% here)."""

WRITE_HEADER = 25
"""Bytes an SFTP write request adds to its data and handle: length, type, request id, the
handle's and the data's lengths, offset."""

CHANNEL_RESERVE = 64
"""What paramiko keeps back from the server's maximum packet size in each channel message."""

Reply = tuple[int, Message]


class Replies:
    """Requests sent as one batch on one SFTP channel, and their replies by request number.

    paramiko hands a reply that nobody is waiting for to its request's owner through
    `_async_response`; this object is that owner, so no reply is dropped.
    """

    def __init__(self, sftp: paramiko.SFTPClient) -> None:
        self._sftp = sftp
        self._sent: list[int] = []
        self._replies: dict[int, Reply] = {}

    def send(self, command: int, *arguments: object) -> None:
        self._sent.append(self._sftp._async_request(self, command, *arguments))

    def _async_response(self, kind: int, message: Message, number: int) -> None:
        self._replies[number] = (kind, message)

    def wait(self) -> list[Reply]:
        """Read until every request sent has its reply; the replies in the order sent."""
        while any(number not in self._replies for number in self._sent):
            self._sftp._read_response()
        replies = [self._replies.pop(number) for number in self._sent]
        self._sent = []
        return replies


def status_error(reply: Reply) -> OSError | None:
    """The error a status reply reports (as paramiko raises it), or None for success."""
    kind, message = reply
    if kind != CMD_STATUS:
        return OSError(f"unexpected SFTP reply type {kind}")
    code, text = message.get_int(), message.get_text()
    if code == SFTP_OK:
        return None
    if code == SFTP_NO_SUCH_FILE:
        return OSError(errno.ENOENT, text)
    if code == SFTP_PERMISSION_DENIED:
        return OSError(errno.EACCES, text)  # a PermissionError
    return OSError(text)


def write_size(sftp: paramiko.SFTPClient, handle: bytes) -> int:
    """Data per write so that each request fits one SSH channel message.

    A 32,768-byte write is 32,797 bytes on the channel, and paramiko sends at most the server's
    maximum packet size less 64 per message (32,704 for OpenSSH's 32 KiB): every write went
    out as two encrypted packets, the second of 93 bytes, each costing both ends a packet's
    work. Fitting the write halves the packets sent for a document's bytes.
    """
    fits = sftp.sock.out_max_packet_size - CHANNEL_RESERVE - WRITE_HEADER - len(handle)
    return max(1024, min(WRITE_SIZE, fits))


def put(
    sftp: paramiko.SFTPClient, folders: list[str], temporary: str, final: str, content: bytes
) -> None:
    """Create `folders` (top-down; existing ones are fine), write `content` to `temporary`,
    check every write, then rename it over `final`. Raises OSError as paramiko would."""
    replies = Replies(sftp)
    for folder in folders:
        replies.send(CMD_MKDIR, folder, paramiko.SFTPAttributes())
    flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC
    replies.send(CMD_OPEN, temporary, flags, paramiko.SFTPAttributes())
    *made, (kind, message) = replies.wait()
    if kind != CMD_HANDLE:
        # An existing folder's mkdir fails too, harmlessly; when the open fails, a refused
        # mkdir says why better than the open's "no such file".
        refusals = [e for e in map(status_error, made) if isinstance(e, PermissionError)]
        raise refusals[0] if refusals else (status_error((kind, message)) or OSError("open"))
    handle = message.get_binary()
    size = write_size(sftp, handle)
    view = memoryview(content)
    for offset in range(0, len(content), size):
        replies.send(CMD_WRITE, handle, int64(offset), bytes(view[offset : offset + size]))
    replies.send(CMD_CLOSE, handle)
    for reply in replies.wait():
        if error := status_error(reply):
            raise error
    replies.send(CMD_EXTENDED, "posix-rename@openssh.com", temporary, final)
    if error := status_error(replies.wait()[0]):
        raise error
