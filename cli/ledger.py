"""Views of the ledger: deliveries, disclosures, status; the store's schema."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cli.common import app, console, current_store, parse_when, printable

if TYPE_CHECKING:
    import pandas as pd


@app.command()
def deliveries(
    patient: Annotated[str | None, typer.Option(help="healthexPatientId")] = None,
    project: Annotated[str | None, typer.Option()] = None,
    destination: Annotated[str | None, typer.Option()] = None,
    status: Annotated[
        str | None, typer.Option(help="queued, pending, delivered, failed, superseded, replaced")
    ] = None,
    since: Annotated[str | None, typer.Option(help="ISO date/time, UTC unless given")] = None,
    until: Annotated[str | None, typer.Option(help="ISO date/time, UTC unless given")] = None,
    limit: Annotated[int | None, typer.Option(help="Most rows to show")] = 50,
    csv: Annotated[Path | None, typer.Option(help="Write all matching rows as CSV")] = None,
    parquet: Annotated[Path | None, typer.Option(help="Write all matching rows as Parquet")] = None,
    wide: Annotated[bool, typer.Option(help="Show every column")] = False,
) -> None:
    """The ledger: what was sent, to whom, where, when, why and by which run."""
    from patient_delivery.reports import LedgerQuery, deliveries_frame

    query = LedgerQuery(
        patient_id=patient,
        project_id=project,
        destination=destination,
        status=status,
        since=parse_when(since),
        until=parse_when(until),
        limit=None if (csv or parquet) else limit,
    )
    frame = deliveries_frame(current_store(), query)
    if csv:
        frame.to_csv(csv, index=False)
        console.print(f"{len(frame)} rows written to {csv}")
    if parquet:
        frame.to_parquet(parquet, index=False)
        console.print(f"{len(frame)} rows written to {parquet}")
    if not (csv or parquet):
        if not wide:
            frame = frame.assign(
                delivered_at=frame["delivered_at"].map(_short_time),
                flow_run_id=frame["flow_run_id"].str[:8],
                sha256=frame["sha256"].str[:12],
            )[NARROW_COLUMNS]
        _print_frame(frame, "deliveries")


NARROW_COLUMNS = [
    "delivered_at", "status", "patient_id", "organization", "destination", "data_type",
    "version", "path", "purpose", "flow_run_id", "last_error",
]  # fmt: skip


def _short_time(value: object) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if isinstance(value, datetime) else ""


def _print_frame(frame: pd.DataFrame, title: str) -> None:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column), overflow="fold")
    for row in frame.itertuples(index=False):
        table.add_row(*(printable(v) for v in row))
    console.print(table)


@app.command()
def disclosures(
    patient: Annotated[str | None, typer.Option(help="healthexPatientId")] = None,
    since: Annotated[str | None, typer.Option(help="ISO date/time, UTC unless given")] = None,
    csv: Annotated[Path | None, typer.Option(help="Write the rows as CSV")] = None,
) -> None:
    """Every send of a patient's records (re-sends included) and every read through the pull
    API: the accounting of disclosures."""
    from patient_delivery.reports import disclosures_frame

    frame = disclosures_frame(current_store(), patient, parse_when(since))
    if csv:
        frame.to_csv(csv, index=False)
        console.print(f"{len(frame)} rows written to {csv}")
        return
    frame = frame.assign(
        disclosed_at=frame["disclosed_at"].map(_short_time),
        sha256=frame["sha256"].str[:12],
        flow_run_id=frame["flow_run_id"].str[:8],
    )
    _print_frame(frame, "disclosures")


@app.command()
def status() -> None:
    """Deliveries per destination and status, and the latest runs (from the ledger)."""
    from patient_delivery.reports import recent_runs, status_counts

    store = current_store()
    _print_frame(status_counts(store), "deliveries by destination and status")
    runs = recent_runs(store)
    runs["last_activity"] = runs["last_activity"].map(_short_time)
    _print_frame(runs, "recent runs (by the ledger rows they last touched)")


@app.command("upgrade-store")
def upgradecurrent_store() -> None:
    """Create the store or upgrade its schema in place (also done on every open)."""
    store = current_store()
    console.print(f"store at {store.url} is at the latest schema")
