"""One SFTP connection's uploads: each file under a temporary name, every write's reply checked,
then put in place the way the server allows (`pipeline.Landing`: `posix-rename@openssh.com`,
the standard rename, or the final name written directly). Several files are on their way over
the one channel at once (`pipeline`).
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
        landing: pipeline.Landing = pipeline.Landing.POSIX_RENAME,
    ) -> None:
        self.transport = transport
        self.sftp = sftp
        self.root = root
        self.files_in_flight = files_in_flight
        self.limits = limits
        """How much each write may carry on this server (asked once per connection)."""
        self.in_order = True
        """Whether the server runs a channel's requests in order, so that a file's folders and
        its open can go together (until a file's open overtakes its folders)."""
        self.landing = landing
        """How files are put in place on this server (the standard rename from the first time
        `posix-rename@openssh.com` turns out not to be there)."""
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
        retry (`leftover`), and no more uploads are taken. A server that will not open another
        file while others are open (a limit on open handles) gets fewer files at once on this
        connection from then on, and the file it refused goes again.
        """
        ready: list[pipeline.Put] = []  # puts whose step's replies are all in
        flights: dict[pipeline.Put, Flight[K]] = {}
        again: list[tuple[K, Upload]] = []  # refused for a handle limit: sent once more
        source = iter(uploads)
        while True:
            while (
                self.room(flights.values())
                and (taken := again.pop(0) if again else next(source, None)) is not None
            ):
                key, upload = taken
                try:
                    flight = Flight(key, upload, *self.names(upload))
                except DeliveryError as exc:
                    yield key, exc
                    continue
                try:
                    put = pipeline.Put(self.sftp, flight.folders, flight.temporary,
                                       flight.final, upload.content, ready, self.limits,
                                       self.landing, self.in_order)  # fmt: skip
                    flight.temporary = put.temporary  # the final name itself, landing directly
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
                done = put.advance()
                self.landing = min(self.landing, put.landing, key=LANDINGS.index)
                self.in_order = self.in_order and not put.folders_one_by_one
                if not done:
                    continue
            except pipeline.Refused as refused:
                del flights[put]
                if self.handle_limit(refused, len(flights)):
                    again.append((flight.key, flight.upload))
                    continue
                yield flight.key, self.discard(flight.temporary, _refusal(refused))
                continue
            except (OSError, paramiko.SSHException, EOFError) as exc:
                yield from self.lost(flights.items(), exc)
                return
            del flights[put]
            yield flight.key, self.arrived(flight)

    def handle_limit(self, refused: pipeline.Refused, still_open: int) -> bool:
        """Whether a refused open looks like a limit on files open at once (a plain failure
        while others are open); if so, this connection keeps to as many as were open."""
        if refused.step != "open" or refused.code != sftp_protocol.FAILURE or not still_open:
            return False
        self.files_in_flight = min(self.files_in_flight, still_open)
        return True

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
            if put is not None and put.placing and not put.waiting:
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
        return Receipt(upload.path, len(upload.content), upload.sha256, self.landing.value)

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
            raise _sftp_error(exc, "removing a file") from None

    def facts(self) -> list[tuple[str, str]]:
        offered = getattr(self.sftp, "extensions", {})
        return [
            ("SFTP version", str(getattr(self.sftp, "version", "?"))),
            ("extensions offered", ", ".join(sorted(offered)) or "none"),
            ("landing", _LANDING_WORDS[self.landing]),
        ]

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


_LANDING_WORDS = {
    pipeline.Landing.POSIX_RENAME: "posix-rename (temporary name, atomic rename over the old)",
    pipeline.Landing.RENAME: "rename (temporary name, SFTP rename; a file replaced is removed "
    "first)",
    pipeline.Landing.DIRECT: "direct (the final name written itself; the manifest marks a "
    "complete drop)",
}

LANDINGS = [pipeline.Landing.DIRECT, pipeline.Landing.RENAME, pipeline.Landing.POSIX_RENAME]
"""Landings from the one that assumes least: a session only moves toward the start."""

STEPS = {
    "open": "creating the file",
    "write": "a write",
    "rename": "the rename into place",
    "replace": "removing the file being replaced",
}


def _refusal(refused: pipeline.Refused) -> DeliveryError:
    """What the server's answer to a file's request means for its delivery, naming the step."""
    step = STEPS.get(refused.step, refused.step)
    if isinstance(refused.error, PermissionError):
        return TerminalDeliveryError(
            f"permission denied on the SFTP server ({step}): the user may not write in that folder"
        )
    if refused.code == sftp_protocol.OP_UNSUPPORTED:
        advice = (" set the destination's landing to direct (writes the final name itself)"
                  if refused.step in ("rename", "replace") else " ask the organization which "
                  "operations its server allows")  # fmt: skip
        return TerminalDeliveryError(
            f"the SFTP server does not support {step} (operation unsupported):{advice}"
        )
    return _sftp_error(refused.error, step)


def _sftp_error(exc: OSError, step: str = "the request") -> DeliveryError:
    if isinstance(exc, socket.timeout | TimeoutError):
        return TransientDeliveryError("the SFTP server did not answer in time")
    if exc.errno == errno.ENOSPC:
        return TerminalDeliveryError("the SFTP server's disk is full")
    reason = exc.strerror or (str(exc.args[0]) if exc.args else type(exc).__name__)
    if isinstance(exc, pipeline.GenericFailure) or reason == "Failure":
        # SFTP v3's generic answer (OpenSSH's "Failure", others' "Bad message"): the server
        # gives no cause, and a full disk or a quota is the usual one, which a retry seldom
        # mends: one retry, not the policy's three.
        error = TransientDeliveryError(
            f"the SFTP server refused {step} without a cause ({reason}): a full disk, a quota "
            f"or a read-only folder are usual"
        )
        error.most_attempts = GENERIC_FAILURE_ATTEMPTS
        return error
    return TransientDeliveryError(f"the SFTP server refused {step} ({reason})")


GENERIC_FAILURE_ATTEMPTS = 2
"""Sends of a document in one run when the server fails it without a cause: a first and one
retry (a dropped connection or a busy server may clear; a full disk will not)."""
