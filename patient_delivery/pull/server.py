"""One ASGI app for the pull API: FHIR under /fhir, MCP (streamable HTTP) at /mcp, SMART
Backend Services' token endpoint at /auth/token."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request, Response

from patient_delivery.pull import bulk_export
from patient_delivery.pull.auth_api import create_auth_router
from patient_delivery.pull.bulk_api import create_bulk_router
from patient_delivery.pull.export_queue import ExportQueue
from patient_delivery.pull.fhir_api import create_fhir_router, install_error_handlers
from patient_delivery.pull.mcp_server import build_mcp
from patient_delivery.pull.mcp_sessions import SessionCap
from patient_delivery.pull.records import Records
from patient_delivery.settings import get_settings
from patient_delivery.store import Store

MCP_IDLE_SECONDS = 30 * 60
"""An MCP session with no request for this long is closed (the SDK's default, stated here so
the per-organization count forgets it at the same time)."""

SWEEP_SECONDS = 60.0
"""How often expired bulk exports' files are looked for and deleted."""

access = logging.getLogger("patient_delivery.access")
"""Refused requests to the pull API (status, route template, key ID)."""


def create_app(
    store: Store, base_url: str, host: str = "127.0.0.1", mcp_sessions: int | None = None,
    start_export: Callable[[str], None] | None = None,
) -> FastAPI:  # fmt: skip
    """The app, for `base_url` (how clients reach it, e.g. http://127.0.0.1:8080); at most
    `mcp_sessions` open MCP sessions per organization (default: the setting).
    `start_export(export_id)` begins writing a bulk export off the request (the CLI's `serve`
    runs a Prefect flow); by default a thread of this process writes it."""
    records = Records(store)
    # Plain JSON responses, not SSE: a patient's bundle can pass 1 MB, the SSE event limit of
    # the SDK's own client.
    settings = get_settings()
    start = start_export or _write_in_thread(store)
    mcp_app = build_mcp(records, base_url=base_url.rstrip("/")).streamable_http_app(
        streamable_http_path="/mcp", host=host, json_response=True,
        session_idle_timeout=MCP_IDLE_SECONDS,
    )  # fmt: skip
    capped = SessionCap(mcp_app, store, mcp_sessions or settings.mcp_sessions_per_organization,
                        MCP_IDLE_SECONDS)  # fmt: skip

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # A mounted app's lifespan does not run by itself; MCP's starts its session manager.
        async with mcp_app.router.lifespan_context(mcp_app), anyio.create_task_group() as tasks:
            tasks.start_soon(_sweep_exports, store, start)
            yield
            tasks.cancel_scope.cancel()

    app = FastAPI(
        title="patient-delivery pull API",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.records = records
    app.include_router(create_auth_router(store, base_url))
    app.include_router(create_bulk_router(store, base_url, start))
    app.include_router(create_fhir_router(records, base_url))
    install_error_handlers(app)

    @app.middleware("http")
    async def private_answers(request: Request, call_next: Any) -> Response:
        """Every answer may hold patient data: no cache keeps it, no browser guesses its type.
        A refused request leaves a line in the access log: status, method, route template and
        key or client ID (never the key or token, a path value or a parameter)."""
        response: Response = await call_next(request)
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"  # RFC 6749 5.1, for HTTP/1.0 caches
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


async def _sweep_exports(store: Store, start: Callable[[str], None]) -> None:
    """Now and every `SWEEP_SECONDS`: delete expired and cancelled bulk exports' files, and
    take up the exports a stopped server accepted and never began."""
    while True:
        await anyio.to_thread.run_sync(bulk_export.sweep, store)
        for export_id in await anyio.to_thread.run_sync(bulk_export.orphans, store):
            start(export_id)
        await anyio.sleep(SWEEP_SECONDS)


def _write_in_thread(store: Store) -> Callable[[str], None]:
    """Write each export in a thread of this process (without Prefect), a few at a time, the
    organizations in turn."""

    def write(export_id: str) -> None:
        bulk_export.write_export(store, export_id)

    return ExportQueue(store, write, get_settings().exports_at_once).start
