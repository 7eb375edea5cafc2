"""Delivery runs: now in this process or on a deployment, on updates, backfill and redeliver."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated
from uuid import UUID

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from patient_delivery.cli.common import (
    app,
    broken_name,
    console,
    errors,
    escaped,
    fail,
    in_scope,
    parse_when,
    prefect,
    printable,
    refusals,
)

if TYPE_CHECKING:
    from prefect.states import State

    from patient_delivery.flows.reporting import RunSummary


OnDeployment = Annotated[
    bool, typer.Option(help="Start the deployment on the Prefect server instead")
]
Watch = Annotated[
    bool,
    typer.Option(help="With --deployment: wait for the run's end; exit 1 unless it completed"),
]
DataTypes = Annotated[
    list[str] | None, typer.Option("--data-type", "--type", help="ccda or fhir (repeatable)")
]
RunName = Annotated[
    str | None, typer.Option(help="With --deployment: the run's name in the Prefect UI")
]


@app.command()
def deliver(
    project: Annotated[str | None, typer.Option(help="Only this project")] = None,
    destination: Annotated[
        list[str] | None, typer.Option(help="Only these destinations (repeatable)")
    ] = None,
    patient: Annotated[list[str] | None, typer.Option(help="Only these patients")] = None,
    data_type: DataTypes = None,
    batch_size: Annotated[
        int, typer.Option(min=1, max=5000, help="Documents recorded per ledger transaction")
    ] = 100,
    max_documents: Annotated[int | None, typer.Option(min=1)] = None,
    page_size: Annotated[
        int, typer.Option(min=1, help="Deliveries claimed at a time (runs sharing a backlog)")
    ] = 5000,
    max_sessions: Annotated[
        int,
        typer.Option(
            min=1,
            help="Most destination sessions open at once over every destination (an SFTP "
            "connection, an S3 upload lane)",
        ),
    ] = 32,
    dask: Annotated[
        str | None,
        typer.Option(help="Upload on a Dask cluster: tcp://scheduler:8786, or `local`"),
    ] = None,
    deployment: OnDeployment = False,
    watch: Watch = False,
    name: RunName = None,
) -> None:
    """Run the delivery flow now, in this process; exit code 1 when any delivery failed."""
    _deployment_options(deployment, watch, name)
    in_scope(project_id=project, patient_ids=patient or (), destinations=destination or ())
    _check_types(data_type)
    prefect()
    _check_dask(dask)
    parameters = {
        "project": project,
        "destination": destination,
        "patient": patient,
        "data_type": data_type,
        "batch_size": batch_size,
        "max_documents": max_documents,
        "page_size": page_size,
        "max_sessions": max_sessions,
    }
    if deployment:
        start_deployment("deliver-updates/deliver-now", parameters, watch, name)
        return
    from patient_delivery.flows.deliver import deliver as run_delivery
    from patient_delivery.flows.runtime import task_runner

    with progress_bar("delivering"):
        summary = run_delivery(task_runner(dask) if dask else None, **parameters)
    print_summary(summary)
    if summary.failed or summary.manifests_failed:
        raise typer.Exit(1)


def _check_dask(address: str | None) -> None:
    """Refuse (exit 2) a Dask address this process cannot use, given or from the settings
    (`PATIENT_DELIVERY_DASK_ADDRESS`), before the flow loads or anything is claimed (after
    `prefect()`: the settings import Prefect, whose local defaults must come first)."""
    from patient_delivery.flows.runtime import check_dask_address
    from patient_delivery.settings import get_settings

    address = address or get_settings().dask_address
    if not address:
        return
    try:
        check_dask_address(address)
    except ValueError as exc:
        raise fail(str(exc), 2) from None


@contextmanager
def progress_bar(label: str) -> Iterator[None]:
    """A rich progress bar fed by the delivery flow's progress, for runs in this process; at
    its end, the run's events are sent before the command goes on."""
    from rich.progress import Progress

    from patient_delivery.flows.reporting import progress_hooks
    from patient_delivery.flows.runtime import send_pending_events

    with Progress(console=errors, transient=True) as progress, _logs_above(progress.console):
        bar = progress.add_task(label, total=None)

        def hook(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total)

        progress_hooks.append(hook)
        try:
            yield
        finally:
            progress_hooks.remove(hook)
            send_pending_events()


@contextmanager
def _logs_above(console: Console) -> Iterator[None]:
    """Prefect's log lines printed through the progress bar's console, above the bar, instead
    of into it (each Prefect console handler prints to a console of its own)."""
    import logging

    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()  # the handlers exist before the run, not only once it has started
    loggers = [
        logging.getLogger(),
        *(logging.getLogger(n) for n in logging.root.manager.loggerDict),
    ]
    handlers = {
        h for logger in loggers for h in logger.handlers if isinstance(h, PrefectConsoleHandler)
    }
    own = {handler: handler.console for handler in handlers}
    for handler in handlers:
        handler.console = console
    try:
        yield
    finally:
        for handler, before in own.items():
            handler.console = before


def start_deployment(
    name: str, parameters: dict[str, object], watch: bool = False, run_name: str | None = None
) -> None:
    """Start a deployment's run on the Prefect server instead of running here; print its UI
    address, and with `watch` wait for its end (exit 1 unless it completed)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.urls import url_for

    try:
        flow_run = run_deployment(
            name,
            # None is "not given": the forms' schemas type optional parameters without null.
            parameters={k: v for k, v in parameters.items() if v is not None},
            timeout=0,
            flow_run_name=run_name,
        )
    except ObjectNotFound:
        raise fail(
            f"no deployment {name} on the Prefect server (`prefect deploy --all`)", 2
        ) from None
    started = f"started {name}: flow run {flow_run.name} ({flow_run.id})"
    console.print(printable(started), highlight=False, soft_wrap=True)
    address = url_for(flow_run)
    if address:
        console.print(address, highlight=False, soft_wrap=True)
    if watch:
        state, headline = _watch(flow_run.id)
        console.print(printable(f"{state.name}: {headline}"), soft_wrap=True)
        if not state.is_completed():
            raise typer.Exit(1)


WATCH_EVERY = 2.0
"""Seconds between looks at a watched run: its state, and its progress artifact."""


def _watch(run_id: UUID) -> tuple[State, str]:
    """Follow a run to its end, printing each state it enters and its progress as it moves;
    its final state, and its headline (the state's message, else its summary card's)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    from patient_delivery.flows.reporting import PROGRESS_KEY

    def artifact(client, key: str):  # type: ignore[no-untyped-def]
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
        )
        return found[-1] if found else None

    shown: tuple[object, ...] = ()
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            progress = artifact(client, PROGRESS_KEY)
            now = (run.state_name, progress.data if progress else None)
            if now != shown:
                done = f", {float(now[1]):.0f}% sent" if now[1] is not None else ""
                errors.print(f"{now[0]}{done}", highlight=False)
                shown = now
            if run.state is not None and run.state.is_final():
                card = artifact(client, "delivery-summary")
                said = (card.description or "").splitlines() if card else []
                headline = run.state.message or (said[0] if said else "")
                return run.state, headline
            time.sleep(WATCH_EVERY)


SUMMARY_NAME_WIDTH = 18
"""Least width of the run summary's destination column (`local-destination/`)."""


def print_summary(summary: RunSummary) -> None:
    from patient_delivery.flows.reporting import REASONS

    table = Table(title=f"delivery run {summary.flow_run_id}")
    rows = summary.rows()
    # A destination breaks only after a `/`, on lines as wide as the counts leave room for.
    room = max(SUMMARY_NAME_WIDTH, console.width - 66)
    for column in ("destination", "delivered", "failed", "parked", "skipped", "MB", "reasons"):
        table.add_column(column, overflow="fold", no_wrap=column != "reasons")
    for row in rows:
        table.add_row(
            Text(broken_name(escaped(str(row["destination"])), room)),
            str(row["delivered"]),
            str(row["failed"]),
            str(row["parked"]),
            str(row["skipped"]),
            f"{row['MB']:.1f}",
            printable(row[REASONS]),
        )
    if not rows:
        table.add_row("(nothing owed)", "0", "0", "0", "0", "0.0", "")
    console.print(table)
    for destination, why in summary.manifests_failed.items():
        errors.print(Text("manifest: ", style="red") + printable(f"{destination}: {why}"))
    if summary.parked:
        note = summary.parked_note().removeprefix("; ")
        shown = printable(f"{note}; `patient-delivery destination list` shows what is wrong")
        errors.print(Text("parked: ", style="yellow") + shown, highlight=False)


@app.command()
def listen(
    quiet: Annotated[
        float, typer.Option(help="Seconds to wait for a burst of updates to end")
    ] = 0.2,
) -> None:
    """Deliver as soon as ingest announces an update (needs a Prefect server: PREFECT_API_URL).
    While it runs, the update trigger of the deliver-updates deployment is paused."""
    import os
    import signal
    import threading

    if not os.environ.get("PREFECT_API_URL"):
        raise fail("listen follows a Prefect server's events: set PREFECT_API_URL", code=2)
    prefect()
    from patient_delivery import ledger
    from patient_delivery.flows.deliver import deliver as run_delivery
    from patient_delivery.flows.handover import hold_while_running
    from patient_delivery.flows.listener import UpdateListener
    from patient_delivery.settings import get_settings
    from patient_delivery.store import open_store

    def announce(projects: set[str]) -> None:
        names = ", ".join(sorted(p for p in projects if p)) or "all projects"
        console.print(f"update for {names}: delivering", highlight=False)

    def owed(project: str | None) -> int:
        return ledger.count_owed(open_store(), "", ledger.WorkFilter(project_id=project))

    silent = get_settings().listener_silent_seconds
    listener = UpdateListener(run_delivery, quiet, on_run=announce, owed=owed,
                              hold=lambda stopped: hold_while_running(stopped, silent))  # fmt: skip
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: listener.stopped.set())

    def say_ready() -> None:
        if listener.ready.wait(timeout=60):
            console.print("listening for patient.data.updated", highlight=False)

    threading.Thread(target=say_ready, daemon=True).start()
    listener.run()


@app.command("backfill")
def backfill_command(
    org: Annotated[str | None, typer.Option(help="Only this organization")] = None,
    project: Annotated[str | None, typer.Option(help="Only this project")] = None,
    patient: Annotated[list[str] | None, typer.Option(help="Only these patients")] = None,
    created_from: Annotated[
        str | None,
        typer.Option("--created-from", "--from", help="Versions created at or after (ISO, UTC)"),
    ] = None,
    created_to: Annotated[
        str | None, typer.Option("--created-to", "--to", help="Versions created before (ISO, UTC)")
    ] = None,
    data_type: DataTypes = None,
    destination: Annotated[list[str] | None, typer.Option(help="Only these destinations")] = None,
    force: Annotated[bool, typer.Option(help="Also re-send what was delivered")] = False,
    dry_run: Annotated[bool, typer.Option(help="Only show the plan")] = False,
    deployment: OnDeployment = False,
    watch: Watch = False,
    name: RunName = None,
) -> None:
    """Queue the newest matching documents where they are missing, then deliver them."""
    _deployment_options(deployment, watch, name)
    in_scope(org, project)
    _check_types(data_type)
    prefect()
    parameters = {
        "org": org,
        "project": project,
        "patient": patient,
        "created_from": parse_when(created_from, "--created-from"),
        "created_to": parse_when(created_to, "--created-to"),
        "data_type": data_type,
        "destination": destination,
        "dry_run": dry_run,
        "force": force,
    }
    if deployment:
        start_deployment("backfill/backfill", parameters, watch, name)
        return
    from patient_delivery.flows.backfill import backfill

    with progress_bar("backfill"):
        counts = backfill(**parameters)
    _print_counts("backfill (dry run: nothing sent)" if dry_run else "backfill", counts)


@app.command("redeliver")
def redeliver_command(
    project: Annotated[str | None, typer.Option(help="Only this project")] = None,
    destination: Annotated[str | None, typer.Option(help="Only this destination")] = None,
    full: Annotated[
        bool, typer.Option(help="Every newest document of the project to the destination")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Only show the plan")] = False,
    deployment: OnDeployment = False,
    watch: Watch = False,
    name: RunName = None,
) -> None:
    """Send again what failed or was left pending (or, with --full, everything)."""
    _deployment_options(deployment, watch, name)
    if full and not (project and destination):
        raise fail("--full: needs --project and --destination (what to send again, where)",
                   code=2)  # fmt: skip
    in_scope(project_id=project, destinations=[destination] if destination else ())
    prefect()
    parameters = {"project": project, "destination": destination, "full": full,
                  "dry_run": dry_run}  # fmt: skip
    if deployment:
        start_deployment("redeliver/redeliver", parameters, watch, name)
        return
    from patient_delivery.flows.backfill import redeliver

    with progress_bar("redeliver"):
        counts = refusals(lambda: redeliver(**parameters), refused=(ValueError,))
    _print_counts("redeliver (dry run: nothing sent)" if dry_run else "redeliver", counts)


def _deployment_options(deployment: bool, watch: bool, name: str | None) -> None:
    """Refuse `--watch` and `--name` without `--deployment` (exit 2): a run in this process is
    watched anyway and named for what started it, so they would do nothing."""
    for given, option in ((watch, "--watch"), (name is not None, "--name")):
        if given and not deployment:
            raise fail(f"{option}: only with --deployment (a run on the Prefect server)", code=2)


def _check_types(data_types: list[str] | None) -> None:
    from patient_delivery.documents import check_data_type

    refusals(lambda: [check_data_type(t) for t in data_types or []])


def _print_counts(title: str, counts: dict[str, int]) -> None:
    table = Table(title=title)
    table.add_column("what")
    table.add_column("count", justify="right")
    for what, count in sorted(counts.items()):
        table.add_row(printable(what), str(count))
    if not counts:
        table.add_row("(nothing matches)", "0")
    console.print(table)
    if counts.get("failed"):
        raise typer.Exit(1)
