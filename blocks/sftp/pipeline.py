"""Pipelined SFTP requests: several sent before any reply is read, and every reply checked.

paramiko's public calls wait for each reply, one round trip per request, and its pipelined file
writes drop the server's replies to the writes, so a full disk goes unnoticed until a size
check. A verified, atomic upload here takes three round trips whatever its size and however
many folders it needs:

    [mkdir ..., open temporary]  ->  [write ..., close]  ->  [posix-rename to the final name]

and reads every reply: a write the server refused fails the upload before the rename. Servers
without `posix-rename@openssh.com` get the standard rename (and, over an existing file, a
remove and the rename again), or the final name written directly (`Landing`). Each file
is a `Put`, the owner paramiko hands that file's replies to, so several files can be on their
way over one channel at once (`SftpSession.upload_many`): while one waits for its replies,
the next one's requests are already on the wire.

Built on paramiko's request machinery through `paramiko_adapter`, the one module that touches
paramiko's internals; the SFTP tests run against a real OpenSSH server.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import StrEnum

import paramiko
from paramiko.message import Message

from patient_delivery.blocks.sftp import paramiko_adapter as sftp_protocol
from patient_delivery.blocks.sftp.paramiko_adapter import Reply

WRITE_SIZE = 32_768
"""Most bytes per write request on a server that does not say what it takes: the size every SFTP
server must accept."""

LARGEST_WRITE = 261_120
"""Most bytes per write request on a server that says it takes more (OpenSSH says 255 KiB): most
documents then go in one write and one reply instead of one per 32 KiB, less CPU per file at
both ends."""

WRITE_HEADER = 25
"""Bytes an SFTP write request adds to its data and handle: length, type, request id, the
handle's and the data's lengths, offset."""

CHANNEL_RESERVE = 64
"""What paramiko keeps back from the server's maximum packet size in each channel message."""


@dataclass(frozen=True)
class Limits:
    """What one request may carry on this server: `write` bytes of data in a write, `packet`
    bytes in all (0: not said)."""

    write: int = WRITE_SIZE
    packet: int = 0


EVERY_SERVER = Limits()
"""What every SFTP server must take: for a server that does not say."""


def server_limits(sftp: paramiko.SFTPClient) -> Limits:
    """The server's limits, where it answers the `limits@openssh.com` request (OpenSSH's
    sftp-server does); the sizes every server must accept where it does not. Raises
    SSHException or EOFError when the connection fails."""
    try:
        kind, reply = sftp_protocol.request(sftp, sftp_protocol.EXTENDED, "limits@openssh.com")
    except OSError:  # answered with an error status: the server does not know the request
        return EVERY_SERVER
    if kind != sftp_protocol.EXTENDED_REPLY:
        return EVERY_SERVER
    packet, _read, write = reply.get_int64(), reply.get_int64(), reply.get_int64()
    if write == 0:  # "no limit of its own": keep to what every server takes
        return EVERY_SERVER
    return Limits(write=max(1024, min(write, LARGEST_WRITE)), packet=packet)


class Landing(StrEnum):
    """How a file is put at its final name, by what the server allows."""

    POSIX_RENAME = "posix-rename"
    """A temporary name, then `posix-rename@openssh.com` over the final one: atomic, also when
    it replaces a file (OpenSSH and servers that offer the extension)."""
    RENAME = "rename"
    """A temporary name, then the standard SFTP rename: atomic for a new file. A server that
    will not rename over an existing file has it removed first, and the rename tried again:
    between the two the final name is absent (the ledger still owes the delivery if the
    connection ends there)."""
    DIRECT = "direct"
    """The final name is written itself: for servers that refuse or mishandle renames. While
    it is written the file is incomplete; the manifest, written last, says the drop is whole."""


POSIX_RENAME = "posix-rename@openssh.com"


class Refused(Exception):
    """The server answered a request of a `Put` with an error (`error`, as paramiko raises it),
    at `step` (open, write, rename, replace), with the SFTP status `code`. Kept apart from the
    OSError a broken connection raises: only that one ends the session."""

    def __init__(self, error: OSError, step: str, code: int) -> None:
        super().__init__(error)
        self.error, self.step, self.code = error, step, code


class Put(sftp_protocol.ReplyOwner):
    """One file on its way: create `folders` (top-down; existing ones are fine), write
    `content` (to `temporary`, or to `final` itself when landing directly), check every write,
    then put it in place as `landing` says.

    Each step's requests go out together; `advance()` checks their replies once all are in
    (`waiting` is False) and sends the next step. When a step's last reply arrives, the put
    appends itself to `ready`, so a driver with many puts on one channel knows which to advance.
    """

    OPEN, WRITE, LAND, REPLACE, DONE, FOLDERS = range(6)

    def __init__(
        self,
        sftp: paramiko.SFTPClient,
        folders: list[str],
        temporary: str,
        final: str,
        content: bytes,
        ready: list[Put],
        limits: Limits,
        landing: Landing = Landing.POSIX_RENAME,
        in_order: bool = True,
    ) -> None:
        self.sftp = sftp
        self.limits = limits
        self.landing = landing
        self.final, self.content = final, content
        self.temporary = final if landing == Landing.DIRECT else temporary
        self.ready = ready
        self.sent: list[int] = []
        self.replies: dict[int, Reply] = {}
        self.step = self.OPEN
        self.refused_rename: Refused | None = None
        """Why the first rename over an existing file was refused, while it is removed."""
        self.folders = list(folders)
        self.denied: list[Reply] = []
        """Refused mkdirs: why an open in a folder that is not there failed."""
        self.folders_one_by_one = not in_order
        """Whether the folders are made one at a time: the server does not process a channel's
        requests in order (a later one may run before an earlier one ends)."""
        if self.folders_one_by_one:
            self._next_folder()
            return
        for folder in folders:
            self.send(sftp_protocol.MKDIR, folder, paramiko.SFTPAttributes())
        self._open()

    def _open(self) -> None:
        flags = sftp_protocol.FLAG_WRITE | sftp_protocol.FLAG_CREATE | sftp_protocol.FLAG_TRUNC
        self.send(sftp_protocol.OPEN, self.temporary, flags, paramiko.SFTPAttributes())
        self.step = self.OPEN

    def _next_folder(self) -> None:
        """Make the next folder alone, or open the file once they are all made."""
        if self.folders:
            self.send(sftp_protocol.MKDIR, self.folders.pop(0), paramiko.SFTPAttributes())
            self.step = self.FOLDERS
        else:
            self._open()

    def send(self, command: int, *arguments: object) -> None:
        self.sent.append(sftp_protocol.send(self.sftp, self, command, *arguments))

    def on_reply(self, kind: int, message: Message, number: int) -> None:
        """paramiko hands over a reply to one of this put's requests."""
        self.replies[number] = (kind, message)
        if not self.waiting:
            self.ready.append(self)

    @property
    def waiting(self) -> bool:
        """Replies to this step's requests are still to come."""
        return len(self.replies) < len(self.sent)

    @property
    def placing(self) -> bool:
        """The step on its way is the one that puts the file at its final name: once it is
        answered without an error, the file is in place."""
        return self.step == self.LAND or (
            self.step == self.WRITE and self.landing == Landing.DIRECT
        )

    def collect(self) -> list[Reply]:
        replies = [self.replies.pop(number) for number in self.sent]
        self.sent = []
        return replies

    def advance(self) -> bool:
        """Check the step whose replies are all in and send the next one; True once the file
        is in place. Raises `Refused` for an answered error, OSError, SSHException or EOFError
        when the connection fails."""
        replies = self.collect()
        if self.step == self.FOLDERS:  # one made (or there already): the next, or the file
            self.denied += [r for r in replies if status_code(r) == sftp_protocol.PERMISSION_DENIED]
            self._next_folder()
            return False
        if self.step == self.OPEN:
            *made, (kind, message) = replies
            # An existing folder's mkdir fails too, harmlessly; when the open fails, a refused
            # mkdir says why better than the open's "no such file".
            self.denied += [r for r in made if status_code(r) == sftp_protocol.PERMISSION_DENIED]
            missing = status_code((kind, message)) == sftp_protocol.NO_SUCH_FILE
            if missing and made and not self.denied and not self.folders_one_by_one:
                # The open ran before its folders were made: again, one request at a time.
                self.folders_one_by_one = True
                self._next_folder()
                return False
            if kind != sftp_protocol.HANDLE:
                raise _refused(self.denied[0] if self.denied else (kind, message), "open")
            self._write(message.get_binary())
            return False
        if self.step == self.WRITE:
            for reply in replies:
                if status_code(reply) != sftp_protocol.OK:
                    raise _refused(reply, "write")
            if self.landing == Landing.DIRECT:
                self.step = self.DONE
                return True
            self._rename()
            return False
        [reply] = replies
        code = status_code(reply)
        if self.step == self.LAND:
            if code == sftp_protocol.OK:
                self.step = self.DONE
                return True
            if self.landing == Landing.POSIX_RENAME and code == sftp_protocol.OP_UNSUPPORTED:
                self.landing = (
                    Landing.RENAME
                )  # offered, or assumed, but not there: the standard one
                self._rename()
                return False
            if (
                self.landing == Landing.RENAME
                and self.refused_rename is None
                and code in (sftp_protocol.FAILURE, FILE_ALREADY_EXISTS)
            ):  # the final name may exist: remove it, and rename again
                self.refused_rename = _refused(reply, "rename")
                self.send(sftp_protocol.REMOVE, self.final)
                self.step = self.REPLACE
                return False
            raise _refused(reply, "rename")
        if code == sftp_protocol.NO_SUCH_FILE and self.refused_rename is not None:
            raise self.refused_rename  # nothing was there to replace: the rename failed for itself
        if code != sftp_protocol.OK:
            raise _refused(reply, "replace")
        self._rename()
        return False

    def _write(self, handle: bytes) -> None:
        size = write_size(self.sftp, handle, self.limits)
        view = memoryview(self.content)
        for offset in range(0, len(self.content), size):
            chunk = bytes(view[offset : offset + size])
            self.send(sftp_protocol.WRITE, handle, sftp_protocol.int64(offset), chunk)
        self.send(sftp_protocol.CLOSE, handle)
        self.step = self.WRITE

    def _rename(self) -> None:
        if self.landing == Landing.POSIX_RENAME:
            self.send(sftp_protocol.EXTENDED, POSIX_RENAME, self.temporary, self.final)
        else:
            self.send(sftp_protocol.RENAME, self.temporary, self.final)
        self.step = self.LAND


FILE_ALREADY_EXISTS = 11
"""The status SFTP version 6 servers answer a rename over an existing file with (version 3 ones
answer a plain failure)."""


def status_code(reply: Reply) -> int:
    """The status a reply carries (`FAILURE` for a reply that is not a status)."""
    kind, message = reply
    if kind != sftp_protocol.STATUS:
        return sftp_protocol.FAILURE
    return Message(message.get_remainder()).get_int()  # read from a copy: the reply stays unread


def _refused(reply: Reply, step: str) -> Refused:
    return Refused(status_error(reply) or OSError(step), step, status_code(reply))


def status_error(reply: Reply) -> OSError | None:
    """The error a status reply reports (as paramiko raises it), or None for success."""
    kind, message = reply
    if kind != sftp_protocol.STATUS:
        return OSError(f"unexpected SFTP reply type {kind}")
    status = Message(message.get_remainder())
    code, text = status.get_int(), status.get_text()
    if code == sftp_protocol.OK:
        return None
    if code == sftp_protocol.NO_SUCH_FILE:
        return OSError(errno.ENOENT, text)
    if code == sftp_protocol.PERMISSION_DENIED:
        return OSError(errno.EACCES, text)  # a PermissionError
    if code in (sftp_protocol.FAILURE, sftp_protocol.BAD_MESSAGE):
        return GenericFailure(text)
    return OSError(text)


class GenericFailure(OSError):
    """A request the server failed without a cause: SFTP version 3's generic failure, or "bad
    message" from servers that answer so when a write fails (a full disk, a quota)."""


def write_size(sftp: paramiko.SFTPClient, handle: bytes, limits: Limits) -> int:
    """Data per write: as much as the server takes, within its packet limit; at 32 KiB, what
    fits one SSH channel message.

    A 32,768-byte write is 32,797 bytes on the channel, and paramiko sends at most the server's
    maximum packet size less 64 per message (32,704 for OpenSSH's 32 KiB): an unfitted write
    goes out as two encrypted packets, the second of 93 bytes, each costing both ends a
    packet's work. Fitting the write halves the packets sent for a document's bytes.
    """
    if limits.write > WRITE_SIZE:
        size = limits.write
        if limits.packet:
            size = min(size, limits.packet - WRITE_HEADER - len(handle))
        return max(1024, size)
    fits = sftp_protocol.largest_message(sftp) - CHANNEL_RESERVE - WRITE_HEADER - len(handle)
    return max(1024, min(limits.write, fits))
