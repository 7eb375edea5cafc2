"""The `patient.data.updated` event: ingest tells Prefect that a patient has something new;
`patient.share.withdrawn`: a patient stopped sharing with a project.

It carries IDs only (patient, data type, version, projects), never content. A deployment
trigger on it starts a delivery run at once instead of at the next scheduled one.

Events go out only when a Prefect server is configured (`PREFECT_API_URL`), or when
`PATIENT_DELIVERY_EMIT_EVENTS` says so: without a server, Prefect would start a temporary one
(many seconds) just to drop the event when the process ends.

Inside `sent_together()` (every CLI command; a script can use it too) events are held and sent
over one connection as the block ends, so they have all reached Prefect when the command exits.
Elsewhere (a flow run) they go through Prefect's background sender, which the run drains.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from patient_delivery.settings import get_settings

EVENT = "patient.data.updated"
SHARE_WITHDRAWN = "patient.share.withdrawn"
RESOURCE_PREFIX = "patient-delivery.patient."


def events_enabled() -> bool:
    setting = get_settings().emit_events
    if setting is not None:
        return setting
    return bool(os.environ.get("PREFECT_API_URL"))


def emit_data_updated(
    patient_id: str, data_type: str, version: int, project_ids: Sequence[str]
) -> None:
    """Announce a new document version (IDs only); a no-op when events are off."""
    if not events_enabled():
        return
    _emit(
        event=EVENT,
        resource={
            "prefect.resource.id": f"{RESOURCE_PREFIX}{patient_id}",
            "patient-delivery.data-type": data_type,
            "patient-delivery.version": str(version),
        },
        related=[
            {
                "prefect.resource.id": f"patient-delivery.project.{project_id}",
                "prefect.resource.role": "project",
                "prefect.resource.name": project_id,
            }
            for project_id in project_ids
        ],
    )


def emit_share_withdrawn(patient_id: str, project_id: str, organization_id: str) -> None:
    """Announce that a patient stopped sharing with a project (IDs only, never the reason): an
    automation can tell the organization. A no-op when events are off."""
    if not events_enabled():
        return
    _emit(
        event=SHARE_WITHDRAWN,
        resource={"prefect.resource.id": f"{RESOURCE_PREFIX}{patient_id}"},
        related=[
            {
                "prefect.resource.id": f"patient-delivery.project.{project_id}",
                "prefect.resource.role": "project",
                "prefect.resource.name": project_id,
            },
            {
                "prefect.resource.id": f"patient-delivery.organization.{organization_id}",
                "prefect.resource.role": "organization",
                "prefect.resource.name": organization_id,
            },
        ],
    )


SEND_SECONDS = 30.0
"""How long a command waits, at its end, for Prefect to take its held events."""

_held: ContextVar[list[Any] | None] = ContextVar("patient_delivery_held_events", default=None)
_log = logging.getLogger(__name__)


def _emit(event: str, resource: dict[str, str], related: list[dict[str, str]]) -> None:
    held = _held.get()
    if held is None:
        from prefect.events import emit_event

        emit_event(event=event, resource=resource, related=related)
        return
    from prefect.events import Event

    held.append(Event(event=event, resource=resource, related=related))


@contextmanager
def sent_together(on_failure: Callable[[str], None] = _log.warning) -> Iterator[None]:
    """Hold the events emitted inside the block; when it ends (normally or not), send them over
    one connection and wait until they are sent. When that fails, `on_failure` gets one line:
    what was announced is stored, and the next scheduled run delivers it."""
    held: list[Any] = []
    token = _held.set(held)
    try:
        yield
    finally:
        _held.reset(token)
        if held:
            reason = _send(held)
            if reason is not None:
                on_failure(
                    f"{len(held)} event(s) not sent to Prefect ({reason}); what they announce "
                    "is stored and the next scheduled delivery run sends it"
                )


def _send(events: list[Any]) -> str | None:
    """Send `events` in order over one connection; why not, or None when all were sent."""
    from prefect.events.clients import get_events_client

    async def send_all() -> None:
        async with get_events_client(reconnection_attempts=2) as client:
            for event in events:
                await client.emit(event)

    quiet = logging.getLogger("prefect.events.clients")  # its own warning would repeat ours
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        asyncio.run(asyncio.wait_for(send_all(), SEND_SECONDS))
    except TimeoutError:
        return f"no answer within {SEND_SECONDS:.0f} s"
    except Exception as exc:  # any failure to reach the server: the data is stored regardless
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    finally:
        quiet.setLevel(level)
    return None
