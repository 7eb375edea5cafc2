"""Where a file may go under a destination's root, and the name its temporary twin goes by.

Every destination checks a rendered path with `contained` before it touches anything, and every
destination that writes a file before putting it in place names it with `temporary_name`, so a
retry (or a later run) finds the leftovers of a cut write with `is_temporary_of`.
"""

from __future__ import annotations

import secrets

from patient_delivery.blocks.contract import TerminalDeliveryError
from patient_delivery.paths import has_unsafe_character


def contained(path: str) -> str:
    """`path` itself, when it is a relative path that stays under the destination's root: no
    leading `/`, no `\\`, no empty, `.` or `..` segment, no control, formatting or line
    separator character (`has_unsafe_character`). Otherwise a terminal error (the path's value
    is never in the message: it carries patient IDs)."""
    segments = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or any(segment in ("", ".", "..") for segment in segments)
        or has_unsafe_character(path)
    ):
        raise TerminalDeliveryError("rendered path leaves the destination root; refused")
    return path


TOKEN_BYTES = 6
"""Random bytes in a temporary name (12 hex digits): two writers never pick the same one."""


def temporary_name(final_name: str) -> str:
    """A fresh hidden name beside `final_name` for a write in progress: `.NAME.RANDOM.partial`."""
    return f".{final_name}.{secrets.token_hex(TOKEN_BYTES)}.partial"


def is_temporary_of(entry: str, final_name: str) -> bool:
    """Whether the folder entry `entry` is a temporary file of a write to `final_name` (and not
    of a longer name that starts the same)."""
    prefix, suffix = f".{final_name}.", ".partial"
    if not (entry.startswith(prefix) and entry.endswith(suffix)):
        return False
    token = entry[len(prefix) : -len(suffix)]
    return len(token) == 2 * TOKEN_BYTES and all(c in "0123456789abcdef" for c in token)
