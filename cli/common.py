"""What every command group shares: the app, its consoles, the store, and how refusals end."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.text import Text

from patient_delivery.settings import get_settings

if TYPE_CHECKING:
    from pydantic import ValidationError

    from patient_delivery.store import Store

app = typer.Typer(
    help="Deliver patients' health records to the organizations they shared them with.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

console = Console()
errors = Console(stderr=True)

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
"""What a terminal would act on instead of showing: C0/C1 controls (ESC, newline, ...), line
separators and bidirectional overrides."""


def printable(value: object) -> Text:
    """A value for a table cell: control characters shown as escapes (`\\x1b`, `\\n`),
    never acted on by the terminal, and no Rich markup read into it. Stored values may hold
    text from servers and callers; none of it can forge a row or recolour the screen."""
    text = "" if value is None or value != value else str(value)
    return Text(_CONTROL.sub(lambda found: found.group().encode("unicode_escape").decode(), text))


def current_store() -> Store:
    """The store the settings name (the embedded SQLite file by default)."""
    from patient_delivery.store import open_store

    return open_store()


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error line on stderr; the exit to raise (2: refused input)."""
    errors.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    return typer.Exit(code)


def prefect() -> None:
    """Point Prefect at the local defaults (its home under ours) before it is imported."""
    from patient_delivery.prefect_setup import apply_local_defaults

    apply_local_defaults(get_settings().home)


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


def parse_when(value: str | None) -> datetime | None:
    """An ISO date or time from the command line, UTC unless it says otherwise."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
