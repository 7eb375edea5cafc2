"""The SMART Backend Services endpoints: discovery and the token endpoint.

    GET  /fhir/.well-known/smart-configuration   what a client needs to ask for a token
    POST /auth/token                              client_credentials with a private_key_jwt

Errors are OAuth 2.0's (RFC 6749, 5.2): `{"error": ..., "error_description": ...}` with 400,
or 401 for a client that could not be authenticated.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from patient_delivery.pull import smart
from patient_delivery.pull.resource_types import SERVED_TYPES
from patient_delivery.store import Store

FORM = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 64 * 1024
"""A token request is a few fields and one JWT: anything larger is refused unread."""


def token_url(base_url: str) -> str:
    """The token endpoint's URL: the `aud` a client assertion must carry."""
    return base_url.rstrip("/") + "/auth/token"


def smart_configuration(base_url: str) -> dict[str, Any]:
    return {
        "token_endpoint": token_url(base_url),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(smart.ALGORITHMS),
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": [
            "system/*.rs",
            "system/*.read",
            *(f"system/{kind}.rs" for kind in sorted(SERVED_TYPES)),
        ],
        "capabilities": ["client-confidential-asymmetric"],
    }


def create_auth_router(store: Store, base_url: str) -> APIRouter:
    router = APIRouter()
    endpoint = token_url(base_url)

    @router.get("/fhir/.well-known/smart-configuration")
    def configuration() -> JSONResponse:
        return JSONResponse(smart_configuration(base_url))

    @router.post("/auth/token")
    async def token(request: Request) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != FORM:
            return _refused(
                "invalid_request", "send the fields as application/x-www-form-urlencoded"
            )
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return _refused("invalid_request", "the request is too large")
        try:
            fields = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            return _refused("invalid_request", "the body is not a form")
        form: dict[str, str] = {}
        for name, value in fields:
            if name in form:
                return _refused("invalid_request", f"{name} is given more than once")
            form[name] = value
        try:
            grant = await anyio.to_thread.run_sync(smart.issue_token, store, endpoint, form)
        except smart.TokenRefused as refused:
            return _refused(refused.error, refused.description)
        return JSONResponse({
            "access_token": grant.token, "token_type": "bearer",
            "expires_in": grant.expires_in, "scope": grant.scopes,
        })  # fmt: skip

    return router


def _refused(error: str, description: str) -> JSONResponse:
    status = 401 if error == "invalid_client" else 400
    return JSONResponse({"error": error, "error_description": description}, status_code=status)
