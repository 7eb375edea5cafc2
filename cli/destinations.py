"""Destination blocks: create (`block_options`: one command per block type), list, show, test,
an SFTP server's host key to pin, and resume a destination whose deliveries wait."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from patient_delivery.cli.block_options import DestinationGroup
from patient_delivery.cli.common import (
    app,
    console,
    current_store,
    errors,
    fail,
    prefect,
    print_json,
    printable,
)

destination_app = typer.Typer(
    cls=DestinationGroup, help="Destination blocks (Prefect).", no_args_is_help=True
)
app.add_typer(destination_app, name="destination")


@destination_app.command("list")
def destination_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout")] = False,
) -> None:
    """Every destination block and where it writes (no secrets); a block that cannot be used
    (saved invalid, e.g. from the Prefect UI) shows as INVALID with the reason."""
    prefect()
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    from patient_delivery.blocks import DESTINATION_TYPES, load_destinations, problem

    references = []
    with get_client(sync_client=True) as client:
        for slug in DESTINATION_TYPES:
            try:
                documents = client.read_block_documents_by_type(slug, include_secrets=False)
            except PrefectHTTPStatusError as exc:
                if exc.response.status_code == 404:  # type never registered: none of that kind
                    continue
                raise
            references += [f"{slug}/{d.name}" for d in documents if d.name and not d.is_anonymous]
    loaded = load_destinations(references)
    rows = []
    for reference in references:
        found = loaded[reference]
        if isinstance(found, Exception):
            rows.append(
                {"reference": reference, "writes_to": None, "problem": problem(reference, found)}
            )
        else:
            rows.append({"reference": reference, "writes_to": found.describe(), "problem": None})
    if as_json:
        print_json({"destinations": rows})
        return
    table = Table(title="destinations")
    table.add_column("reference", overflow="fold")
    table.add_column("writes to", overflow="fold")
    for row in rows:
        where = row["writes_to"] or f"INVALID: {row['problem']}"
        table.add_row(printable(row["reference"]), printable(where))
    console.print(table)


def _checked(reference: str):  # type: ignore[no-untyped-def]
    """The destination block, or a one-line refusal (exit 2) saying what is wrong."""
    from patient_delivery.blocks import BlockProblem, check_destination

    try:
        return check_destination(reference)
    except BlockProblem as exc:
        raise fail(str(exc), code=2) from None


@destination_app.command("show")
def destination_show(reference: Annotated[str, typer.Argument(help="e.g. sftp-destination/x")]):
    """A destination's settings; secrets show as ********, OpenPGP keys as their fingerprint."""
    prefect()
    from pydantic import BaseModel, SecretStr

    from patient_delivery.blocks import openpgp

    block = _checked(reference)
    table = Table(title=f"{reference}: {block.describe()}")
    table.add_column("setting")
    table.add_column("value", overflow="fold")
    keys = {"encryption_key", "signing_key"}
    for field_name in type(block).model_fields:
        value = getattr(block, field_name)
        if field_name in keys and value:
            secret = isinstance(value, SecretStr)
            armored = value.get_secret_value() if secret else value
            shown = ("******** " if secret else "") + str(openpgp.info(armored))
        elif isinstance(value, SecretStr):
            shown = "********"
        elif isinstance(value, BaseModel):
            shown = type(value).__name__
        else:
            shown = str(value)
        table.add_row(field_name, printable(shown))
    console.print(table)


@destination_app.command("host-key")
def destination_host_key(
    address: Annotated[str, typer.Argument(help="HOST or HOST:PORT of an SFTP server")],
) -> None:
    """Show an SFTP server's host key, to check with the organization and then pin."""
    from patient_delivery.blocks.sftp import fetch_host_key, fingerprint, known_hosts_line

    host, _, port_text = address.rpartition(":") if ":" in address else (address, "", "22")
    port = int(port_text)
    try:
        key = fetch_host_key(host, port)
    except OSError as exc:
        raise fail(f"cannot reach {host}:{port}: {exc.strerror or exc}") from None
    console.print(f"{key.get_name()} {fingerprint(key)}", highlight=False)
    console.print(known_hosts_line(host, port, key), highlight=False, soft_wrap=True)
    errors.print(
        "Check this fingerprint with the organization (over another channel) before pinning it "
        "with --host-key."
    )


@destination_app.command("test")
def destination_test(reference: Annotated[str, typer.Argument(help="e.g. local-destination/x")]):
    """Connect, write a probe file and remove it, reporting each step."""
    prefect()
    report = _checked(reference).test_connection()
    console.print(f"testing {report.destination}")
    for check in report.checks:
        mark = "[green]ok[/green]" if check.ok else "[red]FAILED[/red]"
        console.print(f"  {mark} {check.step} {check.detail}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)


@destination_app.command("resume")
def destination_resume(reference: Annotated[str, typer.Argument(help="e.g. sftp-destination/x")]):
    """Let the next run send a waiting destination's deliveries now: one whose block could not
    be used, instead of at the end of its wait, or one down, instead of after its next probe
    (a run resumes by itself a block usable again, or a destination a probe reaches)."""
    from patient_delivery import destination_health

    waited = destination_health.resume(current_store(), [reference])
    if waited:
        console.print(f"{reference}: resumed; the next run sends what waited", highlight=False)
    else:
        console.print(f"{reference}: nothing waits for it", highlight=False)
