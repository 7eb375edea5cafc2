"""The `patient.data.updated` event: ingest tells Prefect that a patient has something new;
`patient.share.withdrawn`: a patient stopped sharing with a project.

It carries IDs only (patient, data type, version, projects), never content. A deployment
trigger on it starts a delivery run at once instead of at the next scheduled one.

Events go out only when a Prefect server is configured (`PREFECT_API_URL`), or when
`PATIENT_DELIVERY_EMIT_EVENTS` says so: without a server, Prefect would start a temporary one
(many seconds) just to drop the event when the process ends.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

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
    from prefect.events import emit_event

    emit_event(
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
    from prefect.events import emit_event

    emit_event(
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
