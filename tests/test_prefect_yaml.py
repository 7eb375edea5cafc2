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
    assert {d["name"] for d in deployments} == {
        "deliver-updates",
        "deliver-now",
        "redeliver",
        "backfill",
        "check-destination",
    }
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


def test_a_scheduled_run_is_named_for_its_schedule() -> None:
    """The service tests see a trigger's and a person's runs named; a schedule's run starts only
    on the schedule's minute, so its naming is checked on the run record Prefect gives it."""
    from uuid import uuid4

    from prefect.client.schemas.objects import FlowRun

    from patient_delivery.flows.reporting import started_by

    scheduled = FlowRun(flow_id=uuid4(), deployment_id=uuid4(), auto_scheduled=True)
    assert started_by(scheduled) == ", scheduled"
    assert started_by(FlowRun(flow_id=uuid4(), deployment_id=uuid4())) == ", on demand"
    assert started_by(FlowRun(flow_id=uuid4())) == ""  # a flow called directly: no deployment
