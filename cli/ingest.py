"""Organizations, projects, patients, documents, imports, subscriptions and seeding."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

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
    prefect,
    read_bytes,
    refusals,
    show_frame,
)

org_app = typer.Typer(help="Organizations.", no_args_is_help=True)
project_app = typer.Typer(help="Projects of an organization.", no_args_is_help=True)
patient_app = typer.Typer(help="Patients and whom they share with.", no_args_is_help=True)
document_app = typer.Typer(help="Patients' documents.", no_args_is_help=True)
import_app = typer.Typer(help="Import real-world exports.", no_args_is_help=True)
app.add_typer(org_app, name="org")
app.add_typer(project_app, name="project")
app.add_typer(patient_app, name="patient")
app.add_typer(document_app, name="document")
app.add_typer(import_app, name="import")


@org_app.command("add")
def org_add(
    name: str,
    org_id: Annotated[
        str | None, typer.Option("--id", help="orgId; generated when omitted")
    ] = None,
) -> None:
    """Add an organization; prints its orgId."""
    from patient_delivery import ingest

    console.print(refusals(lambda: ingest.add_organization(current_store(), name, org_id)))


@org_app.command("list")
def org_list(as_json: Json = False, csv: Csv = None, overwrite: Overwrite = False) -> None:
    """Every organization, with how many projects it has."""
    from patient_delivery.reports import organizations_frame

    show_frame(organizations_frame(current_store()), "organizations", as_json, csv, overwrite)


@project_app.command("list")
def project_list(
    org_id: Annotated[str | None, typer.Argument(help="Only this organization's")] = None,
    as_json: Json = False,
    csv: Csv = None,
    overwrite: Overwrite = False,
) -> None:
    """Projects, with how many patients share with each and how many destinations each
    delivers to."""
    from patient_delivery.reports import projects_frame

    in_scope(org_id=org_id)
    show_frame(projects_frame(current_store(), org_id), "projects", as_json, csv, overwrite)


@project_app.command("add")
def project_add(
    org_id: str,
    name: str,
    project_id: Annotated[
        str | None, typer.Option("--id", help="projectId; generated when omitted")
    ] = None,
) -> None:
    """Add a project to an organization; prints its projectId."""
    from patient_delivery import ingest

    console.print(refusals(lambda: ingest.add_project(current_store(), org_id, name, project_id)))


@patient_app.command("add")
def patient_add(
    project_id: str,
    external_id: Annotated[
        str | None, typer.Option(help="The organization's own ID for the patient")
    ] = None,
) -> None:
    """Add a patient who shares with a project; prints the new healthexPatientId."""
    from patient_delivery import ingest

    console.print(refusals(lambda: ingest.add_patient(current_store(), project_id, external_id)))


@patient_app.command("share")
def patient_share(
    patient_id: str,
    project_id: str,
    external_id: Annotated[
        str | None, typer.Option(help="The project's ID for the patient")
    ] = None,
) -> None:
    """Share an existing patient with another project; their latest documents are queued."""
    from patient_delivery import ingest

    queued = refusals(
        lambda: ingest.share_patient(current_store(), patient_id, project_id, external_id)
    )
    console.print(f"shared; {queued} deliveries queued")


@patient_app.command("unshare")
def patient_unshare(
    patient_id: str,
    project_id: str,
    reason: Annotated[str | None, typer.Option(help="Why, for the record (500 characters)")] = None,
) -> None:
    """The patient stops sharing with the project, from now on: nothing more of theirs is sent
    to its destinations or served to it through the pull API; what is not yet sent is
    withdrawn. Recorded with who, when and why. PATIENT PROJECT, as `patient share`."""
    if not patient_id.startswith("hx_") and project_id.startswith("hx_"):
        raise fail("the order is PATIENT PROJECT (as `patient share`): "
                   f"patient unshare {project_id} {patient_id}", code=2)  # fmt: skip
    import getpass
    import socket

    from patient_delivery import ingest

    by = f"cli:{getpass.getuser()}@{socket.gethostname()}"
    done = refusals(
        lambda: ingest.unshare_patient(current_store(), project_id, patient_id, reason, by)
    )
    console.print(f"share withdrawn; {done.withdrawn_deliveries} deliveries withdrawn")


@document_app.command("put")
def document_put(
    patient_id: str,
    data_type: Annotated[str, typer.Argument(help="ccda or fhir")],
    file: Annotated[Path, typer.Argument(help="The document, or - for standard input")],
) -> None:
    """Store a patient's document; a changed document becomes a new version and is queued."""
    from patient_delivery import ingest

    content = sys.stdin.buffer.read() if str(file) == "-" else read_bytes(file, "FILE")
    result = refusals(lambda: ingest.put_document(current_store(), patient_id, data_type, content))
    if result.created:
        console.print(
            f"stored {data_type} version {result.version} ({result.size} bytes, "
            f"sha256 {result.sha256[:12]}...); {result.queued} deliveries queued"
        )
    else:
        console.print(f"unchanged: identical to version {result.version}; nothing queued")


@import_app.command("fhir-bulk")
def import_fhir_bulk(
    folder: Path,
    project: Annotated[str, typer.Option(help="Project the patients share with")],
    external_id_system: Annotated[
        str | None,
        typer.Option(help="Take externalId from Patient.identifier in this system (default: id)"),
    ] = None,
) -> None:
    """Import a FHIR bulk export (NDJSON per resource type): one Bundle per patient."""
    from patient_delivery import importers

    report = refusals(
        lambda: importers.import_fhir_bulk(current_store(), folder, project, external_id_system)
    )
    _print_import(report)


@import_app.command("ccda")
def import_ccda(
    files: list[Path],
    project: Annotated[
        str | None, typer.Option(help="One new patient per file (externalId = file name)")
    ] = None,
    patient: Annotated[
        str | None, typer.Option(help="All files as versions of this patient")
    ] = None,
) -> None:
    """Import C-CDA documents as they are."""
    from patient_delivery import importers

    report = refusals(lambda: importers.import_ccda(current_store(), files, project, patient))
    _print_import(report)


def _print_import(report) -> None:  # type: ignore[no-untyped-def]
    console.print(
        f"patients created {report.patients_created}, matched {report.patients_matched}; "
        f"documents stored {report.documents_created}, unchanged {report.documents_unchanged}; "
        f"deliveries queued {report.deliveries_queued}"
    )
    if report.left_out_types:
        kinds = ", ".join(
            f"{kind} {count}" for kind, count in sorted(report.left_out_types.items())
        )
        console.print(f"left out (not about one patient): {kinds}", highlight=False)
    for refusal in report.refused:
        errors.print(f"[yellow]refused:[/yellow] {refusal}", highlight=False)
    if report.refused:
        raise typer.Exit(2)


@app.command()
def subscribe(
    project_id: str,
    destination: Annotated[str, typer.Argument(help="Destination block, e.g. local-destination/x")],
    types: Annotated[str, typer.Option(help="Data types, comma-separated")] = "ccda,fhir",
    purpose: Annotated[str, typer.Option(help="Purpose of the disclosure, for the ledger")] = (
        "Patient-directed sharing"
    ),
) -> None:
    """Deliver a project's documents to a destination; what it already has is queued now. The
    destination block must exist and be valid (nothing is queued otherwise)."""
    from patient_delivery import ingest

    store = current_store()
    refusals(lambda: ingest.check_subscription(store, project_id, destination))  # before Prefect
    prefect()
    from patient_delivery.blocks import BlockProblem
    from patient_delivery.documents import InvalidDocument
    from patient_delivery.flows.subscriptions import subscribe as subscribe_checked

    queued = refusals(
        lambda: subscribe_checked(store, project_id, destination, types.split(","), purpose),
        (ingest.IngestError, InvalidDocument, BlockProblem),
    )
    console.print(f"subscribed; {queued} deliveries queued")


@app.command()
def unsubscribe(
    project_id: str,
    destination: Annotated[str, typer.Argument(help="Destination block, e.g. local-destination/x")],
) -> None:
    """Stop delivering a project's documents to a destination; what is still queued for it (or
    failed and waiting to be retried) is cancelled (marked superseded: it will not be sent).
    What was delivered stays in the ledger."""
    from patient_delivery import ingest

    cancelled = refusals(lambda: ingest.unsubscribe(current_store(), project_id, destination))
    console.print(f"unsubscribed; {cancelled} queued deliveries cancelled (superseded)")


@app.command()
def subscriptions(
    project: Annotated[str | None, typer.Option(help="Only this project's")] = None,
    as_json: Json = False,
    csv: Csv = None,
    overwrite: Overwrite = False,
) -> None:
    """What each project delivers where, and where its deliveries stand there."""
    from patient_delivery.reports import subscriptions_frame

    in_scope(project_id=project)
    show_frame(subscriptions_frame(current_store(), project), "subscriptions", as_json, csv,
               overwrite, keep=SUBSCRIPTIONS_VIEW)  # fmt: skip


SUBSCRIPTIONS_VIEW = ("project_id", "destination", "queued", "failed", "delivered")
"""What `subscriptions` must show at any width: where each project delivers and how it
stands there."""


@app.command()
def seed(
    project: Annotated[str, typer.Option(help="Project to fill")],
    patients: Annotated[int, typer.Option(min=1, help="How many patients")] = 100,
    seed_value: Annotated[int, typer.Option("--seed", help="Random seed")] = 0,
) -> None:
    """Generate synthetic patients, each with a C-CDA document and a FHIR bundle."""
    from rich.progress import Progress

    from patient_delivery.seed import seed_project

    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("seeding", total=patients)
        made = refusals(
            lambda: seed_project(
                current_store(),
                project,
                patients,
                seed_value,
                progress=lambda n: progress.advance(bar, n),
            )
        )
    console.print(f"{len(made)} patients seeded into {project}")
