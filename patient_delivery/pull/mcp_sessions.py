"""A cap on open MCP sessions per organization, in front of the SDK's streamable HTTP app.

The SDK bounds sessions for the whole server (`max_sessions`) and closes those idle for
`session_idle_timeout`; one organization opening sessions in a loop would fill that table and
lock the others out. `SessionCap` counts each organization's sessions as the SDK opens them
(the `mcp-session-id` of an answered `initialize`), forgets them when the client ends them
(DELETE), when the SDK no longer knows them (404), or after the same idle time as the SDK, and
refuses a new session past the cap with 429 and a JSON-RPC error that says so.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import anyio

from patient_delivery.pull.keys import authenticate
from patient_delivery.store import Store

ASGIApp = Any


class SessionCap:
    """ASGI middleware: at most `per_organization` open MCP sessions per organization."""

    def __init__(
        self, app: ASGIApp, store: Store, per_organization: int, idle_seconds: float
    ) -> None:
        self.app = app
        self.store = store
        self.per_organization = per_organization
        self.idle_seconds = idle_seconds
        self._open: dict[str, tuple[str, float]] = {}
        """Session ID -> (organization, last request)."""
        self._lock = threading.Lock()

    def count(self, organization: str) -> int:
        with self._lock:
            self._forget_idle(time.monotonic())
            return sum(1 for org, _ in self._open.values() if org == organization)

    def _forget_idle(self, now: float) -> None:
        idle = [sid for sid, (_, used) in self._open.items() if now - used > self.idle_seconds]
        for sid in idle:
            del self._open[sid]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/mcp"):
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope["headers"]}
        session = headers.get(b"mcp-session-id", b"").decode("latin-1")
        if session:
            await self._existing(session, scope, receive, send)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        caller = None
        if scheme.lower() == "bearer":
            caller = await anyio.to_thread.run_sync(authenticate, self.store, key.strip())
        if caller is None:  # the SDK's own bearer check answers
            await self.app(scope, receive, send)
            return
        if self.count(caller.organization_id) >= self.per_organization:
            await _refuse(send, self.per_organization)
            return

        async def opened(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                for name, value in message.get("headers", []):
                    if name.lower() == b"mcp-session-id":
                        with self._lock:
                            self._open[value.decode("latin-1")] = (
                                caller.organization_id, time.monotonic()
                            )  # fmt: skip
            await send(message)

        await self.app(scope, receive, opened)

    async def _existing(self, session: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
        with self._lock:
            known = self._open.get(session)
            if known is not None:
                self._open[session] = (known[0], time.monotonic())
            if scope["method"] == "DELETE":
                self._open.pop(session, None)

        async def watched(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] == 404:
                with self._lock:
                    self._open.pop(session, None)  # the SDK has closed it
            await send(message)

        await self.app(scope, receive, watched)


async def _refuse(send: Any, cap: int) -> None:
    text = (
        f"your organization has {cap} open MCP sessions, the most it may have; end one "
        "(HTTP DELETE with its mcp-session-id) or let one expire, then try again"
    )
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32000, "message": text}})
    headers = [(b"content-type", b"application/json"), (b"retry-after", b"60")]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})
