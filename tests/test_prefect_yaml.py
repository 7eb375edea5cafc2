"""prefect.yaml: every deployment points at a flow that exists, on a named work pool."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from prefect import Flow

ROOT = Path(__file__).resolve().parent.parent


def test_every_deployment_entrypoint_is_a_flow() -> None:
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = config["deployments"]
    assert {d["name"] for d in deployments} == {"deliver-updates", "redeliver", "backfill"}
    for deployment in deployments:
        path, name = deployment["entrypoint"].split(":")
        module = importlib.import_module(
            "patient_delivery." + path.removesuffix(".py").replace("/", ".")
        )
        assert isinstance(getattr(module, name), Flow)
        assert deployment["work_pool"]["name"] == "patient-delivery"
        for schedule in deployment.get("schedules", []):
            assert schedule.get("timezone") == "UTC"


def test_the_delivery_deployment_is_triggered_by_patient_updates() -> None:
    from patient_delivery.events import EVENT, RESOURCE_PREFIX

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [deliver] = [d for d in config["deployments"] if d["name"] == "deliver-updates"]
    [trigger] = deliver["triggers"]
    assert trigger["expect"] == [EVENT]
    assert trigger["match"]["prefect.resource.id"] == RESOURCE_PREFIX + "*"


def test_every_deployment_parameter_has_a_description_for_the_ui_form() -> None:
    from prefect.utilities.callables import parameter_schema

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        module = importlib.import_module(
            "patient_delivery." + path.removesuffix(".py").replace("/", ".")
        )
        schema = parameter_schema(getattr(module, name)).model_dump()
        for parameter, spec in schema["properties"].items():
            assert spec.get("description"), (deployment["name"], parameter)


def test_the_event_trigger_coalesces_bursts_and_runs_wait_their_turn() -> None:
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [deliver] = [d for d in config["deployments"] if d["name"] == "deliver-updates"]
    [trigger] = deliver["triggers"]
    assert (trigger["posture"], trigger["threshold"], trigger["within"]) == ("Reactive", 1, 10)
    assert deliver["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
