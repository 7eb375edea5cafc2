"""Alerts: the automations of flows/alerts.yaml, created on the Prefect server."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import app, console, prefect

alerts_app = typer.Typer(help="Alerts (Prefect automations).", no_args_is_help=True)
app.add_typer(alerts_app, name="alerts")


@alerts_app.command("install")
def alerts_install(
    notify: Annotated[
        str, typer.Option(help="Notification block to alert through, e.g. slack-webhook/ops")
    ],
) -> None:
    """Create the alert automations of flows/alerts.yaml on the Prefect server."""
    prefect()
    from importlib.resources import files

    import yaml
    from prefect.blocks.core import Block
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    block = Block.load(notify)
    automations = yaml.safe_load(files("flows").joinpath("alerts.yaml").read_text())
    with get_client(sync_client=True) as client:
        for spec in automations["automations"]:
            for action in spec["actions"]:
                if action["type"] == "send-notification":
                    action["block_document_id"] = str(block._block_document_id)
            automation_id = client.create_automation(AutomationCore.model_validate(spec))
            console.print(f"created automation {spec['name']!r} ({automation_id})")
