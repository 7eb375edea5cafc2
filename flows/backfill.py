"""Ad hoc backfills and scheduled re-deliveries, on top of the delivery run.

backfill   -> plan what matches (dry run: publish the plan, send nothing), queue it,
              then run the delivery for the same scope
redeliver  -> what failed or was left pending; with `full`, a project's newest documents
              to one destination again, at the paths they were sent to
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from patient_delivery import backfill as backfills
from patient_delivery import destination_health
from patient_delivery.documents import DataType
from patient_delivery.flows import runtime
from patient_delivery.flows.deliver import deliver
from patient_delivery.flows.parameters import NotGiven
from patient_delivery.flows.reporting import RunSummary, run_name
from patient_delivery.ingest import check_scope
from patient_delivery.store import open_store

PLAN_ROWS_PER_PAGE = 1000
"""Rows of a dry run's plan per table artifact (`backfill-plan-rows-1`, `-2`, ...)."""


@task(name="plan")
def plan(request: backfills.BackfillRequest, dry_run: bool) -> dict[str, int]:
    """Count (and on a dry run, publish) what the backfill would do.

    The plan goes to Prefect as tables: counts per destination, data type and action
    (`backfill-plan`), then every planned delivery, a page of rows per artifact. Rows carry
    healthexPatientIds (ours, opaque), never paths: a path may hold an externalId, which may be
    a medical record number."""
    planned = backfills.plan(open_store(), request)
    counts = dict(planned.counts)
    if dry_run:
        summary = Counter((i.destination, i.data_type, i.action) for i in planned.items)
        rows = [
            {"destination": destination, "data type": data_type, "action": action, "count": n}
            for (destination, data_type, action), n in sorted(summary.items())
        ]
        create_table_artifact(
            table=rows or [{"action": "(nothing matches)"}],
            key="backfill-plan",
            description="Dry run, nothing sent: " + _describe(counts),
        )
        items = planned.items
        pages = math.ceil(len(items) / PLAN_ROWS_PER_PAGE)
        for page in range(pages):
            shown = items[page * PLAN_ROWS_PER_PAGE : (page + 1) * PLAN_ROWS_PER_PAGE]
            create_table_artifact(
                table=[_plan_row(item) for item in shown],
                key=f"backfill-plan-rows-{page + 1}",
                description=f"Dry run plan, rows page {page + 1} of {pages}",
            )
    return counts


def _plan_row(item: backfills.PlannedDelivery) -> dict[str, object]:
    return {
        "patient": item.patient_id,
        "project": item.project_id,
        "destination": item.destination,
        "data type": item.data_type,
        "version": item.version,
        "action": item.action,
    }


@task(name="queue")
def queue(request: backfills.BackfillRequest) -> dict[str, int]:
    return dict(backfills.apply(open_store(), request))


def _run_name(kind: str) -> str:
    return run_name(lambda: _describe_run(kind))


def _describe_run(kind: str) -> str:
    parameters = flow_run.parameters or {}
    name = f"{kind} {parameters.get('project') or 'all-projects'}"
    if destination := parameters.get("destination"):
        name += " to " + ",".join([destination] if isinstance(destination, str) else destination)
    return name + (" (dry run)" if parameters.get("dry_run") else "")


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {action}" for action, n in sorted(counts.items())) or "nothing matches"


@flow(name="backfill", flow_run_name=lambda: _run_name("backfill"),
      timeout_seconds=runtime.run_timeout(), validate_parameters=True)  # fmt: skip
def backfill(
    org: str | NotGiven = None,
    project: str | NotGiven = None,
    patient: list[str] | NotGiven = None,
    created_from: datetime | NotGiven = None,
    created_to: datetime | NotGiven = None,
    data_type: list[DataType] | NotGiven = None,
    destination: list[str] | NotGiven = None,
    dry_run: bool = True,
    force: bool = False,
) -> dict[str, int]:
    """Deliver the newest matching documents again where they are missing (or everywhere, with
    `force`). A dry run (the default) only reports the plan. The parameters are the CLI's
    `backfill` options.

    Args:
        org: Only this organization's projects (its orgId).
        project: Only this project (its projectId).
        patient: Only these patients (healthexPatientIds).
        created_from: Only document versions stored at or after this time (UTC if no zone).
        created_to: Only document versions stored before this time.
        data_type: Only these data types: ccda, fhir.
        destination: Only these destinations, as block references (`sftp-destination/acme`).
        dry_run: Only publish the plan (what would be sent where); send nothing.
        force: Also send again what the destination already received.
    """
    logger = get_run_logger()
    check_scope(open_store(), org, project)  # refused before anything runs
    request = backfills.BackfillRequest(
        organization_id=org,
        project_id=project,
        patient_ids=tuple(patient or ()),
        created_from=created_from,
        created_to=created_to,
        data_types=tuple(data_type or ()),
        destinations=tuple(destination or ()),
        force=force,
    )
    counts = plan(request, dry_run)
    logger.info("plan: %s", _describe(counts))
    if dry_run:
        return counts
    counts = queue(request)
    summary: RunSummary = deliver(
        project=project, destination=destination, patient=patient, data_type=data_type
    )
    counts["delivered"] = summary.delivered
    counts["failed"] = summary.failed
    logger.info("backfill done: %s", _describe(counts))
    create_table_artifact(  # on the backfill's own run, not only on its delivery's
        table=[{"action": action, "count": n} for action, n in sorted(counts.items())],
        key="backfill-summary", description="Backfill: " + _describe(counts),
    )  # fmt: skip
    return counts


@flow(name="redeliver", flow_run_name=lambda: _run_name("redeliver"),
      timeout_seconds=runtime.run_timeout(), validate_parameters=True)  # fmt: skip
def redeliver(
    project: str | NotGiven = None,
    destination: str | NotGiven = None,
    full: bool = False,
    dry_run: bool = False,
) -> dict[str, int]:
    """Send again what failed or was left pending (destinations down are probed at once, and
    those reached take part); with `full`, every newest document of the
    project to that destination, at the paths it had (an organization that lost its files).
    The parameters are the CLI's `redeliver` options.

    Args:
        project: Only this project (its projectId); needed with `full`.
        destination: Only this destination, as a block reference; needed with `full`.
        full: Send every newest document of the project to the destination again.
        dry_run: Only report what would be sent.
    """
    check_scope(open_store(), project_id=project)
    if full:
        if not (project and destination):
            raise ValueError("a full re-delivery needs a project and a destination")
        return backfill(project=project, destination=[destination], force=True, dry_run=dry_run)
    if dry_run:
        request = backfills.BackfillRequest(
            project_id=project, destinations=(destination,) if destination else ()
        )
        return plan(request, dry_run=True)
    # Asked for: destinations down are probed at once, not at their next probe.
    destination_health.probe_now(open_store(), [destination] if destination else None)
    summary = deliver(project=project, destination=[destination] if destination else None)
    return {"delivered": summary.delivered, "failed": summary.failed}
