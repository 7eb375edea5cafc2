"""What every command group shares: the app, its consoles, the store, and how refusals end."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.text import Text

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
    import sys

    def fallback(value: object) -> object:
        return value.isoformat() if isinstance(value, datetime) else str(value)

    sys.stdout.write(json.dumps(document, default=fallback, indent=2) + "\n")


def records(frame: pd.DataFrame) -> list[dict[str, object]]:
    """A table's rows as JSON-ready records: missing values as null."""
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")


def print_frame(frame: pd.DataFrame, title: str) -> None:
    """A table that fits the terminal: every cell through `printable`, times to the second in
    ISO 8601, IDs and times never cut or wrapped (other columns fold to make room). Columns
    are kept from the left while they fit the width; those left out are named below the table
    (`--json` or `--csv` give every column)."""
    from rich.table import Table

    cells = [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    columns = [str(c) for c in frame.columns]
    whole = [c.endswith(("_id", "_at", "id")) or c in ("status", "version") for c in columns]
    longest = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    # What each column needs: its longest cell for IDs and times; a free-text column folds
    # onto more lines, down to `FOLDED_WIDTH` or its header.
    needs = [n if whole[i] else min(n, max(FOLDED_WIDTH, len(columns[i])))
             for i, n in enumerate(longest)]  # fmt: skip
    shown, used = [], 4  # the table's outer border and padding
    for i, width in enumerate(needs):
        if used + width + 3 > console.width and shown:
            break
        shown.append(i)
        used += width + 3
    table = Table(title=title)
    for i in shown:
        table.add_column(columns[i], overflow="fold", no_wrap=whole[i], min_width=needs[i])
    for row in cells:
        table.add_row(*(Text(row[i]) for i in shown))
    console.print(table)
    if len(shown) < len(columns):
        hidden = ", ".join(columns[i] for i in range(len(columns)) if i not in shown)
        console.print(f"(not shown at {console.width} columns: {hidden}; --json or --csv has "
                      "every column)", highlight=False, style="dim")  # fmt: skip


FOLDED_WIDTH = 16
"""Least width a free-text column (a destination, a path, a reason) keeps; longer text folds
onto more lines."""


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


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error line on stderr; the exit to raise (2: refused input)."""
    errors.print(Text("error: ", style="red") + Text(message), highlight=False, soft_wrap=True)
    return typer.Exit(code)


def show_frame(frame: pd.DataFrame, title: str, as_json: bool) -> None:
    """The rows as one JSON document (`{title: [...]}`) or as a table that fits the terminal."""
    if as_json:
        print_json({title: records(frame)})
    else:
        print_frame(frame, title)


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
        f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else str(e["msg"])
        for e in error.errors()
    ]
    return fail("; ".join(problems), code=2)


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
