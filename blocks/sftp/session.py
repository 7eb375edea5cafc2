"""One SFTP connection's uploads: each file under a temporary name, every write's reply checked,
then renamed into place with `posix-rename@openssh.com` (plain `rename` fails over an existing
file on OpenSSH). Several files are on their way over the one channel at once (`pipeline`).
"""

from __future__ import annotations

import errno
import posixpath
import socket
from collections.abc import Collection, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Generic

import paramiko

from patient_delivery.blocks.contract import (
    DeliveryError,
    DestinationSession,
    K,
    Receipt,
    TerminalDeliveryError,
    TransientDeliveryError,
    Upload,
    check_content,
)
from patient_delivery.blocks.naming import contained, is_temporary_of, temporary_name
from patient_delivery.blocks.sftp import paramiko_adapter as sftp_protocol
from patient_delivery.blocks.sftp import pipeline


class SftpSession(DestinationSession):
    def __init__(
        self,
        transport: paramiko.Transport,
        sftp: paramiko.SFTPClient,
        root: str,
        files_in_flight: int,
        limits: pipeline.Limits,
    ) -> None:
        self.transport = transport
        self.sftp = sftp
        self.root = root
        self.files_in_flight = files_in_flight
        self.limits = limits
        """How much each write may carry on this server (asked once per connection)."""
        self.folders_known: set[str] = {posixpath.normpath(root)}  # the block checked it exists

    def remote(self, path: str) -> str:
        """Where `path` goes on the server (refused when it would leave the root)."""
        return posixpath.join(posixpath.normpath(self.root), contained(path))

    def missing_folders(self, folder: str) -> list[str]:
        """`folder` and the parents this session has not made or seen yet, top-down."""
        missing: list[str] = []
        while folder not in self.folders_known and folder not in ("", "/"):
            missing.append(folder)
            folder = posixpath.dirname(folder)
        return missing[::-1]

    def upload(self, path: str, content: bytes, sha256: str) -> Receipt:
        return self.upload_one_through_many(path, content, sha256)

    def upload_many(
        self, uploads: Iterable[tuple[K, Upload]]
    ) -> Iterator[tuple[K, Receipt | DeliveryError]]:
        """Several files on their way over the one channel: up to `files_in_flight` of them
        (fewer when they hold `FLIGHT_BYTES`), each advanced as its replies arrive.

        A refused request fails its file alone, and its temporary file is removed. A broken
        connection fails every file on its way, each handing its temporary file's name to the
        retry (`leftover`), and no more uploads are taken.
        """
        ready: list[pipeline.Put] = []  # puts whose step's replies are all in
        flights: dict[pipeline.Put, Flight[K]] = {}
        source = iter(uploads)
        while True:
            while self.room(flights.values()) and (taken := next(source, None)) is not None:
                key, upload = taken
                try:
                    flight = Flight(key, upload, *self.names(upload))
                except DeliveryError as exc:
                    yield key, exc
                    continue
                try:
                    put = pipeline.Put(self.sftp, flight.folders, flight.temporary,
                                            flight.final, upload.content, ready,
                                            self.limits)  # fmt: skip
                except (OSError, paramiko.SSHException, EOFError) as exc:
                    yield from self.lost([*flights.items(), (None, flight)], exc)
                    return
                flights[put] = flight
            if not flights:
                return
            try:
                while not ready:
                    sftp_protocol.read_reply(self.sftp)
                put = ready.pop(0)
                flight = flights[put]
                if not put.advance():
                    continue
            except pipeline.Refused as refused:
                del flights[put]
                yield flight.key, self.discard(flight.temporary, _refusal(refused.error))
                continue
            except (OSError, paramiko.SSHException, EOFError) as exc:
                yield from self.lost(flights.items(), exc)
                return
            del flights[put]
            yield flight.key, self.arrived(flight)

    def lost(
        self,
        flights: Iterable[tuple[pipeline.Put | None, Flight[K]]],
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
                sftp_protocol.read_reply(self.sftp)
        timed_out = isinstance(exc, socket.timeout | TimeoutError)
        for put, flight in flights:
            if put is not None and put.step == put.RENAME and not put.waiting:
                with suppress(pipeline.Refused):
                    put.advance()  # reads the answer; sends nothing more
                    yield flight.key, self.arrived(flight)
                    continue
            error = TransientDeliveryError(
                "the SFTP server did not answer in time"
                if timed_out
                else "the SFTP connection was lost during the upload"
            )
            error.leftover = self.relative(flight.temporary)
            yield flight.key, error

    def arrived(self, flight: Flight[K]) -> Receipt:
        self.folders_known.update(flight.folders)
        upload = flight.upload
        return Receipt(upload.path, len(upload.content), upload.sha256)

    def relative(self, remote: str) -> str:
        return posixpath.relpath(remote, posixpath.normpath(self.root))

    def room(self, flights: Collection[Flight[K]]) -> bool:
        """Another file may start: fewer than `files_in_flight` on their way, holding less than
        `FLIGHT_BYTES` between them (a large document goes alone rather than not at all)."""
        if len(flights) >= self.files_in_flight:
            return False
        return sum(len(f.upload.content) for f in flights) < FLIGHT_BYTES

    def names(self, upload: Upload) -> tuple[str, str, list[str]]:
        """Checked content; the final name, a fresh temporary one beside it, and the folders
        to make first (those this session has not made or seen yet)."""
        check_content(upload.content, upload.sha256)
        final = self.remote(upload.path)
        folder, name = posixpath.split(final)
        temporary = posixpath.join(folder, temporary_name(name))
        return final, temporary, self.missing_folders(folder)

    def discard_leftovers(self, path: str) -> None:
        """One listing of the folder, only for deliveries being retried."""
        folder, name = posixpath.split(self.remote(path))
        with suppress(OSError, paramiko.SSHException, EOFError):
            for entry in self.sftp.listdir(folder):
                if is_temporary_of(entry, name):
                    self.sftp.remove(posixpath.join(folder, entry))

    def discard(self, temporary: str, error: DeliveryError) -> DeliveryError:
        """Remove a failed write's temporary file; when the connection is gone, hand its
        name to the retry (`error.leftover`), which removes it over the next connection."""
        try:
            self.sftp.remove(temporary)
        except FileNotFoundError:
            pass
        except (OSError, paramiko.SSHException, EOFError):
            error.leftover = self.relative(temporary)
        return error

    def remove(self, path: str) -> None:
        try:
            self.sftp.remove(self.remote(path))
        except FileNotFoundError:
            return
        except PermissionError:
            raise TerminalDeliveryError("permission denied removing a file") from None
        except OSError as exc:
            raise _sftp_error(exc) from None

    def close(self) -> None:
        """End the connection at once: the socket is shut down before paramiko closes it, so
        the server sees it end now (a close alone waits for paramiko's reader thread to wake
        from its read, and a polite channel close would queue ahead of the end), and a budget
        that then opens another connection never has both open at the server."""
        with suppress(OSError):
            self.transport.sock.shutdown(socket.SHUT_RDWR)
        self.transport.close()


@dataclass
class Flight(Generic[K]):
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


def _sftp_error(exc: OSError) -> TransientDeliveryError | TerminalDeliveryError:
    if isinstance(exc, socket.timeout | TimeoutError):
        return TransientDeliveryError("the SFTP server did not answer in time")
    if exc.errno == errno.ENOSPC:
        return TerminalDeliveryError("the SFTP server's disk is full")
    # OpenSSH answers most refusals (disk full, quota, read-only) with a bare "Failure".
    reason = exc.strerror or (str(exc.args[0]) if exc.args else type(exc).__name__)
    return TransientDeliveryError(
        f"the SFTP server refused the write ({reason}); disk full or not writable?"
    )
