"""The temporary Prefect API's own process (`python -m patient_delivery.local_api_server`).

It serves Prefect's API app (no UI, no background services) with uvicorn on a listening socket
that the command bound and handed over as an inherited file descriptor: the port is never free
between being chosen and being served, so no other local user can take it and pose as the API.
Nothing about the server is on its command line; the descriptor's number comes in the
environment (`SOCKET_FD`), which other users cannot read.

`missing()` names what of Prefect's server an upgrade took away; a test calls it.
"""

from __future__ import annotations

import os
import socket
import sys

sys.dont_write_bytecode = False  # as the command's: Prefect's server is not compiled every time

SOCKET_FD = "PATIENT_DELIVERY_API_SOCKET_FD"
"""Environment variable: the inherited listening socket's file descriptor."""

REQUIRED = ("prefect.server.api.server.create_app",)
"""Prefect's server internals this module relies on, as `missing()` reports them."""


def serve() -> None:
    """Serve Prefect's API on the inherited socket until terminated."""
    listener = socket.socket(fileno=int(os.environ.pop(SOCKET_FD)))
    os.environ["PREFECT_SERVER_UI_ENABLED"] = "false"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    import uvicorn
    from prefect.server.api.server import create_app

    host, port = listener.getsockname()[:2]
    print(f"PREFECT_API_URL=http://{host}:{port}/api", flush=True)
    app = create_app(final=True, webserver_only=True)
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=5)
    uvicorn.Server(config).run(sockets=[listener])


def missing() -> list[str]:
    """The names of `REQUIRED` this Prefect no longer has (empty when all are there)."""
    try:
        from prefect.server.api.server import create_app
    except ImportError:
        return list(REQUIRED)
    return [] if callable(create_app) else list(REQUIRED)


if __name__ == "__main__":
    if SOCKET_FD not in os.environ:
        sys.exit("patient_delivery.local_api_server is started by the patient-delivery command")
    serve()
