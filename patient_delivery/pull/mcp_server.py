"""An MCP server (the official `mcp` SDK) over the same records, for AI agents.

Tools: `list_patients`, `get_document`, `search_resources`. Over streamable HTTP the caller is
the organization whose API key is the bearer token (checked by the SDK's bearer middleware with
our `KeyVerifier` on every request); over stdio, a local agent runs the server with one
organization's key, checked again on every tool call, so a revoked key stops at its next call.
Every read of a patient's data is a disclosure, as through the FHIR API.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import anyio
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from patient_delivery.pull.keys import Caller, authenticate
from patient_delivery.pull.records import MAX_OFFSET, RESOURCE_TYPES, Records

CHANNEL = "mcp"
SCOPE = "patient-read"


class KeyVerifier:
    """The SDK's token verifier protocol, answered from the API key table."""

    def __init__(self, records: Records) -> None:
        self.records = records

    async def verify_token(self, token: str) -> AccessToken | None:
        caller = await anyio.to_thread.run_sync(authenticate, self.records.store, token)
        if caller is None:
            return None
        return AccessToken(
            token=token,
            client_id=caller.organization_id,
            scopes=[SCOPE],
            claims={
                "key_id": caller.key_id,
                "client_id": caller.client_id,
                "scopes": sorted(caller.scopes) if caller.scopes is not None else None,
            },
        )


def build_mcp(records: Records, key: str | None = None, base_url: str = "") -> MCPServer:
    """The MCP server. With `key` (stdio) every call is the organization's whose key it is,
    while the key is valid; without, each HTTP request's bearer token decides, and `base_url`
    is where the server is reached."""
    options: dict[str, Any] = {}
    if key is None:
        options["token_verifier"] = KeyVerifier(records)
        options["auth"] = AuthSettings(
            issuer_url=base_url or "http://127.0.0.1",
            resource_server_url=f"{base_url or 'http://127.0.0.1'}/mcp",
            required_scopes=[SCOPE],
            validate_token_resource=False,
        )
    server = MCPServer(
        name="patient-delivery",
        instructions=(
            "Read the records of patients shared with your organization: list them, fetch a "
            "patient's newest C-CDA or FHIR document, or search a patient's FHIR resources."
        ),
        **options,
    )

    def who() -> Caller:
        if key is not None:
            caller = authenticate(records.store, key)
            if caller is None:
                raise ToolError("the API key is not valid (revoked or unknown)")
            return caller
        token = get_access_token()
        if token is None:
            raise ToolError("not authenticated")
        claims = token.claims or {}
        scopes = claims.get("scopes")
        return Caller(token.client_id, key_id=claims.get("key_id"), client_id=claims.get(
            "client_id"), scopes=frozenset(scopes) if scopes is not None else None)  # fmt: skip

    def reading(resource_type: str) -> Caller:
        """The caller, if its token's scopes cover `resource_type` (`*`: every type)."""
        caller = who()
        if not caller.may_read(resource_type):
            raise ToolError(f"the token's scopes do not cover {resource_type}")
        return caller

    @server.tool()
    def list_patients(
        external_id: str | None = None, limit: int = 100, offset: int = 0
    ) -> dict[str, Any]:
        """The organization's patients (healthexPatientId, project, externalId), a page at a
        time; give `external_id` to find the patient a project knows by that ID."""
        _check_offset(offset)
        limit = min(max(limit, 1), 1000)
        page, total = records.patients(reading("Patient"), external_id, limit=limit,
                                       offset=offset)  # fmt: skip
        return {
            "total": total,
            "patients": [
                {"healthexPatientId": p.patient_id, "projectId": p.project_id,
                 "externalId": p.external_id}
                for p in page
            ],
        }  # fmt: skip

    @server.tool()
    def get_document(patient_id: str, data_type: str) -> str:
        """A patient's newest document: `ccda` (C-CDA XML, as stored) or `fhir` (a FHIR R4
        Bundle in JSON, its patient's IDs the healthexPatientId, as the FHIR API shows them).
        `patient_id` is the healthexPatientId."""
        if data_type not in ("ccda", "fhir"):
            raise ToolError("data_type must be ccda or fhir")
        caller_now = reading("*")  # a whole document holds every type
        if data_type == "fhir":
            found = records.fhir_document(caller_now, patient_id)
        else:
            found = records.document(caller_now, patient_id, data_type)
        if found is None:
            raise ToolError(f"no {data_type} document for that patient")
        content, version, patient = found
        records.disclose(caller_now, patient, version, f"get_document {data_type}", CHANNEL)
        return content.decode("utf-8")

    @server.tool()
    def search_resources(
        patient_id: str, resource_type: str, since: str | None = None, limit: int = 100,
        offset: int = 0,
    ) -> dict[str, Any]:  # fmt: skip
        """A patient's FHIR resources of one type (Condition, Observation, ...), those changed
        at or after `since` (ISO 8601) when given, a page at a time."""
        _check_offset(offset)
        if resource_type not in RESOURCE_TYPES:
            raise ToolError("resource_type must be a FHIR resource type this server serves "
                            "(see the FHIR API's CapabilityStatement)")  # fmt: skip
        caller_now = reading(resource_type)
        record = records.fhir(caller_now, patient_id)
        if record is None:
            raise ToolError("no FHIR record for that patient")
        moment = None
        if since:
            try:
                moment = datetime.fromisoformat(since.replace("Z", "+00:00"))
            except ValueError:
                raise ToolError("since must be an ISO 8601 date or time") from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
        found = record.of_type(resource_type, moment)
        records.disclose(caller_now, record.patient, record.version,
                         f"search_resources {resource_type}", CHANNEL)  # fmt: skip
        page = found[offset : offset + min(max(limit, 1), 1000)]
        return {"total": len(found), "resources": json.loads(json.dumps(page))}

    return server


def _check_offset(offset: int) -> None:
    if not 0 <= offset <= MAX_OFFSET:
        raise ToolError(f"offset must be between 0 and {MAX_OFFSET}")
