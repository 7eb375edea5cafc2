"""The pull API: organizations' API keys, the FHIR and MCP server, MCP over stdio."""

from __future__ import annotations

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
    prefect,
    read_file,
    refusals,
    show_frame,
)

api_key_app = typer.Typer(help="API keys of organizations for the pull API.", no_args_is_help=True)
app.add_typer(api_key_app, name="api-key")


@api_key_app.command("create")
def api_key_create(
    org: str, label: Annotated[str, typer.Option(help="What the key is for")] = ""
) -> None:
    """Create a key for an organization; prints it once (only its hash is kept)."""
    from patient_delivery.pull.keys import ApiKeyError, create_key

    key_id, key = refusals(lambda: create_key(current_store(), org, label), (ApiKeyError,))
    errors.print(f"API key {key_id} for {org} (shown once; store it now):", highlight=False)
    console.print(key, highlight=False, soft_wrap=True)


@api_key_app.command("list")
def api_key_list(as_json: Json = False, csv: Csv = None, overwrite: Overwrite = False) -> None:
    """Every key's id, organization, label, creation and revocation; never the key."""
    import pandas as pd

    from patient_delivery.pull.keys import list_keys

    columns = ["key_id", "org_id", "label", "created_at", "revoked_at"]
    frame = pd.DataFrame(list_keys(current_store()), columns=columns)
    show_frame(frame, "api_keys", as_json, csv, overwrite)


@api_key_app.command("revoke")
def api_key_revoke(key_id: int) -> None:
    """Refuse a key from now on."""
    from patient_delivery.pull.keys import ApiKeyError, revoke_key

    refusals(lambda: revoke_key(current_store(), key_id), (ApiKeyError,))
    console.print(f"API key {key_id} revoked")


client_app = typer.Typer(
    help="Organizations' backend services for SMART Backend Services (signed-JWT tokens).",
    no_args_is_help=True,
)
app.add_typer(client_app, name="client")


@client_app.command("add")
def client_add(
    org: str,
    jwks: Annotated[Path, typer.Option(help="The service's public keys: a JWKS JSON file")],
    scope: Annotated[
        str, typer.Option(help="Scopes it may be granted, space-separated (read-only)")
    ] = "system/*.rs",
    label: Annotated[str, typer.Option(help="What the service is")] = "",
) -> None:
    """Register an organization's backend service by its public keys; prints its client_id."""
    from patient_delivery.pull.smart import ClientError, add_client

    keys = read_file(jwks, "--jwks") or ""
    client_id = refusals(lambda: add_client(current_store(), org, keys, scope, label),
                        (ClientError,))  # fmt: skip
    console.print(client_id, highlight=False)


@client_app.command("list")
def client_list(as_json: Json = False, csv: Csv = None, overwrite: Overwrite = False) -> None:
    """Every client: its id, organization, scopes, label, key IDs, creation and revocation."""
    import pandas as pd

    from patient_delivery.pull.smart import list_clients

    frame = pd.DataFrame(list_clients(current_store()), columns=[
        "client_id", "org_id", "scopes", "label", "key_ids", "created_at", "revoked_at",
    ])  # fmt: skip
    show_frame(frame, "clients", as_json, csv, overwrite)


@client_app.command("revoke")
def client_revoke(client_id: str) -> None:
    """Refuse the client's assertions and end every token it holds, from its next request."""
    from patient_delivery.pull.smart import ClientError, revoke_client

    refusals(lambda: revoke_client(current_store(), client_id), (ClientError,))
    console.print(f"client {client_id} revoked")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8080,
    public_url: Annotated[
        str | None, typer.Option(help="How clients reach it, when behind a proxy")
    ] = None,
) -> None:
    """Serve the pull API: FHIR R4 under /fhir, MCP (streamable HTTP) at /mcp, and SMART
    Backend Services' token endpoint at /auth/token."""
    import uvicorn

    from patient_delivery.pull.server import create_app

    prefect()  # bulk exports run as Prefect flows
    from patient_delivery.flows.export import ExportRunner

    base = public_url or f"http://{host}:{port}"
    errors.print(f"FHIR at {base}/fhir, MCP at {base}/mcp", highlight=False)
    app = create_app(current_store(), base, host=host, start_export=ExportRunner().start)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@app.command()
def mcp(
    key_file: Annotated[
        Path | None,
        typer.Option(
            help="A file holding the organization's API key (else the environment "
            "variable PATIENT_DELIVERY_API_KEY)"
        ),
    ] = None,
    key: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Serve MCP over stdio for a local agent, as the organization whose key is given (in
    PATIENT_DELIVERY_API_KEY or --key-file: never on the command line, which every local user
    can read)."""
    import os

    from patient_delivery.pull.keys import authenticate
    from patient_delivery.pull.mcp_server import build_mcp
    from patient_delivery.pull.records import Records

    if key is not None:
        raise fail("--key: a key on the command line is readable by every local user; give it "
                   "in PATIENT_DELIVERY_API_KEY or --key-file", code=2)  # fmt: skip
    given = (
        (read_file(key_file, "--key-file") or "").strip()
        if key_file
        else os.environ.get("PATIENT_DELIVERY_API_KEY")
    )
    store = current_store()
    if given is None or authenticate(store, given) is None:
        raise fail("a valid API key is required (PATIENT_DELIVERY_API_KEY or --key-file)", code=2)
    build_mcp(Records(store), key=given).run("stdio")
