"""A read-only FHIR R4 API (JSON) over the organization's patients, on FastAPI.

    GET /fhir/metadata                      CapabilityStatement (no key needed)
    GET /fhir/Patient[?identifier=EXT]      the organization's patients, paged
    GET /fhir/Patient/{id}                  one patient (id: healthexPatientId)
    GET /fhir/Patient/{id}/$everything      all of a patient's resources, paged
    GET /fhir/{type}?patient={id}           a patient's resources of one type, paged

Paging: `_count` (default 50, at most 500) and `_offset`, with `next`/`previous` links;
`_since` (an instant) returns what changed at or after it. Every answer is
`application/fhir+json`; every error an `OperationOutcome`. A key is an organization's bearer
token; a patient the organization may not see is "not found", like one that does not exist.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from patient_delivery.pull.auth_api import token_url
from patient_delivery.pull.keys import Caller, authenticate
from patient_delivery.pull.records import MAX_OFFSET, RESOURCE_TYPES, FhirRecord, Records

FHIR_JSON = "application/fhir+json"
SMART_ON_FHIR = {
    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
    "code": "SMART-on-FHIR",
}
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
CHANNEL = "fhir-api"
MAX_COUNT = 500
PAGING = frozenset({"_count", "_offset"})
FHIR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,40}")


class FhirResponse(JSONResponse):
    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)  # several times faster than json for bundles this size


class FhirError(Exception):
    """An error answered as an OperationOutcome."""

    def __init__(
        self, status: int, code: str, text: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(text)
        self.status, self.code, self.text = status, code, text
        self.headers = headers


def outcome(status: int, code: str, text: str) -> FhirResponse:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return FhirResponse(body, status_code=status, headers=headers)


BULK_DATA = "http://hl7.org/fhir/uv/bulkdata"
"""The Bulk Data Access IG's canonical base: its export operations and CapabilityStatement."""


def capability_statement(base: str) -> dict[str, Any]:
    search = [
        {"name": "patient", "type": "reference"},
        {"name": "_since", "type": "date"},
        {"name": "_count", "type": "number"},
    ]
    everything = "http://hl7.org/fhir/OperationDefinition/Patient-everything"
    token = {"url": "token", "valueUri": token_url(base.removesuffix("/fhir"))}
    resources: list[dict[str, Any]] = [
        {
            "type": "Patient",
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": [
                {"name": "identifier", "type": "token"},
                {"name": "_count", "type": "number"},
            ],
            "operation": [
                {"name": "everything", "definition": everything},
                {"name": "export", "definition": f"{BULK_DATA}/OperationDefinition/patient-export"},
            ],
        },
        {  # a project is a Group: its patients export together
            "type": "Group",
            "operation": [
                {"name": "export", "definition": f"{BULK_DATA}/OperationDefinition/group-export"}
            ],
        },
    ]
    resources += [
        {"type": name, "interaction": [{"code": "search-type"}], "searchParam": search}
        for name in RESOURCE_TYPES
    ]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-25",
        "kind": "instance",
        "software": {"name": "patient-delivery"},
        "implementation": {"description": "patient-delivery pull API", "url": base},
        "instantiates": [f"{BULK_DATA}/CapabilityStatement/bulk-data"],
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    # Where clients that read it (Python fhirclient) find the token endpoint.
                    "extension": [{"url": OAUTH_URIS, "extension": [token]}],
                    "service": [{"coding": [SMART_ON_FHIR]}],
                    "description": (
                        "Bearer token: an organization's API key, or an access token from "
                        "SMART Backend Services (see .well-known/smart-configuration)"
                    ),
                },
                "resource": resources,
            }
        ],
    }


def current_caller(request: Request) -> Caller:
    """The organization whose API key or SMART access token is the request's bearer token;
    401 otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    store = request.app.state.records.store
    found = authenticate(store, key.strip()) if scheme.lower() == "bearer" else None
    if found is None:
        # RFC 6750 3.1: a token that was sent but is expired, revoked or unknown is named so
        given = scheme.lower() == "bearer" and key.strip()
        challenge = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if given else None
        raise FhirError(
            401,
            "login",
            "a valid API key or access token is required (Authorization: Bearer)",
            challenge,
        )
    request.state.accessor = found.accessor  # for the access log
    return found


Who = Annotated[Caller, Depends(current_caller)]
Count = Annotated[int, Query(alias="_count", ge=0, le=MAX_COUNT)]
Offset = Annotated[int, Query(alias="_offset", ge=0, le=MAX_OFFSET)]
Since = Annotated[datetime | None, Query(alias="_since")]


def refuse_unsupported(request: Request, names: list[str], what: str) -> None:
    """A 400 naming `names` (already made safe to show) unless there are none, or the client
    sent `Prefer: handling=lenient`, which asks the server to ignore what it does not support."""
    lenient = "handling=lenient" in request.headers.get("prefer", "").replace(" ", "").lower()
    if names and not lenient:
        raise FhirError(400, "not-supported", f"unsupported {what}: " + ", ".join(names))


def applied(request: Request, supported: frozenset[str]) -> list[tuple[str, str]]:
    """The request's parameters the route applies. One it does not support is refused (400,
    named when it is a FHIR-like name), unless the client sent `Prefer: handling=lenient`:
    then it is ignored, and left out of the links, which show only what was applied."""
    unknown = sorted({name for name in request.query_params if name not in supported})
    names = [n if FHIR_NAME.fullmatch(n) else "(not a FHIR name)" for n in unknown]
    refuse_unsupported(request, names, "search parameter(s)")
    return [(k, v) for k, v in request.query_params.multi_items() if k in supported - PAGING]


def create_fhir_router(records: Records, base_url: str) -> APIRouter:
    """The /fhir routes; the app must carry the same `records` as `app.state.records`. Every
    absolute URL it writes starts with `base_url` (the configured public URL), never with
    what a request's Host header says."""
    router = APIRouter(prefix="/fhir")
    public = base_url.rstrip("/") + "/fhir"

    def record_or_404(who: Caller, patient_id: str) -> FhirRecord:
        record = records.fhir(who, patient_id)
        if record is None:
            raise FhirError(404, "not-found", "no such patient is shared with your organization")
        return record

    def searchset(request: Request, params: list[tuple[str, str]], resources: list[dict[str, Any]],
                  total: int, count: int, offset: int) -> FhirResponse:  # fmt: skip
        url = public + request.url.path.removeprefix("/fhir")
        return FhirResponse(_searchset(public, url, params, resources, total, count, offset))

    @router.get("/metadata")
    def metadata() -> FhirResponse:
        return FhirResponse(capability_statement(public))

    @router.get("/Patient")
    def search_patients(
        request: Request, who: Who, identifier: str | None = None,
        id_: Annotated[str | None, Query(alias="_id")] = None, count: Count = 50,
        offset: Offset = 0,
    ) -> FhirResponse:  # fmt: skip
        params = applied(request, frozenset({"identifier", "_id"}) | PAGING)
        permit(who, "Patient")
        if identifier is not None and not identifier.split("|")[-1]:
            raise FhirError(400, "required", "identifier needs a value ([system|]value)")
        if id_ is not None and not id_:
            raise FhirError(400, "required", "_id needs a value")
        external_id = identifier.split("|")[-1] if identifier else None
        if id_ is not None:
            one = records.shared(who, id_)
            matches = one is not None and external_id in (None, one.external_id)
            page, total = ([one] if matches and offset == 0 else []), int(matches)
        else:
            page, total = records.patients(who, external_id, limit=count, offset=offset)
        resources = []
        for patient in page:
            record = records.record(patient)  # listed for this caller: shared already
            if record is None:
                resources.append({"resourceType": "Patient", "id": patient.patient_id})
                continue
            resources += record.of_type("Patient")
            records.disclose(who, patient, record.version, "Patient?identifier", CHANNEL)
        return searchset(request, params, resources, total, count, offset)

    @router.get("/Patient/{patient_id}")
    def read_patient(request: Request, patient_id: str, who: Who) -> FhirResponse:
        applied(request, frozenset())
        permit(who, "Patient")
        record = record_or_404(who, patient_id)
        records.disclose(who, record.patient, record.version, "Patient/{id}", CHANNEL)
        [patient] = record.of_type("Patient") or [{"resourceType": "Patient", "id": patient_id}]
        return FhirResponse(patient)

    @router.get("/Patient/{patient_id}/$everything")
    def everything(
        request: Request, patient_id: str, who: Who, count: Count = 50, offset: Offset = 0,
        since: Since = None,
    ) -> FhirResponse:  # fmt: skip
        params = applied(request, frozenset({"_since"}) | PAGING)
        record = record_or_404(who, patient_id)
        found = [r for r in record.everything(_aware(since)) if who.may_read(r["resourceType"])]
        records.disclose(who, record.patient, record.version, "Patient/{id}/$everything", CHANNEL)
        page = found[offset : offset + count]
        return searchset(request, params, page, len(found), count, offset)

    @router.get("/{resource_type}")
    def search(
        request: Request, resource_type: str, who: Who, patient: str | None = None,
        subject: str | None = None, count: Count = 50, offset: Offset = 0, since: Since = None,
    ) -> FhirResponse:  # fmt: skip
        if resource_type not in RESOURCE_TYPES:
            raise FhirError(404, "not-supported", "that resource type is not served (see metadata)")
        params = applied(request, frozenset({"patient", "subject", "_since"}) | PAGING)
        wanted = patient or subject
        if not wanted:
            raise FhirError(400, "required", "search needs ?patient={healthexPatientId}")
        patient_id = wanted.removeprefix("Patient/")
        permit(who, resource_type)
        record = record_or_404(who, patient_id)
        found = record.of_type(resource_type, _aware(since))
        records.disclose(who, record.patient, record.version, f"{resource_type}?patient", CHANNEL)
        page = found[offset : offset + count]
        return searchset(request, params, page, len(found), count, offset)

    return router


def permit(who: Caller, resource_type: str) -> None:
    """Refuse (403) a token whose scopes do not cover reading `resource_type`."""
    if not who.may_read(resource_type):
        raise FhirError(403, "forbidden", f"the token's scopes do not cover {resource_type}")


def _aware(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def _searchset(
    base: str, url: str, params: list[tuple[str, str]], resources: list[dict[str, Any]],
    total: int, count: int, offset: int,
) -> dict[str, Any]:  # fmt: skip
    """A searchset Bundle of one page, with self/next/previous links at `url` that keep the
    applied parameters."""

    def link(relation: str, at: int) -> dict[str, str]:
        query = urlencode([*params, ("_count", str(count)), ("_offset", str(at))])
        return {"relation": relation, "url": f"{url}?{query}"}

    links = [link("self", offset)]
    if offset + count < total:
        links.append(link("next", offset + count))
    if offset > 0:
        links.append(link("previous", max(0, offset - count)))
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": [
            {
                "fullUrl": f"{base}/{r.get('resourceType')}/{r.get('id')}",
                "resource": r,
                "search": {"mode": "match"},
            }
            for r in resources
        ],
    }


def install_error_handlers(app: FastAPI) -> None:
    """Errors as OperationOutcome, with no request values echoed back."""

    @app.exception_handler(FhirError)
    async def _fhir_error(_: Request, error: FhirError) -> FhirResponse:
        answer = outcome(error.status, error.code, error.text)
        answer.headers.update(error.headers or {})
        return answer

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> FhirResponse:
        names = sorted({str(e.get("loc", ["", "?"])[-1]) for e in error.errors()})
        return outcome(400, "invalid", f"invalid parameter(s): {', '.join(names)}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> FhirResponse:
        code = "not-found" if error.status_code == 404 else "processing"
        return outcome(error.status_code, code, str(error.detail))
