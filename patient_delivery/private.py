"""Owner-only files and folders: the embedded home, the store, Prefect's home (with the key that
decrypts block secrets) and local deliveries hold patient data and secrets, so other local users
must not be able to read them. Folders are made 0700 and files 0600 whatever the umask; SQLite
gives its WAL and SHM files the database file's mode."""

from __future__ import annotations

import logging
import os
from pathlib import Path

FOLDER = 0o700
FILE = 0o600

log = logging.getLogger("patient_delivery")


def make_folder(path: Path) -> Path:
    """Create `path` and its missing parents, each owner-only; an existing folder is kept as it
    is (see `warn_if_shared`)."""
    try:
        path.mkdir(mode=FOLDER)
    except FileExistsError:
        if not path.is_dir():
            raise
        return path
    except FileNotFoundError:
        make_folder(path.parent)
        try:
            path.mkdir(mode=FOLDER)
        except FileExistsError:  # made by another thread meanwhile
            return path
    path.chmod(FOLDER)  # mkdir's mode passes through the umask
    return path


def open_new(path: Path) -> int:
    """A descriptor for writing `path`, created (or emptied) owner-only."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE)
    os.fchmod(descriptor, FILE)
    return descriptor


def create_new(path: Path) -> int:
    """A descriptor for writing `path`, a file this call creates owner-only: `FileExistsError`
    when anything is there already (a file, or a link, which is never followed), so nothing is
    written through a file or link another user left in a shared folder."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE)
    os.fchmod(descriptor, FILE)
    return descriptor


def make_file(path: Path) -> Path:
    """Create `path` empty and owner-only if it does not exist yet (an empty file is a valid,
    empty SQLite database)."""
    make_folder(path.parent)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE)
    except FileExistsError:
        return path
    os.fchmod(descriptor, FILE)
    os.close(descriptor)
    return path


def shared(path: Path) -> bool:
    """Whether users other than the owner may read (or enter) `path`."""
    try:
        return bool(path.stat().st_mode & 0o077)
    except FileNotFoundError:
        return False


def warn_if_shared(path: Path, what: str) -> bool:
    """Log a warning, with the fix, when other users may read `path`; whether it did."""
    if not shared(path):
        return False
    fix = f"chmod -R go-rwx {path}"
    log.warning("%s at %s can be read by other local users; to fix: %s", what, path, fix)
    return True
