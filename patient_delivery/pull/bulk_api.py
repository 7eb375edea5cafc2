"""FHIR Bulk Data export routes (Bulk Data Access IG v2), asynchronous:

    GET    /fhir/Patient/$export                 every patient sharing with the organization
    GET    /fhir/Group/{projectId}/$export       a project's patients (a project is a Group)
    POST   the same two, with the parameters in a FHIR `Parameters` body
    GET    /fhir/$export-status/{id}             202 with X-Progress while it runs; then the
                                                 completion manifest; 404 once expired
    DELETE /fhir/$export-status/{id}             cancel it (its files are deleted)
    GET    /fhir/$export-file/{id}/{file}        one NDJSON file, with the same token

A kick-off needs `Prefer: respond-async`, and takes `_type`, `_since` and `_outputFormat`
(NDJSON), in the query (GET) or as a `Parameters` resource (POST: `_type` and `_outputFormat`
as `valueString`, `_type` repeated or with commas; `_since` as `valueInstant`). The export
itself is written by `start` (the CLI's `serve` runs it as a Prefect flow), off the request.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse

from patient_delivery.pull import bulk_export as exports
from patient_delivery.pull.fhir_api import (
    FHIR_NAME,
    FhirError,
    FhirResponse,
    Since,
    Who,
    applied,
    outcome,
    refuse_unsupported,
)
from patient_delivery.store import Store

NDJSON = "application/fhir+ndjson"
RETRY_SECONDS = 2
KICK_OFF = frozenset({"_type", "_since", "_outputFormat"})
Types = Annotated[list[str] | None, Query(alias="_type")]
"""`_type`, given once with commas or repeated: the Bulk Data IG treats repeated values as one
comma-separated list."""
Format = Annotated[str | None, Query(alias="_outputFormat")]


def create_bulk_router(store: Store, base_url: str, start: Callable[[str], None]) -> APIRouter:
    """The routes; `start(export_id)` begins writing an accepted export and returns at once."""
    router = APIRouter(prefix="/fhir")
    public = base_url.rstrip("/") + "/fhir"

    async def kick_off(request: Request, who: Who, project_id: str | None,
                       repeated: list[str] | None, since: datetime | None,
                       output_format: str | None) -> Response:  # fmt: skip
        applied(request, KICK_OFF)
        types = ",".join(repeated) if repeated else None
        if "respond-async" not in request.headers.get("prefer", "").replace(" ", "").lower():
            raise FhirError(400, "required", "a bulk export needs the header Prefer: respond-async")
        if since is not None:
            since = _utc(since)
        asked = public + request.url.path.removeprefix("/fhir")
        if request.url.query:
            asked += "?" + request.url.query
        try:
            export_id = await anyio.to_thread.run_sync(
                lambda: exports.request_export(
                    store, who, project_id, types, since, output_format, asked
                )
            )
        except exports.ExportRefused as refused:
            raise _refusal(refused) from None
        start(export_id)
        return Response(status_code=202, headers={
            "Content-Location": f"{public}/$export-status/{export_id}",
        })  # fmt: skip

    @router.get("/Patient/$export")
    async def export_patients(
        request: Request, who: Who, types: Types = None, since: Since = None,
        output_format: Format = None,
    ) -> Response:  # fmt: skip
        return await kick_off(request, who, None, types, since, output_format)

    @router.get("/Group/{group_id}/$export")
    async def export_group(
        request: Request, group_id: str, who: Who, types: Types = None, since: Since = None,
        output_format: Format = None,
    ) -> Response:  # fmt: skip
        return await kick_off(request, who, group_id, types, since, output_format)

    @router.post("/Patient/$export")
    async def export_patients_posted(request: Request, who: Who) -> Response:
        return await kick_off(request, who, None, *await posted(request))

    @router.post("/Group/{group_id}/$export")
    async def export_group_posted(request: Request, group_id: str, who: Who) -> Response:
        return await kick_off(request, who, group_id, *await posted(request))

    @router.get("/$export-status/{export_id}")
    def export_status(export_id: str, who: Who) -> Response:
        row = exports.find(store, who, export_id)
        if row is None:
            raise FhirError(404, "not-found", "no such export (it may have expired)")
        if row.status in (exports.ACCEPTED, exports.RUNNING):
            progress = f"{row.patients_done} of {row.patients_total or '?'} patients"
            return Response(status_code=202, headers={
                "X-Progress": progress, "Retry-After": str(RETRY_SECONDS),
            })  # fmt: skip
        if row.status == exports.FAILED:
            return outcome(500, "exception", f"the export failed: {row.error or 'unknown'}")
        assert row.expires_at is not None

        def file_url(name: str) -> str:
            return f"{public}/$export-file/{export_id}/{name}"

        # The manifest is plain JSON, not a FHIR resource: the IG names application/json.
        return FhirResponse(exports.manifest(store, row, who, file_url), headers={
            "Expires": format_datetime(row.expires_at.astimezone(UTC), usegmt=True),
        }, media_type="application/json")  # fmt: skip

    @router.delete("/$export-status/{export_id}")
    def export_cancel(export_id: str, who: Who) -> Response:
        if not exports.cancel(store, who, export_id):
            raise FhirError(404, "not-found", "no such export (it may have expired)")
        return Response(status_code=202)

    @router.get("/$export-file/{export_id}/{name}")
    def export_file(export_id: str, name: str, who: Who) -> Response:
        try:
            served = exports.served_file(store, who, export_id, name)
        except exports.ExportRefused as refused:
            raise _refusal(refused) from None
        if served is None or not served.path.exists():
            raise FhirError(404, "not-found", "no such file (the export may have expired)")
        if served.withdrawn:
            return StreamingResponse(served.lines(), media_type=NDJSON)
        return FileResponse(served.path, media_type=NDJSON)

    return router


async def posted(request: Request) -> tuple[list[str] | None, datetime | None, str | None]:
    """A POST kick-off's `Parameters` body: its `_type` values, `_since` and `_outputFormat`.
    A parameter it does not know is refused (400, named when it is a FHIR-like name) unless the
    client sent `Prefer: handling=lenient`, as in the query of a GET."""
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        body = None
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise FhirError(400, "invalid", "a POST kick-off takes a FHIR Parameters resource")
    types: list[str] = []
    since: datetime | None = None
    output_format: str | None = None
    unknown: set[str] = set()
    for parameter in body.get("parameter") or []:
        name = parameter.get("name") if isinstance(parameter, dict) else None
        text = parameter.get("valueString") if isinstance(parameter, dict) else None
        if name == "_type" and isinstance(text, str):
            types.append(text)
        elif name == "_outputFormat" and isinstance(text, str):
            output_format = text
        elif name == "_since" and isinstance(parameter.get("valueInstant"), str):
            try:
                since = datetime.fromisoformat(parameter["valueInstant"])
            except ValueError:
                raise FhirError(400, "invalid", "invalid parameter(s): _since") from None
        else:
            unknown.add(name if isinstance(name, str) and FHIR_NAME.fullmatch(name)
                        else "(not a FHIR name)")  # fmt: skip
    refuse_unsupported(request, sorted(unknown), "parameter(s)")
    return types or None, since, output_format


def _utc(since: datetime) -> datetime:
    """`_since` in UTC (as given when it names no zone); a 400 when UTC cannot hold it (the
    first or last hours of the calendar in a zone far from UTC)."""
    if since.tzinfo is None:
        return since.replace(tzinfo=UTC)
    try:
        return since.astimezone(UTC)
    except OverflowError:
        raise FhirError(400, "invalid", "_since is outside the dates this server holds") from None


def _refusal(refused: exports.ExportRefused) -> FhirError:
    """The OperationOutcome answer to a refused export request (429s say when to ask again)."""
    headers = {"Retry-After": str(refused.retry_after)} if refused.retry_after else None
    return FhirError(refused.status, refused.code, refused.text, headers=headers)
