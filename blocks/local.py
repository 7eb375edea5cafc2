"""A folder on this machine or a mounted share: the embedded default, the model for the rest."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator

from patient_delivery import private
from patient_delivery.blocks.base import Destination
from patient_delivery.blocks.contract import (
    DestinationSession,
    Receipt,
    TerminalDeliveryError,
    TransientDeliveryError,
    check_content,
)
from patient_delivery.blocks.naming import contained, is_temporary_of, temporary_name

_TERMINAL_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _os_error(exc: OSError, doing: str) -> Exception:
    """Turn an OSError into a delivery error whose message names no path (paths hold IDs)."""
    name = errno.errorcode.get(exc.errno or 0, "unknown")
    reasons = {
        errno.ENOSPC: "the destination disk is full",
        errno.EDQUOT: "the destination's disk quota is exhausted",
        errno.EACCES: "permission denied under the destination root",
        errno.EPERM: "operation not permitted under the destination root",
        errno.EROFS: "the destination file system is read-only",
    }
    message = f"{doing} failed: {reasons.get(exc.errno or 0, os.strerror(exc.errno or 0))} [{name}]"
    if exc.errno in _TERMINAL_ERRNOS:
        return TerminalDeliveryError(message)
    return TransientDeliveryError(message)


class LocalSession(DestinationSession):
    def __init__(self, root: Path) -> None:
        self.root = root

    def target(self, path: str) -> Path:
        """Where `path` goes under the root (refused when it would leave it)."""
        return self.root / contained(path)

    def upload(self, path: str, content: bytes, sha256: str) -> Receipt:
        target = self.target(path)
        check_content(content, sha256)
        temporary = target.with_name(temporary_name(target.name))
        try:
            private.make_folder(target.parent)
            with os.fdopen(private.open_new(temporary), "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            written = temporary.stat().st_size
            if written != len(content):
                raise TransientDeliveryError(
                    f"size check failed: wrote {written} bytes, expected {len(content)}"
                )
            os.replace(temporary, target)
            _fsync_folder(target.parent)
            _discard_leftovers(target)
        except OSError as exc:
            _discard(temporary)
            raise _os_error(exc, "write") from None
        except BaseException:
            _discard(temporary)
            raise
        return Receipt(path=path, size=len(content), sha256=sha256)

    def remove(self, path: str) -> None:
        try:
            self.target(path).unlink(missing_ok=True)
        except OSError as exc:
            raise _os_error(exc, "remove") from None


def _discard_leftovers(target: Path) -> None:
    """Remove temporary files of earlier writes to this path that a killed process left."""
    with suppress(OSError):
        for entry in os.scandir(target.parent):
            if is_temporary_of(entry.name, target.name):
                _discard(Path(entry.path))


def _discard(temporary: Path) -> None:
    """Remove a temporary file after a failed write, if it was ever created."""
    with suppress(OSError):
        temporary.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable, so a power cut cannot undo a delivery we recorded."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class LocalDestination(Destination):
    """Deliver into a folder on this machine: files appear whole (temporary name, fsync, rename)."""

    sends_over_network: ClassVar[bool] = False

    _block_type_name = "Local Destination"
    _block_type_slug = "local-destination"
    _description = "Deliver patient documents into a folder on this machine or a mounted share."

    root: Path = Field(
        title="Root folder",
        description=(
            "Absolute folder (or ~/...) that receives the deliveries; created when missing. "
            "Folders are created owner-only (0700) and files written owner-only (0600)."
        ),
        json_schema_extra={"pattern": "^[/~]"},  # the UI's form refuses a relative folder
    )

    @field_validator("root")
    @classmethod
    def _check_root(cls, value: Path) -> Path:
        if not value.expanduser().is_absolute():
            raise ValueError("must be an absolute folder (or start with ~): a relative one would "
                             "depend on where the worker runs")  # fmt: skip
        return value

    def describe(self) -> str:
        return Path(self.root).expanduser().resolve().as_uri()

    @contextmanager
    def open_session(self) -> Iterator[LocalSession]:
        root = Path(self.root).expanduser().resolve()
        try:
            private.make_folder(root)
        except OSError as exc:
            raise _os_error(exc, "create the root folder") from None
        yield LocalSession(root)
