"""A cap on open MCP sessions per organization, in front of the SDK's streamable HTTP app.

The SDK bounds sessions for the whole server (`max_sessions`) and closes those idle for
`session_idle_timeout`; one organization opening sessions in a loop would fill that table and
lock the others out. `SessionCap` counts each organization's sessions as the SDK opens them
(the `mcp-session-id` of an answered `initialize`), and refuses a new session past the cap with
429 and a JSON-RPC error that says so. An `initialize` takes its place before it is forwarded,
under the same lock as the count, so concurrent ones cannot overshoot the cap. A session leaves
the count only when it really ends, as its owner sees it: a DELETE the SDK accepted or a 404
to a request with the owner's key, or the same idle time as the SDK. A request with no key,
another organization's key or a revoked one changes nothing in the count.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
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
        self._opening: Counter[str] = Counter()
        """Organization -> `initialize` requests forwarded and not yet answered."""
        self._lock = threading.Lock()

    def _count(self, organization: str, now: float) -> int:
        """The organization's open sessions and those being opened (the idle ones forgotten);
        under `_lock`."""
        idle = [sid for sid, (_, used) in self._open.items() if now - used > self.idle_seconds]
        for sid in idle:
            del self._open[sid]
        held = sum(1 for org, _ in self._open.values() if org == organization)
        return held + self._opening[organization]

    def _reserve(self, organization: str) -> bool:
        """Take a place for a new session, if the organization has one left."""
        with self._lock:
            if self._count(organization, time.monotonic()) >= self.per_organization:
                return False
            self._opening[organization] += 1
            return True

    async def _organization(self, headers: dict[bytes, bytes]) -> str | None:
        """The organization whose valid key the request carries, or None."""
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return None
        caller = await anyio.to_thread.run_sync(authenticate, self.store, key.strip())
        return caller.organization_id if caller is not None else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/mcp"):
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope["headers"]}
        session = headers.get(b"mcp-session-id", b"").decode("latin-1")
        if session:
            await self._existing(session, headers, scope, receive, send)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        organization = await self._organization(headers)
        if organization is None:  # the SDK's own bearer check answers
            await self.app(scope, receive, send)
            return
        if not self._reserve(organization):
            await _refuse(send, self.per_organization)
            return

        async def opened(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] < 300:
                for name, value in message.get("headers", []):
                    if name.lower() == b"mcp-session-id":
                        with self._lock:
                            self._open[value.decode("latin-1")] = (organization, time.monotonic())
            await send(message)

        try:
            await self.app(scope, receive, opened)
        finally:
            with self._lock:
                self._opening[organization] -= 1

    async def _existing(
        self, session: str, headers: dict[bytes, bytes], scope: dict[str, Any], receive: Any,
        send: Any,
    ) -> None:  # fmt: skip
        with self._lock:
            known = self._open.get(session)
        owner = known[0] if known else None
        if owner is None or await self._organization(headers) != owner:
            await self.app(scope, receive, send)  # the SDK answers; the count is not touched
            return
        with self._lock:
            if session in self._open:
                self._open[session] = (owner, time.monotonic())
        ending = scope["method"] == "DELETE"

        async def watched(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 404 or (ending and status < 300):  # the SDK has closed it
                    with self._lock:
                        self._open.pop(session, None)
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
