"""What every command group shares: the app, its consoles, the store, and how refusals end."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from patient_delivery import private
from patient_delivery.settings import get_settings

if TYPE_CHECKING:
    import pandas as pd
    from pydantic import ValidationError

    from patient_delivery.prefect_setup import LocalApi
    from patient_delivery.store import Store

app = typer.Typer(
    help="Deliver patients' health records to the organizations they shared them with.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        print(f"patient-delivery {version('patient-delivery')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Deliver patients' health records to the organizations they shared them with."""


console = Console()
errors = Console(stderr=True)

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
"""What a terminal would act on instead of showing: C0/C1 controls (ESC, newline, ...), line
separators and bidirectional overrides."""


def printable(value: object) -> Text:
    """A value for a table cell: control characters shown as escapes (`\\x1b`, `\\n`),
    never acted on by the terminal, and no Rich markup read into it. Stored values may hold
    text from servers and callers; none of it can forge a row or recolour the screen."""
    return Text(escaped("" if value is None or value != value else str(value)))


def escaped(text: str) -> str:
    """`text` with control characters as escapes (`\\x1b`, `\\n`): for tables and CSV alike."""
    return _CONTROL.sub(lambda found: found.group().encode("unicode_escape").decode(), text)


def print_json(document: object) -> None:
    """One JSON document on stdout, for scripts: stable field names, times in ISO 8601."""
    import json

    def fallback(value: object) -> object:
        return value.isoformat() if isinstance(value, datetime) else str(value)

    sys.stdout.write(json.dumps(document, default=fallback, indent=2) + "\n")


def print_frame(
    frame: pd.DataFrame, title: str, keep: Sequence[str] = (), more: str | None = "--json or --csv"
) -> None:
    """A table that fits the terminal: every cell through `printable`, times to the second in
    ISO 8601. IDs and times are never cut or wrapped (they are what people paste); names
    (`destination`, `reference`) break only after a `/`; other text folds to make room.
    The columns in `keep` (what the view is for) are shown first, then the others from the
    left while they fit; those left out are named below the table, with `more` (the options
    that give every column), when the command has such options."""
    from rich.table import Table

    cells = [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    columns = [str(c) for c in frame.columns]
    kinds = [_kind(c) for c in columns]
    longest = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    needs = [_need(kinds[i], columns[i], longest[i], [row[i] for row in cells])
             for i in range(len(columns))]  # fmt: skip
    order = [i for i, c in enumerate(columns) if c in keep]
    order += [i for i in range(len(columns)) if i not in order]
    shown, used = set(), 1  # the table's right border; each column adds padding and a border
    for i in order:
        if used + needs[i] + 3 > console.width and shown:
            if columns[i] in keep:
                continue  # a narrower one the view needs may still fit
            break  # the others: from the left, up to the first that does not fit
        shown.add(i)
        used += needs[i] + 3
    spare = max(0, console.width - used)
    widths = dict(enumerate(needs))
    for i in sorted(shown):  # room left widens names first, up to their longest
        if kinds[i] == NAME and spare:
            grown = min(longest[i], widths[i] + spare)
            spare -= grown - widths[i]
            widths[i] = grown
    table = Table(title=title)
    for i in sorted(shown):
        table.add_column(columns[i], overflow="fold", no_wrap=kinds[i] != TEXT,
                         min_width=widths[i])  # fmt: skip
    for row in cells:
        table.add_row(*(Text(broken_name(row[i], widths[i]) if kinds[i] == NAME else row[i])
                        for i in sorted(shown)))  # fmt: skip
    console.print(table)
    if len(shown) < len(columns):
        hidden = ", ".join(columns[i] for i in range(len(columns)) if i not in shown)
        tail = f"; {more} has every column" if more else ""
        console.print(f"(not shown at {console.width} columns: {hidden}{tail})",
                      highlight=False, style="dim")  # fmt: skip


WHOLE, NAME, TEXT = "whole", "name", "text"
NAMES = ("destination", "reference")
"""Columns of block references (`sftp-destination/acme`): broken only after a `/`."""

FOLDED_WIDTH = 16
"""Least width a free-text column (a path, a reason) keeps; longer text folds onto more
lines."""


_NAME_PARTS = re.compile(r"[^/]+/?|/")
"""A block reference's parts, each with the `/` that ends it: where it may break."""


def _kind(column: str) -> str:
    if column.endswith(("_id", "_at", "id")) or column in ("status", "version"):
        return WHOLE
    return NAME if column in NAMES else TEXT


def _need(kind: str, header: str, longest: int, values: list[str]) -> int:
    """The least width a column can take: its longest cell for IDs and times, its longest part
    between slashes for names, `FOLDED_WIDTH` (or its header) for free text."""
    if kind == WHOLE:
        return longest
    if kind == NAME:
        parts = [len(part) for value in values for part in _NAME_PARTS.findall(value)]
        return max([len(header), *parts])
    return min(longest, max(FOLDED_WIDTH, len(header)))


def broken_name(text: str, width: int) -> str:
    """A name on lines of at most `width`, broken only after a `/`."""
    lines = [""]
    for part in _NAME_PARTS.findall(text):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def _cell(value: object) -> str:
    """A cell's text: times to the second (UTC, ISO 8601), everything else escaped."""
    if value is None or value != value:  # None, NaN, NaT
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return escaped(str(value))


def current_store() -> Store:
    """The store the settings name (the embedded SQLite file by default)."""
    from patient_delivery.store import open_store

    return open_store()


def read_file(path: Path | None, option: str) -> str | None:
    """A text file an option names (None without one); a file that cannot be read is a
    one-line refusal naming the option, exit 2."""
    if path is None:
        return None
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a text file"
        raise fail(f"{option}: cannot read {path}: {reason}", code=2) from None


def read_bytes(path: Path, what: str) -> bytes:
    """A file's bytes; one that cannot be read is a one-line refusal naming `what` (the option
    or argument), exit 2."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise fail(f"{what}: cannot read {path}: {exc.strerror}", code=2) from None


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error line on stderr; the exit to raise (2: refused input)."""
    errors.print(Text("error: ", style="red") + Text(message), highlight=False, soft_wrap=True)
    return typer.Exit(code)


Json = Annotated[bool, typer.Option("--json", help="One JSON document on stdout, for scripts")]
Csv = Annotated[
    str | None, typer.Option(help="Write every matching row as CSV to this file, or - for stdout")
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace the --csv or --parquet file if it exists")
]


def show_frame(
    frame: pd.DataFrame, title: str, as_json: bool, csv: str | None = None,
    overwrite: bool = False, keep: Sequence[str] = (),
) -> None:  # fmt: skip
    """The rows as CSV (`--csv`), as one JSON document (`{title: [...]}`), or as a table that
    fits the terminal (`keep`: the columns the view is for)."""
    if not written(frame, title, csv, as_json, overwrite):
        print_frame(frame, title, keep)


@contextmanager
def owner_only(path: Path, option: str, overwrite: bool, binary: bool = False) -> Iterator[IO[Any]]:
    """A new file at `path`, owner-only (the ledger names patients), never written through a
    link or a file already there: one that exists is refused unless `overwrite`, which writes a
    new file beside it and renames it over (the link, not what it points at, is replaced). A
    path that cannot be written is a one-line refusal naming the option, exit 2."""
    target = path.with_name(f".{path.name}.{os.getpid()}.partial") if overwrite else path
    try:
        descriptor = private.create_new(target)
    except FileExistsError:
        raise fail(f"{option}: {path} exists already; --overwrite replaces it", code=2) from None
    except OSError as exc:
        raise fail(f"{option}: cannot write {path}: {exc.strerror}", code=2) from None
    try:
        with os.fdopen(descriptor, "wb" if binary else "w", newline=None if binary else "") as out:
            yield out
        if overwrite:
            os.replace(target, path)
    except OSError as exc:
        raise fail(f"{option}: cannot write {path}: {exc.strerror}", code=2) from None
    finally:
        if overwrite:
            target.unlink(missing_ok=True)


def written(
    frame: pd.DataFrame, title: str, csv: str | None, as_json: bool, overwrite: bool = False
) -> bool:
    """Write the rows as CSV (a file, created owner-only, or stdout for -; control characters
    escaped in both) or as one JSON document; whether done."""
    if csv:
        text = frame.map(lambda value: escaped(value) if isinstance(value, str) else value)
        iso = {"date_format": "%Y-%m-%dT%H:%M:%S.%fZ"}  # UTC, ISO 8601, as --json writes them
        if csv == "-":
            text.to_csv(sys.stdout, index=False, **iso)
        else:
            with owner_only(Path(csv), "--csv", overwrite) as out:
                text.to_csv(out, index=False, **iso)
            errors.print(f"{len(frame)} rows written to {csv}", highlight=False)
    if as_json:
        from patient_delivery.reports import records

        print_json({title: records(frame)})
    return bool(csv or as_json)


def warn(message: str) -> None:
    """Print one warning line on stderr (the command still did its work)."""
    errors.print(Text("warning: ", style="yellow") + Text(message), highlight=False, soft_wrap=True)


_started: list[LocalApi | None] = []
"""This command's start of Prefect, once made (empty before)."""


def start_prefect() -> LocalApi | None:
    """Point Prefect at the local defaults (its home under ours) before it is imported; in the
    embedded setup, start this command's temporary API (see `ready`). Once per command: every
    caller (a command, or a group that imports the blocks to build its options) gets the same
    start, so Prefect never reads its settings before it."""
    if not _started:
        from patient_delivery.prefect_setup import apply_local_defaults

        _started.append(apply_local_defaults(get_settings().home))
    return _started[0]


def ready(api: LocalApi | None) -> None:
    """Wait for this command's temporary API, if it has one, importing the flows (and with them
    the blocks and Prefect) meanwhile: the two take about as long, on different cores."""
    if api is None:
        return
    import patient_delivery.flows.deliver  # noqa: F401
    from patient_delivery.prefect_setup import LocalApiError

    try:
        api.wait()
    except LocalApiError as exc:
        raise fail(str(exc), code=1) from None


def prefect() -> None:
    """Prefect, ready for this command: `start_prefect`, then `ready`."""
    ready(start_prefect())


def refusals(run, refused: tuple[type[Exception], ...] | None = None):  # type: ignore[no-untyped-def]
    """Run `run()`, turning refusals (by default the store's) into a message and exit code 2."""
    from patient_delivery.documents import InvalidDocument
    from patient_delivery.ingest import IngestError

    kinds = refused if refused is not None else (InvalidDocument, IngestError)
    try:
        return run()
    except kinds as exc:
        raise fail(str(exc), code=2) from None


def invalid(error: ValidationError) -> typer.Exit:
    """Refused settings: each field and what is wrong with it, never the value given (it may
    be a secret)."""
    problems = [
        f"{'.'.join(map(str, e['loc']))}: {_reason(e['msg'])}" if e["loc"] else _reason(e["msg"])
        for e in error.errors()
    ]
    return fail("; ".join(problems), code=2)


def _reason(message: str) -> str:
    """A validation message without pydantic's decoration ("Value error, ...")."""
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def parse_when(value: str | None, option: str) -> datetime | None:
    """An ISO date or time from the command line, UTC unless it says otherwise; a refusal
    naming `option` when it is not one."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise fail(
            f"{option}: not an ISO date or time (e.g. 2026-12-01 or 2026-12-01T08:00Z)", code=2
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def in_scope(
    org_id: str | None = None,
    project_id: str | None = None,
    patient_ids: Sequence[str] = (),
    destinations: Sequence[str] = (),
) -> None:
    """Refuse (exit 2) an organization, project or patient the store does not have, or a
    destination no project delivers to, before a run or a report."""
    from patient_delivery.ingest import check_scope

    refusals(lambda: check_scope(current_store(), org_id, project_id, patient_ids, destinations))
