"""One ASGI app for the pull API: FHIR under /fhir, MCP (streamable HTTP) at /mcp, SMART
Backend Services' token endpoint at /auth/token."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response

from patient_delivery.pull.auth_api import create_auth_router
from patient_delivery.pull.fhir_api import create_fhir_router, install_error_handlers
from patient_delivery.pull.mcp_server import build_mcp
from patient_delivery.pull.mcp_sessions import SessionCap
from patient_delivery.pull.records import Records
from patient_delivery.settings import get_settings
from patient_delivery.store import Store

MCP_IDLE_SECONDS = 30 * 60
"""An MCP session with no request for this long is closed (the SDK's default, stated here so
the per-organization count forgets it at the same time)."""

access = logging.getLogger("patient_delivery.access")
"""Refused requests to the pull API (status, route template, key ID)."""


def create_app(
    store: Store, base_url: str, host: str = "127.0.0.1", mcp_sessions: int | None = None
) -> FastAPI:
    """The app, for `base_url` (how clients reach it, e.g. http://127.0.0.1:8080); at most
    `mcp_sessions` open MCP sessions per organization (default: the setting)."""
    records = Records(store)
    # Plain JSON responses, not SSE: a patient's bundle can pass 1 MB, the SSE event limit of
    # the SDK's own client.
    settings = get_settings()
    mcp_app = build_mcp(records, base_url=base_url.rstrip("/")).streamable_http_app(
        streamable_http_path="/mcp", host=host, json_response=True,
        session_idle_timeout=MCP_IDLE_SECONDS,
    )  # fmt: skip
    capped = SessionCap(mcp_app, store, mcp_sessions or settings.mcp_sessions_per_organization,
                        MCP_IDLE_SECONDS)  # fmt: skip

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # A mounted app's lifespan does not run by itself; MCP's starts its session manager.
        async with mcp_app.router.lifespan_context(mcp_app):
            yield

    app = FastAPI(
        title="patient-delivery pull API",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.records = records
    app.include_router(create_auth_router(store, base_url))
    app.include_router(create_fhir_router(records, base_url))
    install_error_handlers(app)

    @app.middleware("http")
    async def private_answers(request: Request, call_next: Any) -> Response:
        """Every answer may hold patient data: no cache keeps it, no browser guesses its type.
        A refused request leaves a line in the access log: status, method, route template and
        key or client ID (never the key or token, a path value or a parameter)."""
        response: Response = await call_next(request)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        if response.status_code >= 400:
            route = getattr(request.scope.get("route"), "path", None)
            template = route or ("/mcp" if request.url.path.startswith("/mcp") else "(no route)")
            accessor = getattr(request.state, "accessor", None) or "-"
            access.warning("refused %d %s %s key=%s", response.status_code, request.method,
                           template, accessor)  # fmt: skip
        return response

    app.mount("/", capped)  # after the FHIR routes: it answers /mcp and its auth metadata
    return app
