"""Destination blocks: create, list, show, test, and an SFTP server's host key to pin."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from patient_delivery.cli.common import (
    app,
    console,
    errors,
    fail,
    invalid,
    prefect,
    print_json,
    printable,
    read_file,
)

destination_app = typer.Typer(help="Destination blocks (Prefect).", no_args_is_help=True)
app.add_typer(destination_app, name="destination")

EncryptTo = Annotated[
    Path | None,
    typer.Option(
        help="The organization's OpenPGP public key (armored file): every file is encrypted "
        "to it and named with .pgp"
    ),
]
SigningKey = Annotated[
    Path | None,
    typer.Option(help="Our OpenPGP secret key (armored file), to sign what is encrypted"),
]
SigningPassphraseEnv = Annotated[
    str | None,
    typer.Option(help="Environment variable holding the signing key's passphrase"),
]


def _encryption(
    encrypt_to: Path | None, signing_key: Path | None, passphrase_env: str | None
) -> dict[str, object]:
    """The OpenPGP fields of a destination block, read from the files given."""
    return {
        "encryption_key": read_file(encrypt_to, "--encrypt-to"),
        "signing_key": read_file(signing_key, "--signing-key"),
        "signing_key_passphrase": _read_secret(False, passphrase_env, "signing passphrase"),
    }


@destination_app.command("local")
def destination_local(
    name: str,
    root: Annotated[Path, typer.Option(help="Folder that receives the deliveries")],
    template: Annotated[str | None, typer.Option(help="Path template")] = None,
    max_connections: Annotated[int, typer.Option(min=1, max=64)] = 4,
    encrypt_to: EncryptTo = None,
    signing_key: SigningKey = None,
    signing_passphrase_env: SigningPassphraseEnv = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a block of that name")] = False,
) -> None:
    """Create (or replace) a local-folder destination block; prints its reference."""
    prefect()
    from pydantic import ValidationError

    from patient_delivery.blocks.local import LocalDestination

    try:
        fields = {
            "root": root.resolve(),
            "max_connections": max_connections,
            **_encryption(encrypt_to, signing_key, signing_passphrase_env),
        }
        if template is not None:
            fields["path_template"] = template
        block = LocalDestination(**fields)
    except ValidationError as exc:
        raise invalid(exc) from None
    block.save(name, overwrite=overwrite)
    console.print(f"local-destination/{name}")


def _save_block(block_type: type, name: str, overwrite: bool, fields: dict[str, object]) -> None:
    """Build a destination block (its settings are checked here) and save it in Prefect."""
    from pydantic import ValidationError

    try:
        block = block_type(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise invalid(exc) from None
    try:
        block.save(name, overwrite=overwrite)
    except ValueError as exc:
        raise fail(f"{exc} (use --overwrite to replace it)", code=2) from None
    console.print(f"{block_type.get_block_type_slug()}/{name}  {block.describe()}", highlight=False)


def _read_secret(from_stdin: bool, env: str | None, what: str) -> str | None:
    import os

    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if env:
        value = os.environ.get(env)
        if value is None:
            raise fail(f"{what}: environment variable {env} is not set", code=2)
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
    encrypt_to: EncryptTo = None,
    signing_key: SigningKey = None,
    signing_passphrase_env: SigningPassphraseEnv = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a block of that name")] = False,
) -> None:
    """Create an SFTP destination block; the password never appears on the command line."""
    prefect()
    from patient_delivery.blocks.sftp import SftpDestination

    fields: dict[str, object] = {
        "host": host,
        "port": port,
        "username": username,
        "host_keys": host_key,
        "root": root,
        "password": _read_secret(password_stdin, password_env, "password"),
        "private_key": read_file(private_key_file, "--private-key-file"),
        "private_key_passphrase": _read_secret(False, passphrase_env, "passphrase"),
        "path_template": template,
        "max_connections": max_connections,
        "files_in_flight": files_in_flight,
        **_encryption(encrypt_to, signing_key, signing_passphrase_env),
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
    encrypt_to: EncryptTo = None,
    signing_key: SigningKey = None,
    signing_passphrase_env: SigningPassphraseEnv = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a block of that name")] = False,
) -> None:
    """Create an S3 destination block (an IAM role of the organization's, assumed by us)."""
    prefect()
    from prefect_aws import AwsCredentials

    from patient_delivery.blocks.s3 import S3Destination

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
        **_encryption(encrypt_to, signing_key, signing_passphrase_env),
    }
    _save_block(S3Destination, name, overwrite, fields)


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
