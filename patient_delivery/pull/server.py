"""One ASGI app for the pull API: FHIR under /fhir, MCP (streamable HTTP) at /mcp."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from patient_delivery.pull.fhir_api import create_fhir_router, install_error_handlers
from patient_delivery.pull.mcp_server import build_mcp
from patient_delivery.pull.records import Records
from patient_delivery.store import Store


def create_app(store: Store, base_url: str, host: str = "127.0.0.1") -> FastAPI:
    """The app, for `base_url` (how clients reach it, e.g. http://127.0.0.1:8080)."""
    records = Records(store)
    # Plain JSON responses, not SSE: a patient's bundle can pass 1 MB, the SSE event limit of
    # the SDK's own client.
    mcp_app = build_mcp(records, base_url=base_url.rstrip("/")).streamable_http_app(
        streamable_http_path="/mcp", host=host, json_response=True
    )

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
    app.include_router(create_fhir_router(records))
    install_error_handlers(app)
    app.mount("/", mcp_app)  # after the FHIR routes: it answers /mcp and its auth metadata
    return app
