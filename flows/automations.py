"""Prefect automations the project keeps by name: one of each, whoever made it."""

from __future__ import annotations

from typing import Any


def one_by_name(client: Any, name: str) -> Any | None:
    """The automation named `name`, or None; others of that name (left by an older install,
    or made by two processes at once) are deleted, so that one is kept up to date."""
    first, *extra = client.read_automations_by_name(name) or [None]
    for duplicate in extra:
        client.delete_automation(duplicate.id)
    return first
