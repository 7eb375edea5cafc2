"""`patient-delivery`: ingest, destinations, delivery runs and the ledger from the command line.

Commands that need Prefect (destinations, delivery runs, the demo) import it lazily: the
store-only commands stay fast.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from patient_delivery.settings import get_settings

if TYPE_CHECKING:
    import pandas as pd
    from pydantic import ValidationError

    from flows.deliver import RunSummary
    from patient_delivery.store import Store

app = typer.Typer(
    help="Deliver patients' health records to the organizations they shared them with.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
org_app = typer.Typer(help="Organizations.", no_args_is_help=True)
project_app = typer.Typer(help="Projects of an organization.", no_args_is_help=True)
patient_app = typer.Typer(help="Patients and whom they share with.", no_args_is_help=True)
document_app = typer.Typer(help="Patients' documents.", no_args_is_help=True)
import_app = typer.Typer(help="Import real-world exports.", no_args_is_help=True)
destination_app = typer.Typer(help="Destination blocks (Prefect).", no_args_is_help=True)
app.add_typer(org_app, name="org")
app.add_typer(project_app, name="project")
app.add_typer(patient_app, name="patient")
app.add_typer(document_app, name="document")
app.add_typer(import_app, name="import")
app.add_typer(destination_app, name="destination")

console = Console()
errors = Console(stderr=True)


def _store() -> Store:
    from patient_delivery.store import open_store

    return open_store()


def _fail(message: str, code: int = 1) -> typer.Exit:
    errors.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    return typer.Exit(code)


def _prefect() -> None:
    from patient_delivery.prefect_setup import apply_local_defaults

    apply_local_defaults(get_settings().home)


def _refusals(run, refused: tuple[type[Exception], ...] | None = None):  # type: ignore[no-untyped-def]
    """Run `run()`, turning refusals (by default the store's) into a message and exit code 2."""
    from patient_delivery.documents import InvalidDocument
    from patient_delivery.ingest import IngestError

    kinds = refused if refused is not None else (InvalidDocument, IngestError)
    try:
        return run()
    except kinds as exc:
        raise _fail(str(exc), code=2) from None


# --- organizations, projects, patients, documents ---------------------------------------------


@org_app.command("add")
def org_add(
    name: str,
    org_id: Annotated[
        str | None, typer.Option("--id", help="orgId; generated when omitted")
    ] = None,
) -> None:
    """Add an organization; prints its orgId."""
    from patient_delivery import ingest

    console.print(_refusals(lambda: ingest.add_organization(_store(), name, org_id)))


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

    console.print(_refusals(lambda: ingest.add_project(_store(), org_id, name, project_id)))


@patient_app.command("add")
def patient_add(
    project_id: str,
    external_id: Annotated[
        str | None, typer.Option(help="The organization's own ID for the patient")
    ] = None,
) -> None:
    """Add a patient who shares with a project; prints the new healthexPatientId."""
    from patient_delivery import ingest

    console.print(_refusals(lambda: ingest.add_patient(_store(), project_id, external_id)))


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

    queued = _refusals(lambda: ingest.share_patient(_store(), patient_id, project_id, external_id))
    console.print(f"shared; {queued} deliveries queued")


@document_app.command("put")
def document_put(
    patient_id: str,
    data_type: Annotated[str, typer.Argument(help="ccda or fhir")],
    file: Annotated[Path, typer.Argument(help="The document, or - for standard input")],
) -> None:
    """Store a patient's document; a changed document becomes a new version and is queued."""
    from patient_delivery import ingest

    content = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
    result = _refusals(lambda: ingest.put_document(_store(), patient_id, data_type, content))
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

    report = _refusals(
        lambda: importers.import_fhir_bulk(_store(), folder, project, external_id_system)
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

    report = _refusals(lambda: importers.import_ccda(_store(), files, project, patient))
    _print_import(report)


def _print_import(report) -> None:  # type: ignore[no-untyped-def]
    console.print(
        f"patients created {report.patients_created}, matched {report.patients_matched}; "
        f"documents stored {report.documents_created}, unchanged {report.documents_unchanged}; "
        f"deliveries queued {report.deliveries_queued}"
    )
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
    """Deliver a project's documents to a destination; what it already has is queued now."""
    from patient_delivery import ingest

    queued = _refusals(
        lambda: ingest.subscribe(_store(), project_id, destination, types.split(","), purpose)
    )
    console.print(f"subscribed; {queued} deliveries queued")


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
        made = _refusals(
            lambda: seed_project(
                _store(), project, patients, seed_value, progress=lambda n: progress.advance(bar, n)
            )
        )
    console.print(f"{len(made)} patients seeded into {project}")


# --- destinations and delivery ------------------------------------------------------------------


@destination_app.command("local")
def destination_local(
    name: str,
    root: Annotated[Path, typer.Option(help="Folder that receives the deliveries")],
    template: Annotated[str | None, typer.Option(help="Path template")] = None,
    max_connections: Annotated[int, typer.Option(min=1, max=64)] = 4,
    overwrite: Annotated[bool, typer.Option(help="Replace a block of that name")] = False,
) -> None:
    """Create (or replace) a local-folder destination block; prints its reference."""
    _prefect()
    from pydantic import ValidationError

    from blocks.local import LocalDestination

    try:
        fields = {"root": root.resolve(), "max_connections": max_connections}
        if template is not None:
            fields["path_template"] = template
        block = LocalDestination(**fields)
    except ValidationError as exc:
        raise _invalid(exc) from None
    block.save(name, overwrite=overwrite)
    console.print(f"local-destination/{name}")


def _invalid(error: ValidationError) -> typer.Exit:
    """Refused settings: each field and what is wrong with it, never the value given (it may
    be a secret)."""
    problems = [
        f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else str(e["msg"])
        for e in error.errors()
    ]
    return _fail("; ".join(problems), code=2)


def _save_block(block_type: type, name: str, overwrite: bool, fields: dict[str, object]) -> None:
    """Build a destination block (its settings are checked here) and save it in Prefect."""
    from pydantic import ValidationError

    try:
        block = block_type(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise _invalid(exc) from None
    try:
        block.save(name, overwrite=overwrite)
    except ValueError as exc:
        raise _fail(f"{exc} (use --overwrite to replace it)", code=2) from None
    console.print(f"{block_type.get_block_type_slug()}/{name}  {block.describe()}", highlight=False)


def _read_secret(from_stdin: bool, env: str | None, what: str) -> str | None:
    import os

    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if env:
        value = os.environ.get(env)
        if value is None:
            raise _fail(f"{what}: environment variable {env} is not set", code=2)
        return value
    return None


@destination_app.command("sftp")
def destination_sftp(
    name: str,
    host: Annotated[str, typer.Option(help="SFTP server host")],
    username: Annotated[str, typer.Option(help="Login user")],
    host_key: Annotated[
        list[str],
        typer.Option(help="Pinned host key: known_hosts line or SHA256:... (repeatable)"),
    ],
    port: Annotated[int, typer.Option(min=1, max=65535)] = 22,
    root: Annotated[str, typer.Option(help="Remote folder paths are relative to")] = ".",
    password_stdin: Annotated[bool, typer.Option(help="Read the password from stdin")] = False,
    password_env: Annotated[
        str | None, typer.Option(help="Read the password from this environment variable")
    ] = None,
    private_key_file: Annotated[Path | None, typer.Option(help="Private key file")] = None,
    passphrase_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the key's passphrase")
    ] = None,
    template: Annotated[str | None, typer.Option(help="Path template")] = None,
    max_connections: Annotated[int, typer.Option(min=1, max=64)] = 4,
    files_in_flight: Annotated[
        int, typer.Option(min=1, max=32, help="Files on their way at once per connection")
    ] = 4,
    overwrite: Annotated[bool, typer.Option(help="Replace a block of that name")] = False,
) -> None:
    """Create an SFTP destination block; the password never appears on the command line."""
    _prefect()
    from blocks.sftp import SftpDestination

    fields: dict[str, object] = {
        "host": host,
        "port": port,
        "username": username,
        "host_keys": host_key,
        "root": root,
        "password": _read_secret(password_stdin, password_env, "password"),
        "private_key": private_key_file.read_text() if private_key_file else None,
        "private_key_passphrase": _read_secret(False, passphrase_env, "passphrase"),
        "path_template": template,
        "max_connections": max_connections,
        "files_in_flight": files_in_flight,
    }
    _save_block(SftpDestination, name, overwrite, fields)


@destination_app.command("s3")
def destination_s3(
    name: str,
    bucket: Annotated[str, typer.Option(help="The organization's bucket")],
    role_arn: Annotated[str, typer.Option(help="The role the organization created for us")],
    external_id_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the sts:ExternalId")
    ] = None,
    region: Annotated[str, typer.Option()] = "us-east-1",
    aws_credentials: Annotated[
        str | None, typer.Option(help="Name of a prefect-aws AwsCredentials block (our identity)")
    ] = None,
    endpoint_url: Annotated[str | None, typer.Option(help="S3-compatible endpoint")] = None,
    sts_endpoint_url: Annotated[str | None, typer.Option(help="STS endpoint")] = None,
    sse: Annotated[str, typer.Option(help="AES256, aws:kms or none")] = "AES256",
    kms_key_id: Annotated[str | None, typer.Option(help="KMS key for aws:kms")] = None,
    bucket_owner_full_control: Annotated[bool, typer.Option(help="Send that canned ACL")] = False,
    session_name: Annotated[str, typer.Option(help="RoleSessionName")] = "patient-delivery",
    template: Annotated[str | None, typer.Option(help="Path template")] = None,
    max_connections: Annotated[int, typer.Option(min=1, max=64, help="Upload lanes")] = 8,
    files_in_flight: Annotated[
        int, typer.Option(min=1, max=32, help="Puts on their way at once per lane (crt)")
    ] = 2,
    transfer_client: Annotated[
        str, typer.Option(help="crt (AWS Common Runtime, the fast one) or boto3 (via a proxy)")
    ] = "crt",
    overwrite: Annotated[bool, typer.Option(help="Replace a block of that name")] = False,
) -> None:
    """Create an S3 destination block (an IAM role of the organization's, assumed by us)."""
    _prefect()
    from prefect_aws import AwsCredentials

    from blocks.s3 import S3Destination

    fields: dict[str, object] = {
        "bucket_name": bucket,
        "role_arn": role_arn,
        "external_id": _read_secret(False, external_id_env, "external ID"),
        "region_name": region,
        "aws_credentials": AwsCredentials.load(aws_credentials) if aws_credentials else None,
        "endpoint_url": endpoint_url,
        "sts_endpoint_url": sts_endpoint_url,
        "server_side_encryption": None if sse == "none" else sse,
        "kms_key_id": kms_key_id,
        "bucket_owner_full_control": bucket_owner_full_control,
        "role_session_name": session_name,
        "path_template": template,
        "max_connections": max_connections,
        "files_in_flight": files_in_flight,
        "transfer_client": transfer_client,
    }
    _save_block(S3Destination, name, overwrite, fields)


@destination_app.command("list")
def destination_list() -> None:
    """Every destination block, where it writes (no secrets)."""
    _prefect()
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    from blocks import LocalDestination, S3Destination, SftpDestination
    from flows.deliver import load_destination

    table = Table(title="destinations")
    table.add_column("reference", overflow="fold")
    table.add_column("writes to", overflow="fold")
    with get_client(sync_client=True) as client:
        for kind in (LocalDestination, S3Destination, SftpDestination):
            slug = kind.get_block_type_slug()
            try:
                documents = client.read_block_documents_by_type(slug, include_secrets=False)
            except PrefectHTTPStatusError as exc:
                if exc.response.status_code == 404:  # type never registered: none of that kind
                    continue
                raise
            for document in documents:
                if document.name and not document.is_anonymous:
                    reference = f"{slug}/{document.name}"
                    table.add_row(reference, load_destination(reference).describe())
    console.print(table)


@destination_app.command("show")
def destination_show(reference: Annotated[str, typer.Argument(help="e.g. sftp-destination/x")]):
    """A destination's settings; secrets show as ********."""
    _prefect()
    from pydantic import BaseModel, SecretStr

    from flows.deliver import load_destination

    block = load_destination(reference)
    table = Table(title=f"{reference}: {block.describe()}")
    table.add_column("setting")
    table.add_column("value", overflow="fold")
    for field_name in type(block).model_fields:
        value = getattr(block, field_name)
        if isinstance(value, SecretStr):
            shown = "********"
        elif isinstance(value, BaseModel):
            shown = type(value).__name__
        else:
            shown = str(value)
        table.add_row(field_name, shown)
    console.print(table)


@destination_app.command("host-key")
def destination_host_key(
    address: Annotated[str, typer.Argument(help="HOST or HOST:PORT of an SFTP server")],
) -> None:
    """Show an SFTP server's host key, to check with the organization and then pin."""
    from blocks.sftp import fetch_host_key, fingerprint, known_hosts_line

    host, _, port_text = address.rpartition(":") if ":" in address else (address, "", "22")
    port = int(port_text)
    try:
        key = fetch_host_key(host, port)
    except OSError as exc:
        raise _fail(f"cannot reach {host}:{port}: {exc.strerror or exc}") from None
    console.print(f"{key.get_name()} {fingerprint(key)}", highlight=False)
    console.print(known_hosts_line(host, port, key), highlight=False, soft_wrap=True)
    errors.print(
        "Check this fingerprint with the organization (over another channel) before pinning it "
        "with --host-key."
    )


@destination_app.command("test")
def destination_test(reference: Annotated[str, typer.Argument(help="e.g. local-destination/x")]):
    """Connect, write a probe file and remove it, reporting each step."""
    _prefect()
    from flows.deliver import load_destination

    report = load_destination(reference).test_connection()
    console.print(f"testing {report.destination}")
    for check in report.checks:
        mark = "[green]ok[/green]" if check.ok else "[red]FAILED[/red]"
        console.print(f"  {mark} {check.step} {check.detail}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def deliver(
    project: Annotated[str | None, typer.Option(help="Only this project")] = None,
    destination: Annotated[
        list[str] | None, typer.Option(help="Only these destinations (repeatable)")
    ] = None,
    patient: Annotated[list[str] | None, typer.Option(help="Only these patients")] = None,
    data_type: Annotated[list[str] | None, typer.Option("--type", help="ccda or fhir")] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, max=5000, help="Documents recorded per ledger transaction")
    ] = 100,
    max_documents: Annotated[int | None, typer.Option(min=1)] = None,
    page_size: Annotated[
        int, typer.Option(min=1, help="Deliveries claimed at a time (runs sharing a backlog)")
    ] = 5000,
    dask: Annotated[
        str | None,
        typer.Option(help="Upload on a Dask cluster: tcp://scheduler:8786, or `local`"),
    ] = None,
    deployment: Annotated[
        bool, typer.Option(help="Start the deployment on the Prefect server instead")
    ] = False,
) -> None:
    """Run the delivery flow now, in this process; exit code 1 when any delivery failed."""
    _prefect()
    parameters = {
        "project_id": project,
        "destinations": destination,
        "patient_ids": patient,
        "data_types": data_type,
        "batch_size": batch_size,
        "max_documents": max_documents,
        "page_size": page_size,
    }
    if deployment:
        _start_deployment("deliver-updates/deliver-updates", parameters)
        return
    from flows.deliver import deliver as run_delivery
    from flows.deliver import task_runner

    with _progress_bar("delivering"):
        summary = run_delivery(task_runner(dask) if dask else None, **parameters)
    _print_summary(summary)
    if summary.failed:
        raise typer.Exit(1)


@contextmanager
def _progress_bar(label: str) -> Iterator[None]:
    """A rich progress bar fed by the delivery flow's progress, for runs in this process."""
    from rich.progress import Progress

    from flows.deliver import progress_hooks

    with Progress(console=errors, transient=True) as progress:
        bar = progress.add_task(label, total=None)

        def hook(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total)

        progress_hooks.append(hook)
        try:
            yield
        finally:
            progress_hooks.remove(hook)


def _start_deployment(name: str, parameters: dict[str, object]) -> None:
    """Start a deployment's run on the Prefect server instead of running here."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        name, parameters={k: v for k, v in parameters.items() if v is not None}, timeout=0
    )
    console.print(f"started {name}: flow run {flow_run.name} ({flow_run.id})", highlight=False)


def _print_summary(summary: RunSummary) -> None:
    table = Table(title=f"delivery run {summary.flow_run_id}")
    for column in ("destination", "delivered", "failed", "skipped", "MB", "failure reasons"):
        table.add_column(column, overflow="fold")
    for row in summary.rows():
        table.add_row(
            str(row["destination"]),
            str(row["delivered"]),
            str(row["failed"]),
            str(row["skipped"]),
            f"{int(row['bytes']) / 1e6:.1f}",  # type: ignore[call-overload]
            str(row["failure reasons"]),
        )
    if not summary.rows():
        table.add_row("(nothing owed)", "0", "0", "0", "0.0", "")
    console.print(table)


@app.command()
def listen(
    quiet: Annotated[
        float, typer.Option(help="Seconds to wait for a burst of updates to end")
    ] = 0.2,
) -> None:
    """Deliver as soon as ingest announces an update (needs a Prefect server: PREFECT_API_URL)."""
    import os
    import signal
    import threading

    if not os.environ.get("PREFECT_API_URL"):
        raise _fail("listen follows a Prefect server's events: set PREFECT_API_URL", code=2)
    _prefect()
    from flows.deliver import deliver as run_delivery
    from flows.listener import UpdateListener

    def announce(projects: set[str]) -> None:
        names = ", ".join(sorted(p for p in projects if p)) or "all projects"
        console.print(f"update for {names}: delivering", highlight=False)

    listener = UpdateListener(run_delivery, quiet, on_run=announce)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: listener.stopped.set())

    def say_ready() -> None:
        if listener.ready.wait(timeout=60):
            console.print("listening for patient.data.updated", highlight=False)

    threading.Thread(target=say_ready, daemon=True).start()
    listener.run()


alerts_app = typer.Typer(help="Alerts (Prefect automations).", no_args_is_help=True)
app.add_typer(alerts_app, name="alerts")


@alerts_app.command("install")
def alerts_install(
    notify: Annotated[
        str, typer.Option(help="Notification block to alert through, e.g. slack-webhook/ops")
    ],
) -> None:
    """Create the alert automations of flows/alerts.yaml on the Prefect server."""
    _prefect()
    from importlib.resources import files

    import yaml
    from prefect.blocks.core import Block
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    block = Block.load(notify)
    automations = yaml.safe_load(files("flows").joinpath("alerts.yaml").read_text())
    with get_client(sync_client=True) as client:
        for spec in automations["automations"]:
            for action in spec["actions"]:
                if action["type"] == "send-notification":
                    action["block_document_id"] = str(block._block_document_id)
            automation_id = client.create_automation(AutomationCore.model_validate(spec))
            console.print(f"created automation {spec['name']!r} ({automation_id})")


@app.command("backfill")
def backfill_command(
    org: Annotated[str | None, typer.Option(help="Only this organization")] = None,
    project: Annotated[str | None, typer.Option(help="Only this project")] = None,
    patient: Annotated[list[str] | None, typer.Option(help="Only these patients")] = None,
    created_from: Annotated[
        str | None, typer.Option("--from", help="Versions created at or after (ISO, UTC)")
    ] = None,
    created_to: Annotated[
        str | None, typer.Option("--to", help="Versions created before (ISO, UTC)")
    ] = None,
    data_type: Annotated[list[str] | None, typer.Option("--type", help="ccda or fhir")] = None,
    destination: Annotated[list[str] | None, typer.Option(help="Only these destinations")] = None,
    force: Annotated[bool, typer.Option(help="Also re-send what was delivered")] = False,
    dry_run: Annotated[bool, typer.Option(help="Only show the plan")] = False,
    deployment: Annotated[
        bool, typer.Option(help="Start the deployment on the Prefect server instead")
    ] = False,
) -> None:
    """Queue the newest matching documents where they are missing, then deliver them."""
    _prefect()
    parameters = {
        "organization_id": org,
        "project_id": project,
        "patient_ids": patient,
        "created_from": _parse_when(created_from),
        "created_to": _parse_when(created_to),
        "data_types": data_type,
        "destinations": destination,
        "dry_run": dry_run,
        "force": force,
    }
    if deployment:
        _start_deployment("backfill/backfill", parameters)
        return
    from flows.backfill import backfill

    with _progress_bar("backfill"):
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
    deployment: Annotated[
        bool, typer.Option(help="Start the deployment on the Prefect server instead")
    ] = False,
) -> None:
    """Send again what failed or was left pending (or, with --full, everything)."""
    _prefect()
    parameters = {"project_id": project, "destination": destination, "full": full,
                  "dry_run": dry_run}  # fmt: skip
    if deployment:
        _start_deployment("redeliver/redeliver", parameters)
        return
    from flows.backfill import redeliver

    with _progress_bar("redeliver"):
        counts = _refusals(lambda: redeliver(**parameters), refused=(ValueError,))
    _print_counts("redeliver (dry run: nothing sent)" if dry_run else "redeliver", counts)


def _print_counts(title: str, counts: dict[str, int]) -> None:
    table = Table(title=title)
    table.add_column("what")
    table.add_column("count", justify="right")
    for what, count in sorted(counts.items()):
        table.add_row(what, str(count))
    if not counts:
        table.add_row("(nothing matches)", "0")
    console.print(table)
    if counts.get("failed"):
        raise typer.Exit(1)


# --- the ledger -----------------------------------------------------------------------------------


def _parse_when(value: str | None) -> datetime | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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
        since=_parse_when(since),
        until=_parse_when(until),
        limit=None if (csv or parquet) else limit,
    )
    frame = deliveries_frame(_store(), query)
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
        table.add_row(*("" if v is None or v != v else str(v) for v in row))
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

    frame = disclosures_frame(_store(), patient, _parse_when(since))
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

    store = _store()
    _print_frame(status_counts(store), "deliveries by destination and status")
    runs = recent_runs(store)
    runs["last_activity"] = runs["last_activity"].map(_short_time)
    _print_frame(runs, "recent runs (by the ledger rows they last touched)")


@app.command("upgrade-store")
def upgrade_store() -> None:
    """Create the store or upgrade its schema in place (also done on every open)."""
    store = _store()
    console.print(f"store at {store.url} is at the latest schema")


@app.command()
def demo(
    patients: Annotated[int, typer.Option(min=1, help="Patients per project on first run")] = 20,
    update: Annotated[
        int, typer.Option(min=0, help="Change this many patients' FHIR bundles before delivering")
    ] = 0,
) -> None:
    """The main job on the embedded default: seed a store, deliver to a local folder, summarize.

    Run again, it delivers nothing new; with --update N, only the N changed documents.
    """
    _prefect()
    from patient_delivery.demo import run_demo

    run_demo(get_settings().home, patients, update, console, _print_summary)


def main() -> None:
    app()


# --- pull: the FHIR API and the MCP server ------------------------------------------------------

api_key_app = typer.Typer(help="API keys of organizations for the pull API.", no_args_is_help=True)
app.add_typer(api_key_app, name="api-key")


@api_key_app.command("create")
def api_key_create(
    org: str, label: Annotated[str, typer.Option(help="What the key is for")] = ""
) -> None:
    """Create a key for an organization; prints it once (only its hash is kept)."""
    from patient_delivery.pull.keys import ApiKeyError, create_key

    key_id, key = _refusals(lambda: create_key(_store(), org, label), (ApiKeyError,))
    errors.print(f"API key {key_id} for {org} (shown once; store it now):", highlight=False)
    console.print(key, highlight=False, soft_wrap=True)


@api_key_app.command("list")
def api_key_list() -> None:
    """Every key's id, organization, label, creation and revocation; never the key."""
    from rich.table import Table

    from patient_delivery.pull.keys import list_keys

    table = Table("id", "organization", "label", "created", "revoked")
    for key_id, org, label, created, revoked in list_keys(_store()):
        table.add_row(str(key_id), org, label, f"{created:%Y-%m-%d %H:%M}",
                      f"{revoked:%Y-%m-%d %H:%M}" if revoked else "")  # fmt: skip
    console.print(table)


@api_key_app.command("revoke")
def api_key_revoke(key_id: int) -> None:
    """Refuse a key from now on."""
    from patient_delivery.pull.keys import ApiKeyError, revoke_key

    _refusals(lambda: revoke_key(_store(), key_id), (ApiKeyError,))
    console.print(f"API key {key_id} revoked")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8080,
    public_url: Annotated[
        str | None, typer.Option(help="How clients reach it, when behind a proxy")
    ] = None,
) -> None:
    """Serve the pull API: FHIR R4 under /fhir and MCP (streamable HTTP) at /mcp."""
    import uvicorn

    from patient_delivery.pull.server import create_app

    base = public_url or f"http://{host}:{port}"
    errors.print(f"FHIR at {base}/fhir, MCP at {base}/mcp", highlight=False)
    uvicorn.run(create_app(_store(), base, host=host), host=host, port=port, log_level="warning")


@app.command()
def mcp(
    key: Annotated[
        str | None,
        typer.Option(envvar="PATIENT_DELIVERY_API_KEY", help="The organization's API key"),
    ] = None,
) -> None:
    """Serve MCP over stdio for a local agent, as the organization whose key is given."""
    from patient_delivery.pull.keys import authenticate
    from patient_delivery.pull.mcp_server import build_mcp
    from patient_delivery.pull.records import Records

    store = _store()
    caller = authenticate(store, key)
    if caller is None:
        raise _fail("a valid API key is required (--key or PATIENT_DELIVERY_API_KEY)", code=2)
    build_mcp(Records(store), caller=caller).run("stdio")
