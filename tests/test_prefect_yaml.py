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
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
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
