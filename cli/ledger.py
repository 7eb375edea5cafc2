"""Views of the ledger: deliveries, disclosures, status; the store's schema."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from patient_delivery.cli.common import (
    Csv,
    Json,
    Overwrite,
    app,
    console,
    current_store,
    errors,
    fail,
    in_scope,
    owner_only,
    parse_when,
    print_frame,
    print_json,
    written,
)

if TYPE_CHECKING:
    pass


STATUSES = ("queued", "pending", "delivered", "failed", "superseded", "replaced", "withdrawn")

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
        with owner_only(parquet, "--parquet", overwrite, binary=True) as out:
            frame.to_parquet(out, index=False)
        errors.print(f"{len(frame)} rows written to {parquet}", highlight=False)
    if written(frame, "deliveries", csv, as_json, overwrite) or parquet:
        return
    if not wide:
        frame = frame.assign(sha256=frame["sha256"].str[:12])[NARROW_COLUMNS]
    print_frame(frame, "deliveries", FAILED_VIEW if status == "failed" else DELIVERIES_VIEW)


DELIVERIES_VIEW = ("status", "destination", "patient_id")
FAILED_VIEW = ("destination", "patient_id", "last_error")
"""What `deliveries` must show at any width; with `--status failed`, why each failed."""

NARROW_COLUMNS = [
    "status", "destination", "delivered_at", "patient_id", "data_type", "version", "path",
    "org_name", "flow_run_id", "last_error",
]  # fmt: skip
"""The columns on a terminal, most needed first: those that do not fit the width are left out
(and named)."""


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
    from patient_delivery.reports import (
        LedgerQuery,
        disclosures_frame,
        records,
        withdrawals_frame,
    )

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
    if written(frame, "disclosures", csv, as_json=False, overwrite=overwrite):
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
    from patient_delivery.reports import recent_runs, records, status_counts

    store = current_store()
    counts, runs = status_counts(store), recent_runs(store)
    if as_json:
        print_json({"destinations": records(counts), "recent_runs": records(runs)})
        return
    print_frame(counts, "deliveries by destination and status",
                ("destination", "failed", "oldest_owed_s", "lag_p95_1h_s", "down_since",
                 "waiting_until"),
                more="--json")  # fmt: skip
    print_frame(runs, "recent runs (by the ledger rows they last touched)",
                ("flow_run_id", "delivered", "failed"), more="--json")  # fmt: skip


@app.command("upgrade-store")
def upgradecurrent_store() -> None:
    """Create the store or upgrade its schema in place (also done on every open)."""
    store = current_store()
    console.print(f"store at {store.url} is at the latest schema")
