"""While `listen` delivers updates, the deployment's update trigger stands down.

Both would start a run for each update: the trigger's through a worker, which takes seconds to
start a process and then finds that the listener already sent everything. So a running
listener pauses the update triggers of `deliver-updates` and keeps a fallback automation on the
Prefect server that resumes them when the listener falls silent for `listener_silent_seconds`
(killed, its machine gone): updates then start worker runs again without anyone stepping in,
and the fallback pauses itself. The listener says it is alive every third of that time, and
pauses the triggers again each time (`prefect deploy` makes them anew, enabled). A listener that
stops resumes the triggers at once.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import TYPE_CHECKING
from uuid import UUID

from patient_delivery.events import EVENT
from patient_delivery.flows.automations import one_by_name

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.schemas.automations import Automation, AutomationCore

logger = logging.getLogger("patient_delivery.listener")

DEPLOYMENT = "deliver-updates/deliver-updates"
ALIVE = "patient-delivery.listener.alive"
LISTENER = "patient-delivery.listener"
FALLBACK = "patient delivery: resume the update trigger when the listener falls silent"


def update_triggers(client: SyncPrefectClient) -> list[Automation]:
    """The automations `prefect deploy` made from the triggers of `deliver-updates` that fire
    on `patient.data.updated`; none when that deployment does not exist."""
    from prefect.exceptions import ObjectNotFound

    try:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    except ObjectNotFound:
        return []
    related = client.read_resource_related_automations(f"prefect.deployment.{deployment.id}")
    return [a for a in related if EVENT in getattr(a.trigger, "expect", set())]


def _fallback(silent: timedelta, triggers: list[UUID], itself: UUID | None) -> AutomationCore:
    """The fallback automation. Built from plain values with each action's `type` spelled
    out: Prefect's client sends an update without the fields left at their defaults, and an
    action without its type reads back as a pause."""
    from prefect.events.schemas.automations import AutomationCore

    actions = [
        {"type": "resume-automation", "source": "selected", "automation_id": str(trigger)}
        for trigger in triggers
    ]
    if itself is not None:  # fire once, not every window, until a listener takes over again
        actions.append({"type": "pause-automation", "source": "selected",
                        "automation_id": str(itself)})  # fmt: skip
    return AutomationCore.model_validate({
        "name": FALLBACK,
        "description": (
            "Made by `patient-delivery listen`, which pauses the update trigger of "
            "deliver-updates while it delivers updates itself: if the listener falls silent, "
            "this resumes the trigger so that updates start worker runs again."
        ),
        "enabled": True,
        "trigger": {
            "type": "event",
            "posture": "Proactive",
            "expect": [ALIVE],
            "match": {"prefect.resource.id": LISTENER},
            "threshold": 1,
            "within": silent.total_seconds(),
        },
        "actions": actions,
    })  # fmt: skip


def _resumes(automation: Automation) -> set[UUID]:
    return {
        action.automation_id
        for action in automation.actions
        if action.type == "resume-automation" and action.automation_id
    }


class Handover:
    """The listener's hold on the update trigger: `take` (at start and with each sign of
    life), `give_back` (when it stops)."""

    def __init__(self, client: SyncPrefectClient, silent_seconds: float) -> None:
        self._client = client
        self._silent = timedelta(seconds=silent_seconds)

    def take(self) -> int:
        """Pause the update triggers and make sure the fallback would resume them; how many
        triggers there are."""
        triggers = update_triggers(self._client)
        if not triggers:
            return 0
        ids = [t.id for t in triggers]
        self._keep_fallback(ids)
        for trigger in triggers:
            if trigger.enabled:
                self._client.pause_automation(trigger.id)
                logger.info("paused the update trigger %r: this listener delivers updates",
                            trigger.name)  # fmt: skip
        return len(triggers)

    def _keep_fallback(self, triggers: list[UUID]) -> None:
        first = one_by_name(self._client, FALLBACK)  # one, if two listeners started at once
        if first is None:
            made = self._client.create_automation(_fallback(self._silent, triggers, None))
            self._client.update_automation(made, _fallback(self._silent, triggers, made))
        elif (not first.enabled or _resumes(first) != set(triggers)
              or first.trigger.within != self._silent):  # type: ignore[union-attr]  # fmt: skip
            self._client.update_automation(first.id, _fallback(self._silent, triggers, first.id))

    def sign_of_life(self) -> None:
        """Tell the fallback the listener is alive, then hold the triggers again."""
        from prefect.events import emit_event

        emit_event(event=ALIVE, resource={"prefect.resource.id": LISTENER})
        self.take()

    def give_back(self) -> None:
        """Resume the update triggers and pause the fallback: updates start worker runs."""
        for trigger in update_triggers(self._client):
            if not trigger.enabled:
                self._client.resume_automation(trigger.id)
                logger.info("resumed the update trigger %r", trigger.name)
        for fallback in self._client.read_automations_by_name(FALLBACK):
            self._client.pause_automation(fallback.id)


def hold_while_running(stopped: threading.Event, silent_seconds: float) -> None:
    """The listener's thread: hold the update triggers, signing every third of
    `silent_seconds`, until `stopped` is set; then give them back."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        handover = Handover(client, silent_seconds)
        while True:
            try:
                handover.sign_of_life()
            except Exception as exc:  # the server is away: the fallback may resume the trigger
                logger.warning("could not hold the update trigger (%s); trying again",
                               type(exc).__name__)  # fmt: skip
            if stopped.wait(silent_seconds / 3):
                break
        try:
            handover.give_back()
        except Exception as exc:
            logger.warning("could not resume the update trigger (%s): the fallback will",
                           type(exc).__name__)  # fmt: skip
