"""FHIR Bulk Data export, as an organization's engineer runs it: a SMART backend service gets a
token, kicks off an export of a project (a Group), polls the status URL, downloads the NDJSON
files with the token and loads them with pandas. The export is a Prefect flow run."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pandas as pd
import pytest
from sqlalchemy import select, update

from patient_delivery import ingest
from patient_delivery.flows.export import ExportRunner
from patient_delivery.pull import bulk_export, smart
from patient_delivery.pull.records import RESOURCE_TYPES
from patient_delivery.store import Store
from patient_delivery.store.models import BulkExport, Disclosure, Share, utcnow
from tests.test_pull import ApiServer, World
from tests.test_pull import world as world
from tests.test_smart import Service

pytestmark = pytest.mark.usefixtures("prefect_api")
NDJSON = "application/fhir+ndjson"


@pytest.fixture
def exporting(world: World) -> Iterator[tuple[World, str]]:
    """The world's API with its exports written by Prefect flow runs, as `serve` has them; and
    a token of acme's registered backend service."""
    world.api.stop()
    world.api = ApiServer(world.store, start_export=ExportRunner().start)
    service = Service(world.api.url)
    service.client_id = smart.add_client(world.store, "acme", service.jwks())
    yield world, service.token()


def call(world: World, method: str, url: str, token: str | None, **options: Any) -> httpx.Response:
    headers = {"Accept": "application/fhir+json", **options.pop("headers", {})}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if not url.startswith("http"):
        url = f"{world.api.url}/fhir/{url}"
    return httpx.request(method, url, headers=headers, timeout=60, **options)


def kick_off(world: World, token: str, path: str, **params: str) -> httpx.Response:
    return call(world, "GET", path, token, params=params, headers={"Prefer": "respond-async"})


def finished(world: World, token: str, status_url: str) -> httpx.Response:
    """Poll the status URL as the IG says (Retry-After) until it is no longer 202."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answer = call(world, "GET", status_url, token)
        if answer.status_code != 202:
            return answer
        assert answer.headers["X-Progress"].endswith("patients")
        time.sleep(min(float(answer.headers["Retry-After"]), 0.5))
    raise AssertionError("the export did not finish")


def test_a_project_exports_every_resource_of_its_patients_once_and_loads_in_pandas(
    exporting: tuple[World, str],
) -> None:
    world, token = exporting
    started = kick_off(world, token, "Group/study/$export", _outputFormat=NDJSON)
    assert started.status_code == 202, started.text
    status_url = started.headers["Content-Location"]
    answer = finished(world, token, status_url)
    assert answer.status_code == 200, answer.text
    manifest = answer.json()
    assert manifest["request"] == f"{world.api.url}/fhir/Group/study/$export?_outputFormat=" + (
        "application%2Ffhir%2Bndjson")  # fmt: skip
    assert manifest["requiresAccessToken"] is True and manifest["error"] == []
    assert manifest["transactionTime"].endswith("Z") and "Expires" in answer.headers

    exported: Counter[str] = Counter()
    frames = {}
    for entry in manifest["output"]:
        assert entry["url"].startswith(f"{world.api.url}/fhir/$export-file/")
        assert call(world, "GET", entry["url"], None).status_code == 401  # the token is needed
        body = call(world, "GET", entry["url"], token)
        assert body.headers["content-type"].startswith(NDJSON)
        lines = body.text.splitlines()
        assert len(lines) == entry["count"] > 0  # count is the lines
        for line in lines:  # each line one resource of the file's type
            assert json.loads(line)["resourceType"] == entry["type"]
            exported[line] += 1
        frames[entry["type"]] = pd.read_json(io.StringIO(body.text), lines=True)
    assert frames["Patient"]["resourceType"].eq("Patient").all()

    expected: Counter[str] = Counter()
    for patient_id in world.patients():  # every resource of every patient sharing, once
        url: str | None = f"{world.api.url}/fhir/Patient/{patient_id}/$everything?_count=500"
        while url:  # page by page, as the API serves them
            page = call(world, "GET", url, token).json()
            for found in page.get("entry", []):
                expected[json.dumps(found["resource"], separators=(",", ":"))] += 1
            url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    parsed = Counter(json.dumps(json.loads(line), separators=(",", ":")) for line in exported)
    assert parsed == expected and max(exported.values()) == 1
    assert set(frames["Patient"]["id"]) == set(world.patients())  # the project's, no one else's

    with world.store.session() as session:
        disclosed = list(session.scalars(select(Disclosure.patient_id).where(
            Disclosure.path == "$export")))  # fmt: skip
    assert sorted(disclosed) == sorted(world.patients())  # one disclosure per patient

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    export_id = status_url.rsplit("/", 1)[1]
    [ran] = [r for r in runs if r.name == f"bulk export {export_id[:8]}"]
    assert ran.state is not None and ran.state.is_completed()


def test_types_since_and_the_whole_organization(exporting: tuple[World, str]) -> None:
    world, token = exporting
    started = kick_off(world, token, "Patient/$export", _type="Patient,Condition")
    manifest = finished(world, token, started.headers["Content-Location"]).json()
    assert {entry["type"] for entry in manifest["output"]} == {"Patient", "Condition"}
    patients = next(e for e in manifest["output"] if e["type"] == "Patient")
    assert patients["count"] == len({p for p in world.patients()})  # every acme patient once

    # Repeated, the values are one comma-separated list (the Bulk Data IG), not the last one.
    repeated = call(world, "GET", "Patient/$export", token, headers={"Prefer": "respond-async"},
                    params=[("_type", "Patient"), ("_type", "Condition")])  # fmt: skip
    done = finished(world, token, repeated.headers["Content-Location"])
    assert done.headers["Content-Type"] == "application/json"  # the IG's type for a manifest
    assert {entry["type"] for entry in done.json()["output"]} == {"Patient", "Condition"}

    later = (utcnow() + timedelta(days=1)).isoformat()
    started = kick_off(world, token, "Group/study/$export", _since=later)
    manifest = finished(world, token, started.headers["Content-Location"]).json()
    assert manifest["output"] == []  # nothing changed since tomorrow


def post_kick_off(
    world: World, token: str, path: str, body: object, **headers: str
) -> httpx.Response:
    """A kick-off as a POST (Bulk Data IG): its parameters in a FHIR `Parameters` body."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Prefer": "respond-async", "Content-Type": "application/fhir+json", **headers}
    return call(world, "POST", path, token, content=content, headers=headers)


def parameters(*pairs: tuple[str, str, str]) -> dict[str, object]:
    return {"resourceType": "Parameters",
            "parameter": [{"name": name, kind: value} for name, kind, value in pairs]}  # fmt: skip


def test_a_kick_off_posted_with_a_parameters_body_exports_what_it_names(
    exporting: tuple[World, str],
) -> None:
    world, token = exporting
    body = parameters(("_type", "valueString", "Patient"), ("_type", "valueString", "Condition"),
                      ("_outputFormat", "valueString", NDJSON))  # fmt: skip
    posted = post_kick_off(world, token, "Group/study/$export", body)
    assert posted.status_code == 202, posted.text
    manifest = finished(world, token, posted.headers["Content-Location"]).json()
    assert {entry["type"] for entry in manifest["output"]} == {"Patient", "Condition"}
    patients = next(e for e in manifest["output"] if e["type"] == "Patient")
    assert patients["count"] == len(set(world.patients()))

    tomorrow = (utcnow() + timedelta(days=1)).isoformat()
    since = post_kick_off(world, token, "Patient/$export",
                          parameters(("_since", "valueInstant", tomorrow)))  # fmt: skip
    assert finished(world, token, since.headers["Content-Location"]).json()["output"] == []

    metadata = call(world, "GET", "metadata", None).json()
    operations = {(resource["type"], operation["name"], operation["definition"].rsplit("/", 1)[1])
                  for resource in metadata["rest"][0]["resource"]
                  for operation in resource.get("operation", [])}  # fmt: skip
    assert {("Patient", "export", "patient-export"), ("Group", "export", "group-export")} <= (
        operations
    )
    assert metadata["instantiates"] == [
        "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"
    ]


@pytest.mark.bad_input
def test_posted_kick_offs_that_cannot_be_served_are_operation_outcomes(
    exporting: tuple[World, str],
) -> None:
    world, token = exporting
    patient = {"name": "patient", "valueReference": {"reference": "Patient/hx_secret"}}
    cases = [
        (b"_type=Patient", "Parameters resource"),  # a form, not JSON
        ({"resourceType": "Bundle"}, "Parameters resource"),
        ({"resourceType": "Parameters", "parameter": [patient]}, "patient"),
        (parameters(("_since", "valueInstant", "last tuesday")), "_since"),
        (parameters(("_type", "valueString", "Patient,Bogus")), "Bogus"),
        (parameters(("_outputFormat", "valueString", "text/csv")), "_outputFormat"),
    ]
    for body, said in cases:
        answer = post_kick_off(world, token, "Group/study/$export", body)
        assert answer.status_code == 400, (body, answer.text)
        outcome = answer.json()
        assert outcome["resourceType"] == "OperationOutcome" and said in json.dumps(outcome)
        assert "hx_secret" not in answer.text and "last tuesday" not in answer.text
    lenient = post_kick_off(world, token, "Group/study/$export",
                            {"resourceType": "Parameters", "parameter": [patient]},
                            Prefer="respond-async, handling=lenient")  # fmt: skip
    assert lenient.status_code == 202  # the unknown parameter ignored, as in a GET
    assert finished(world, token, lenient.headers["Content-Location"]).status_code == 200


@pytest.mark.bad_input
def test_kick_offs_that_cannot_be_served_are_operation_outcomes(
    exporting: tuple[World, str],
) -> None:
    world, token = exporting
    cases = [
        ({"_type": "Patient,Bogus"}, "Group/study/$export", 400, "Bogus"),
        ({"_type": "<script>"}, "Group/study/$export", 400, "(not a type name)"),
        ({"_outputFormat": "text/csv"}, "Group/study/$export", 400, "_outputFormat"),
        ({"_elements": "id"}, "Group/study/$export", 400, "_elements"),
        ({}, "Group/trial/$export", 404, "no such group"),  # another organization's project
        ({}, "Group/nosuch/$export", 404, "no such group"),
    ]
    for params, path, status, said in cases:
        answer = kick_off(world, token, path, **params)
        assert answer.status_code == status, (params, path, answer.text)
        body = answer.json()
        assert body["resourceType"] == "OperationOutcome" and said in json.dumps(body), body
    synchronous = call(world, "GET", "Group/study/$export", token)
    assert synchronous.status_code == 400 and "respond-async" in synchronous.text
    assert call(world, "GET", "Group/study/$export", None,
                headers={"Prefer": "respond-async"}).status_code == 401  # fmt: skip
    scoped = Service(world.api.url)
    scoped.client_id = smart.add_client(world.store, "acme", scoped.jwks(),
                                        scopes="system/Condition.rs")  # fmt: skip
    narrow = scoped.token(scope="system/Condition.rs")
    refused = kick_off(world, narrow, "Group/study/$export", _type="Patient")
    assert refused.status_code == 403
    allowed = kick_off(world, narrow, "Group/study/$export")
    manifest = finished(world, narrow, allowed.headers["Content-Location"]).json()
    assert {entry["type"] for entry in manifest["output"]} == {"Condition"}


def test_cancelled_and_expired_exports_are_gone_with_their_files(
    exporting: tuple[World, str],
) -> None:
    world, token = exporting
    done = finished(world, token, kick_off(world, token, "Group/study/$export")
                    .headers["Content-Location"])  # fmt: skip
    status_url = done.url
    export_id = str(status_url).rsplit("/", 1)[1]
    file_url = done.json()["output"][0]["url"]
    other = world.other_key
    assert call(world, "GET", str(status_url), other).status_code == 404  # not theirs
    assert call(world, "GET", file_url, other).status_code == 404
    assert bulk_export.folder(export_id).exists()

    with world.store.session() as session:
        session.execute(update(BulkExport).where(BulkExport.id == export_id)
                        .values(expires_at=utcnow() - timedelta(seconds=1)))  # fmt: skip
    assert call(world, "GET", str(status_url), token).status_code == 404
    assert call(world, "GET", file_url, token).status_code == 404
    assert bulk_export.sweep(world.store) == 1 and not bulk_export.folder(export_id).exists()

    second = kick_off(world, token, "Group/study/$export").headers["Content-Location"]
    finished(world, token, second)
    second_id = second.rsplit("/", 1)[1]
    assert call(world, "DELETE", second, token).status_code == 202
    assert call(world, "GET", second, token).status_code == 404
    assert not bulk_export.folder(second_id).exists()
    assert call(world, "DELETE", second, token).status_code == 404


def test_a_patient_who_withdraws_during_an_export_is_left_out_of_what_is_not_yet_written(
    world: World,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from patient_delivery.pull.keys import authenticate

    caller = authenticate(store, world.key)
    assert caller is not None
    export_id = bulk_export.request_export(store, caller, "study", None, None, None, "test")
    order = sorted(world.patients())  # the writer goes patient by patient, in ID order
    first, last = order[0], order[-1]
    withdrawn: list[str] = []

    def after_each_patient(done: int, total: int) -> None:
        if done == 1:  # the first is written; the last withdraws now
            ingest.unshare_patient(store, "study", last, recorded_by="test")
            withdrawn.append(last)

    monkeypatch.setattr(bulk_export, "CHECK_SECONDS", 0.0)  # report after every patient
    files = bulk_export.write_export(store, export_id, after_each_patient)
    assert withdrawn == [last]
    written = "".join((bulk_export.folder(export_id) / f.file).read_text() for f in files)
    assert f'"Patient/{first}"' in written or f'"id":"{first}"' in written
    assert last not in written
    with store.session() as session:
        disclosed = set(session.scalars(select(Disclosure.patient_id).where(
            Disclosure.path == "$export")))  # fmt: skip
        still = set(session.scalars(select(Share.patient_id).where(Share.project_id == "study")))
    assert last not in disclosed and first in disclosed and disclosed <= still


def test_every_type_the_api_serves_can_be_exported() -> None:
    assert set(bulk_export.EXPORTABLE) == {"Patient", *RESOURCE_TYPES}


def test_an_export_that_cannot_be_written_says_so_at_its_status_url(
    exporting: tuple[World, str],
) -> None:
    world, token = exporting
    exports_folder = bulk_export.folder("x").parent
    exports_folder.mkdir(parents=True, exist_ok=True)
    exports_folder.rename(exports_folder.with_name("moved"))
    exports_folder.write_text("a file where the exports' folder goes")  # the writer cannot write
    try:
        started = kick_off(world, token, "Group/study/$export")
        answer = finished(world, token, started.headers["Content-Location"])
    finally:
        exports_folder.unlink()
    assert answer.status_code == 500
    body = answer.json()
    assert body["resourceType"] == "OperationOutcome" and "the export failed" in json.dumps(body)
    from prefect.client.orchestration import get_client

    export_id = started.headers["Content-Location"].rsplit("/", 1)[1]
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:  # the status URL says so as soon as the writer stops; the run ends after
            [ran] = [r for r in client.read_flow_runs() if r.name == f"bulk export {export_id[:8]}"]
            if (ran.state is not None and ran.state.is_final()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert ran.state is not None and ran.state.is_failed()  # red in the Prefect UI too


def test_an_export_whose_writer_stopped_is_answered_failed_not_running_forever(
    exporting: tuple[World, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server killed while it wrote an export leaves it `running`; once its writer has been
    silent for SILENT_SECONDS, the status URL says it failed, to be asked for again."""
    from patient_delivery.pull.keys import authenticate

    world, token = exporting
    caller = authenticate(world.store, token)
    assert caller is not None
    export_id = bulk_export.request_export(world.store, caller, "study", None, None, None, "t")
    with world.store.session() as session:  # as a writer leaves it when its process dies
        session.execute(update(BulkExport).where(BulkExport.id == export_id).values(
            status=bulk_export.RUNNING, transaction_time=utcnow(),
            heartbeat_at=utcnow() - timedelta(seconds=3)))  # fmt: skip
    status_url = f"{world.api.url}/fhir/$export-status/{export_id}"
    assert call(world, "GET", status_url, token).status_code == 202  # silent 3 s: still running
    monkeypatch.setattr(bulk_export, "SILENT_SECONDS", 2.0)
    answer = call(world, "GET", status_url, token)
    assert answer.status_code == 500 and "stopped with its server" in answer.text
