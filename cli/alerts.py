"""Alerts: the automations of flows/alerts.yaml, kept on the Prefect server by name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from patient_delivery.cli.common import app, console, fail, prefect, print_json, printable
from patient_delivery.flows.automations import one_by_name

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

alerts_app = typer.Typer(help="Alerts (Prefect automations).", no_args_is_help=True)
app.add_typer(alerts_app, name="alerts")


def _alerts_file() -> dict[str, Any]:
    from importlib.resources import files

    import yaml

    return yaml.safe_load(files("patient_delivery.flows").joinpath("alerts.yaml").read_text())


def _ours() -> list[dict[str, Any]]:
    """The automations of flows/alerts.yaml."""
    return _alerts_file()["automations"]


def _remove_retired(client: SyncPrefectClient) -> int:
    """Delete the automations of alerts earlier versions installed and this one replaced."""
    removed = 0
    for name in _alerts_file().get("retired", []):
        for automation in _installed(client, name):
            client.delete_automation(automation.id)
            console.print(f"removed retired automation {name!r} ({automation.id})")
            removed += 1
    return removed


def _installed(client: SyncPrefectClient, name: str) -> list[Any]:
    return client.read_automations_by_name(name)


@alerts_app.command("install")
def alerts_install(
    notify: Annotated[
        str, typer.Option(help="Notification block to alert through, e.g. slack-webhook/ops")
    ],
) -> None:
    """Create the alert automations of flows/alerts.yaml, or bring those already there (by
    name) up to date: running it again changes them, never adds a second of each."""
    prefect()
    from prefect.blocks.core import Block
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    if "/" not in notify:
        raise fail(f"--notify: {notify!r} is not a block reference (TYPE/NAME)", code=2)
    try:
        block = Block.load(notify)
    except (ValueError, KeyError):
        raise fail(f"--notify: no notification block {notify}", code=2) from None
    with get_client(sync_client=True) as client:
        for spec in _ours():
            for action in spec["actions"]:
                if action["type"] == "send-notification":
                    action["block_document_id"] = str(block._block_document_id)
            automation = AutomationCore.model_validate(spec)
            first = one_by_name(client, spec["name"])
            if first is None:
                automation_id = client.create_automation(automation)
                console.print(f"created automation {spec['name']!r} ({automation_id})")
            else:
                client.update_automation(first.id, automation)
                console.print(f"updated automation {spec['name']!r} ({first.id})")
        _remove_retired(client)


@alerts_app.command("list")
def alerts_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout")] = False,
) -> None:
    """The alerts of flows/alerts.yaml and whether each is installed and enabled."""
    prefect()
    from prefect.client.orchestration import get_client

    rows = []
    with get_client(sync_client=True) as client:
        for spec in _ours():
            for automation in _installed(client, spec["name"]) or [None]:
                rows.append({
                    "alert": spec["name"],
                    "installed": automation is not None,
                    "enabled": automation is not None and automation.enabled,
                    "id": str(automation.id) if automation else None,
                })  # fmt: skip
    if as_json:
        print_json({"alerts": rows})
        return
    table = Table(title="alerts")
    for column in ("alert", "installed", "enabled", "id"):
        table.add_column(column, no_wrap=column == "alert")
    for row in rows:
        yes_no = ["yes" if row[k] else "no" for k in ("installed", "enabled")]
        table.add_row(printable(row["alert"]), *yes_no, row["id"] or "")
    console.print(table)


@alerts_app.command("remove")
def alerts_remove() -> None:
    """Delete the alert automations of flows/alerts.yaml from the Prefect server."""
    prefect()
    from prefect.client.orchestration import get_client

    removed = 0
    with get_client(sync_client=True) as client:
        for spec in _ours():
            for automation in _installed(client, spec["name"]):
                client.delete_automation(automation.id)
                removed += 1
        removed += _remove_retired(client)
    console.print(f"removed {removed} automation(s)")
