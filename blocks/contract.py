"""The destination contract's vocabulary: the errors, what an upload is and what it returns,
and the session every destination opens. `base` builds the destination block on it; `naming`,
`openpgp` and each backend use it without the block, so none of them imports `base`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, TypeVar


class DeliveryError(Exception):
    """A delivery could not be made. Subclasses say whether trying again can help."""

    retryable: bool = False
    leftover: str | None = None
    """A temporary file (relative path) the failed attempt could not remove, for a retry to."""
    most_attempts: int | None = None
    """Most sends of a document this failure allows in one run (None: the retry policy's),
    for a failure that retrying rarely mends."""


class TransientDeliveryError(DeliveryError):
    """Temporary: a timeout, a dropped connection, throttling. Retried with backoff."""

    retryable = True


class TerminalDeliveryError(DeliveryError):
    """Needs a person: access denied, bad configuration, host key mismatch. Not retried blindly."""

    retryable = False


@dataclass(frozen=True)
class Receipt:
    """What arrived: the final path, and the size and SHA-256 that were verified; for a
    destination with several ways to put a file in place, the one used (`landing`)."""

    path: str
    size: int
    sha256: str
    landing: str | None = None


class Upload(NamedTuple):
    """One document to put at `path` (relative), with the SHA-256 it must arrive with."""

    path: str
    content: bytes
    sha256: str


K = TypeVar("K")


def check_content(content: bytes, sha256: str) -> None:
    """Refuse to send bytes that are not the stored document: the store copy may be corrupt."""
    if hashlib.sha256(content).hexdigest() != sha256:
        raise TerminalDeliveryError(
            "content does not match the stored SHA-256; the store copy may be corrupt"
        )


class DestinationSession(ABC):
    """An open connection to a destination, reused for many uploads by one thread at a time."""

    @abstractmethod
    def upload(self, path: str, content: bytes, sha256: str) -> Receipt:
        """Put `content` at `path` (relative), atomically, and verify it arrived whole."""

    def upload_many(
        self, uploads: Iterable[tuple[K, Upload]]
    ) -> Iterator[tuple[K, Receipt | DeliveryError]]:
        """Upload each `(key, upload)` as `upload()` would and yield `(key, receipt or error)`,
        in the order they finish, taking the next upload only when there is room for it.

        Destinations that can have several files on their way at once (SFTP, S3 on the CRT)
        override this; the default sends one at a time. Each upload taken gets exactly one
        result; after an error that broke the session, no more are taken, so the caller can
        reconnect and go on with the rest.
        """
        for key, upload in uploads:
            try:
                yield key, self.upload(*upload)
            except DeliveryError as exc:
                yield key, exc

    def upload_one_through_many(self, path: str, content: bytes, sha256: str) -> Receipt:
        """`upload()` for a session whose `upload_many` is how it sends: one path to test."""
        ((_, result),) = self.upload_many([(None, Upload(path, content, sha256))])
        if isinstance(result, DeliveryError):
            raise result
        return result

    @abstractmethod
    def remove(self, path: str) -> None:
        """Delete the file at `path`; used by `test_connection` to clean up its probe."""

    def discard_leftovers(self, path: str) -> None:  # noqa: B027 - optional; most need nothing
        """Remove temporary files that earlier, cut-off writes to `path` left (best effort).
        Called before a retry from a new run, which cannot know their names."""

    def facts(self) -> list[tuple[str, str]]:
        """What this session learned about the server, for `destination test` (for SFTP: its
        version, the extensions it offers, the landing used); none by default."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook; sessions without resources skip it
        """Release the connection."""


ENCRYPTED_SUFFIX = ".pgp"
"""Ends the name of every file sent encrypted (a binary OpenPGP message)."""
