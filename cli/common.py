"""What every command group shares: the app, its consoles, the store, and how refusals end."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import typer
from rich.console import Console

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
