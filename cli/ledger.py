"""Views of the ledger: deliveries, disclosures, status; the store's schema."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer

from patient_delivery import private
from patient_delivery.cli.common import (
    app,
    console,
    current_store,
    errors,
    escaped,
    fail,
    in_scope,
    parse_when,
    print_frame,
    print_json,
    records,
)

if TYPE_CHECKING:
    import pandas as pd


STATUSES = ("queued", "pending", "delivered", "failed", "superseded", "replaced", "withdrawn")

Json = Annotated[bool, typer.Option("--json", help="One JSON document on stdout, for scripts")]
Csv = Annotated[
    str | None, typer.Option(help="Write every matching row as CSV to this file, or - for stdout")
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace the --csv or --parquet file if it exists")
]
Limit = Annotated[
    int | None, typer.Option(min=1, help="Most rows (default: 50 on the terminal, all otherwise)")
]
When = Annotated[str | None, typer.Option(help="ISO date/time, UTC unless given")]


@app.command()
def deliveries(
    patient: Annotated[str | None, typer.Option(help="healthexPatientId")] = None,
    project: Annotated[str | None, typer.Option()] = None,
    destination: Annotated[str | None, typer.Option()] = None,
    status: Annotated[str | None, typer.Option(help=", ".join(STATUSES))] = None,
    since: When = None,
    until: When = None,
    limit: Limit = None,
    csv: Csv = None,
    overwrite: Overwrite = False,
    parquet: Annotated[Path | None, typer.Option(help="Write all matching rows as Parquet")] = None,
    wide: Annotated[bool, typer.Option(help="Show every column")] = False,
    as_json: Json = False,
) -> None:
    """The ledger: what was sent, to whom, where, when, why and by which run."""
    from patient_delivery.reports import LedgerQuery, deliveries_frame

    in_scope(project_id=project, patient_ids=[patient] if patient else ())
    if status is not None and status not in STATUSES:
        raise fail(f"--status: not a delivery status (one of {', '.join(STATUSES)})", code=2)
    if parquet and importlib.util.find_spec("pyarrow") is None:
        raise fail("--parquet: needs pyarrow; install the `parquet` extra "
                   "(uv sync --extra parquet, or pip install 'patient-delivery[parquet]')",
                   code=2)  # fmt: skip
    on_terminal = not (csv or parquet or as_json)
    query = LedgerQuery(
        patient_id=patient,
        project_id=project,
        destination=destination,
        status=status,
        since=parse_when(since, "--since"),
        until=parse_when(until, "--until"),
        limit=limit or (50 if on_terminal else None),
    )
    frame = deliveries_frame(current_store(), query)
    if parquet:
        with _owner_only(parquet, "--parquet", overwrite, binary=True) as out:
            frame.to_parquet(out, index=False)
        errors.print(f"{len(frame)} rows written to {parquet}", highlight=False)
    if _written(frame, "deliveries", csv, as_json, overwrite) or parquet:
        return
    if not wide:
        frame = frame.assign(sha256=frame["sha256"].str[:12])[NARROW_COLUMNS]
        if console.width < WIDE:  # a stable prefix; whole in --json, --csv, and wider
            frame["patient_id"] = frame["patient_id"].map(_short_id)
    print_frame(frame, "deliveries")


NARROW_COLUMNS = [
    "status", "destination", "delivered_at", "patient_id", "data_type", "version", "path",
    "organization", "flow_run_id", "last_error",
]  # fmt: skip
"""The columns on a terminal, most needed first: those that do not fit the width are left out
(and named)."""


WIDE = 120
"""Terminal width from which patient IDs are shown whole (run IDs always are)."""


def _short_id(value: object) -> str:
    """An ID's first 11 characters and an ellipsis (a stable prefix, enough to tell rows apart
    and to find the row in `--json`)."""
    text = "" if value is None or value != value else str(value)
    return text if len(text) <= 12 else text[:11] + "…"


@contextmanager
def _owner_only(
    path: Path, option: str, overwrite: bool, binary: bool = False
) -> Iterator[IO[Any]]:
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


def _written(
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
            with _owner_only(Path(csv), "--csv", overwrite) as out:
                text.to_csv(out, index=False, **iso)
            errors.print(f"{len(frame)} rows written to {csv}", highlight=False)
    if as_json:
        print_json({title: records(frame)})
    return bool(csv or as_json)


@app.command()
def disclosures(
    patient: Annotated[str | None, typer.Option(help="healthexPatientId")] = None,
    project: Annotated[str | None, typer.Option()] = None,
    since: When = None,
    until: When = None,
    limit: Limit = None,
    csv: Csv = None,
    overwrite: Overwrite = False,
    as_json: Json = False,
) -> None:
    """Every send of a patient's records (re-sends included) and every read through the pull
    API: the accounting of disclosures."""
    from patient_delivery.reports import LedgerQuery, disclosures_frame, withdrawals_frame

    in_scope(project_id=project, patient_ids=[patient] if patient else ())
    on_terminal = not (csv or as_json)
    query = LedgerQuery(
        patient_id=patient,
        project_id=project,
        since=parse_when(since, "--since"),
        until=parse_when(until, "--until"),
        limit=limit or (50 if on_terminal else None),
    )
    store = current_store()
    frame = disclosures_frame(store, query)
    withdrawals = withdrawals_frame(store, query)
    if as_json:
        print_json({"disclosures": records(frame), "share_withdrawals": records(withdrawals)})
        return
    if _written(frame, "disclosures", csv, as_json=False, overwrite=overwrite):
        return
    frame = frame.assign(
        sha256=frame["sha256"].str[:12],
        document_sha256=frame["document_sha256"].str[:12],
    )
    print_frame(frame, "disclosures")
    if not withdrawals.empty:
        print_frame(withdrawals, "shares withdrawn (the patient stopped sharing)")


@app.command()
def status(as_json: Json = False) -> None:
    """Deliveries per destination and status, and the latest runs (from the ledger)."""
    from patient_delivery.reports import recent_runs, status_counts

    store = current_store()
    counts, runs = status_counts(store), recent_runs(store)
    if as_json:
        print_json({"destinations": records(counts), "recent_runs": records(runs)})
        return
    print_frame(counts, "deliveries by destination and status")
    print_frame(runs, "recent runs (by the ledger rows they last touched)")


@app.command("upgrade-store")
def upgradecurrent_store() -> None:
    """Create the store or upgrade its schema in place (also done on every open)."""
    store = current_store()
    console.print(f"store at {store.url} is at the latest schema")
