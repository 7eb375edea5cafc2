"""The pull API on a real server on loopback, read with clients nobody here wrote: `fhirclient`
(SMART on FHIR) for the FHIR API and the `mcp` SDK's client for the MCP server."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from sqlalchemy import func, select

from loopback.servers import free_port
from patient_delivery import ingest
from patient_delivery.importers import fhir_bundle, import_ccda, import_fhir_bulk
from patient_delivery.pull.keys import authenticate, create_key, revoke_key
from patient_delivery.pull.server import create_app
from patient_delivery.store import Store
from patient_delivery.store.models import Disclosure, Patient, Share

FHIR_JSON = "application/fhir+json"


class ApiServer:
    """`create_app` under uvicorn on a free loopback port, in a thread."""

    def __init__(
        self, store: Store, mcp_sessions: int | None = None,
        start_export: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(store, self.url, mcp_sessions=mcp_sessions, start_export=start_export)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the API server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class World:
    store: Store
    api: ApiServer
    key: str
    other_key: str
    fixtures: Path

    def get(self, path: str, key: str | None = "own", **params: Any) -> httpx.Response:
        token = {"own": self.key, "other": self.other_key}.get(key or "", key)
        headers = {"Authorization": f"Bearer {token}"} if key else {}
        return httpx.get(f"{self.api.url}/fhir/{path}", params=params, headers=headers)

    def patients(self) -> dict[str, str]:
        """healthexPatientId -> the Patient.id in the fixture export, for project study."""
        with self.store.session() as session:
            return dict(session.execute(
                select(Patient.id, Patient.fhir_id).join(Share, Share.patient_id == Patient.id)
                .where(Share.project_id == "study", Patient.fhir_id.is_not(None))
            ).all())  # fmt: skip

    def fullest(self) -> tuple[str, str]:
        """(healthexPatientId, export id) of the patient with the most resources."""
        patients = self.patients()
        return max(patients.items(), key=lambda item: len(self.exported(item[1], item[0])))

    def exported(self, source_id: str, patient_id: str) -> list[dict[str, Any]]:
        """The fixture export's resources of one patient, as the API should serve them."""
        found = []
        for path in sorted(self.fixtures.glob("*.ndjson")):
            if path.name[0].isupper():
                for line in path.read_text().splitlines():
                    if source_id in line:
                        text = line.replace(f"Patient/{source_id}", f"Patient/{patient_id}")
                        resource = json.loads(text)
                        if resource["resourceType"] == "Patient":
                            if resource["id"] != source_id:
                                continue
                            resource["id"] = patient_id
                        found.append(resource)
        return found


@pytest.fixture
def world(store: Store, fixtures_dir: Path) -> Iterator[World]:
    ingest.add_organization(store, "Acme", "acme")
    ingest.add_project(store, "acme", "Study", "study")
    import_fhir_bulk(store, fixtures_dir / "fhir-bulk-10", "study")
    import_ccda(store, sorted((fixtures_dir / "ccda").glob("*.xml"))[:2], project_id="study")
    ingest.add_organization(store, "Other", "other")
    ingest.add_project(store, "other", "Trial", "trial")
    stranger = ingest.add_patient(store, "trial", "T-1")
    ingest.put_document(store, stranger, "fhir", fhir_bundle(
        {"resourceType": "Patient", "id": "t1"}, []))  # fmt: skip
    _, key = create_key(store, "acme", "tests")
    _, other_key = create_key(store, "other", "tests")
    api = ApiServer(store)
    yield World(store, api, key, other_key, fixtures_dir / "fhir-bulk-10")
    api.stop()


def test_fhirclient_reads_a_patient_and_searches_resources_page_by_page(world: World) -> None:
    from fhirclient import client
    from fhirclient.models.condition import Condition
    from fhirclient.models.encounter import Encounter
    from fhirclient.models.patient import Patient as FhirPatient

    smart = client.FHIRClient(settings={"app_id": "tests", "api_base": f"{world.api.url}/fhir/"})
    smart.server.session.headers["Authorization"] = f"Bearer {world.key}"
    smart.prepare()  # reads and parses our CapabilityStatement
    # It names the SMART token endpoint: the client would get a token itself (test_smart);
    # here it reads with the organization's API key, sent as a bearer token.
    assert smart.server.capabilityStatement.fhirVersion == "4.0.1"
    assert smart.server.auth.auth_type == "oauth2" and not smart.ready
    candidates = {pid: world.exported(sid, pid) for pid, sid in world.patients().items()}
    patient_id = max(candidates, key=lambda pid: len(candidates[pid]))  # the fullest record
    exported = candidates[patient_id]

    patient = FhirPatient.read(patient_id, smart.server)
    [expected] = [r for r in exported if r["resourceType"] == "Patient"]
    assert patient.as_json() == FhirPatient(expected).as_json()

    for model, kind in ((Condition, "Condition"), (Encounter, "Encounter")):
        search = model.where(struct={"patient": patient_id, "_count": "2"})
        found = [r.as_json() for r in search.perform_resources_iter(smart.server)]
        wanted = [model(r).as_json() for r in exported if r["resourceType"] == kind]
        assert len(wanted) > 2  # several pages were followed
        assert sorted(r["id"] for r in found) == sorted(r["id"] for r in wanted)
        assert sorted(found, key=lambda r: r["id"]) == sorted(wanted, key=lambda r: r["id"])


def test_everything_pages_return_each_resource_exactly_once(world: World) -> None:
    patient_id, source_id = world.fullest()
    seen: list[str] = []
    response = world.get(f"Patient/{patient_id}/$everything", _count=25)
    pages = 0
    while True:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(FHIR_JSON)
        bundle = response.json()
        seen += [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]]
        pages += 1
        following = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not following:
            break
        response = httpx.get(following[0], headers={"Authorization": f"Bearer {world.key}"})
    exported = world.exported(source_id, patient_id)
    assert pages > 2 and len(seen) == len(set(seen)) == bundle["total"] == len(exported)
    assert set(seen) == {f"{r['resourceType']}/{r['id']}" for r in exported}


def test_since_returns_only_what_changed_after(world: World) -> None:
    patient_id, _ = world.fullest()
    past = world.get("Condition", patient=patient_id, _since="2000-01-01T00:00:00Z")
    future = world.get("Condition", patient=patient_id, _since="2999-01-01T00:00:00Z")
    assert past.json()["total"] > 0 and future.json()["total"] == 0


TRICKY = '"Patient/S1/_history/1"'
"""A string value that quotes a reference: its escaped quotes broke a regex over raw JSON."""


@pytest.mark.security
def test_any_bundle_ingest_accepts_reads_back_through_every_pull_path(world: World) -> None:
    """A patient's bundle with strings that look like references and `meta` values that are not
    instants: every read answers, strings come back as written, real references are rewritten."""
    patient = ingest.add_patient(world.store, "study", "MRN-TRICKY")
    resources = [
        {"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/S1"},
         "note": [{"text": TRICKY}, {"text": "see Patient/S1 and \\\"quotes\\\""}],
         "meta": {"lastUpdated": "2026-01-01T00:00:00"},  # no time zone
         "valueInteger": 2**53 + 1},  # beyond what a double holds exactly
        {"resourceType": "Condition", "id": "c1", "meta": ["not", "an", "object"],
         "subject": {"reference": "Patient/S1/_history/3"}},
        {"resourceType": "Condition", "id": "c2", "meta": {"lastUpdated": "yesterday"},
         "subject": {"reference": "Patient/S1"}},
    ]  # fmt: skip
    ingest.put_document(world.store, patient, "fhir", fhir_bundle(
        {"resourceType": "Patient", "id": "S1", "identifier": [{"value": "MRN-TRICKY"}]},
        resources,
    ))  # fmt: skip

    answers = {
        "Patient": world.get("Patient"),
        "read": world.get(f"Patient/{patient}"),
        "everything": world.get(f"Patient/{patient}/$everything"),
        "identifier": world.get("Patient", identifier="MRN-TRICKY"),
        "since": world.get("Condition", patient=patient, _since="2000-01-01T00:00:00Z"),
        "since, observations": world.get(
            "Observation", patient=patient, _since="2000-01-01T00:00:00Z"
        ),
    }
    assert {name: r.status_code for name, r in answers.items()} == dict.fromkeys(answers, 200)
    everything = [e["resource"] for e in answers["everything"].json()["entry"]]
    [observation] = [r for r in everything if r["resourceType"] == "Observation"]
    assert observation["note"][0]["text"] == TRICKY  # as written
    assert observation["valueInteger"] == 2**53 + 1
    assert observation["subject"]["reference"] == f"Patient/{patient}"
    conditions = {e["resource"]["id"]: e["resource"] for e in answers["since"].json()["entry"]}
    assert {c["subject"]["reference"] for c in conditions.values()} == {f"Patient/{patient}"}
    assert set(conditions) == {"c1", "c2"}  # unreadable stamps ignored: the version's time
    _, found = _mcp_call(world.api.url, world.key, ("search_resources", {
        "patient_id": patient, "resource_type": "Observation"}))  # fmt: skip
    assert not found.is_error
    [served] = json.loads(_text(found))["resources"]
    assert (served["note"][0]["text"], served["valueInteger"]) == (TRICKY, 2**53 + 1)


def test_another_organizations_patient_is_not_found_like_one_that_does_not_exist(
    world: World,
) -> None:
    patient_id, _ = sorted(world.patients().items())[0]
    theirs = world.get(f"Patient/{patient_id}", key="other")
    nobody = world.get("Patient/hx_00000000000000000000", key="other")
    searched = world.get("Condition", key="other", patient=patient_id)
    for response in (theirs, nobody, searched):
        assert response.status_code == 404
        assert response.json()["resourceType"] == "OperationOutcome"
    assert theirs.json() == nobody.json()  # the same answer: nothing tells them apart
    assert patient_id not in theirs.text  # and nothing of the request is echoed
    # The other organization sees its own patient and only that one.
    listed = world.get("Patient", key="other").json()
    assert listed["total"] == 1 and listed["entry"][0]["resource"]["id"] != patient_id


@pytest.mark.bad_input
def test_missing_wrong_and_revoked_keys_are_refused(world: World) -> None:
    patient_id, _ = sorted(world.patients().items())[0]
    key_id, key = create_key(world.store, "acme", "soon revoked")
    assert world.get(f"Patient/{patient_id}", key=key).status_code == 200
    revoke_key(world.store, key_id)
    for presented in (None, "pdk_wrong", key, world.key + "x"):
        response = world.get(f"Patient/{patient_id}", key=presented)
        assert response.status_code == 401, presented
        assert response.json()["issue"][0]["code"] == "login"
        # RFC 6750 3.1: a key sent and refused is named invalid; none sent, only the scheme
        challenge = "Bearer" if presented is None else 'Bearer error="invalid_token"'
        assert response.headers["www-authenticate"] == challenge, presented
    bad = world.get("Condition", _count="many", patient=patient_id)
    assert bad.status_code == 400 and "_count" in bad.json()["issue"][0]["diagnostics"]
    assert world.get("Spaceship", patient=patient_id).status_code == 404
    assert world.get("Condition").status_code == 400  # no patient


def test_every_read_is_a_disclosure_with_who_what_and_when(world: World) -> None:
    patient_id, _ = sorted(world.patients().items())[0]
    world.get(f"Patient/{patient_id}")
    world.get("Condition", patient=patient_id)
    world.get(f"Patient/{patient_id}", key="other")  # not found: nothing disclosed
    with world.store.session() as session:
        rows = session.scalars(
            select(Disclosure).where(Disclosure.destination == "fhir-api").order_by(Disclosure.id)
        ).all()
    assert [(r.patient_id, r.organization_id, r.path, r.purpose) for r in rows] == [
        (patient_id, "acme", "Patient/{id}", "pull"),
        (patient_id, "acme", "Condition?patient", "pull"),
    ]
    assert all(r.accessor and r.accessor.startswith("api-key:") and r.delivery_id is None
               for r in rows)  # fmt: skip


def _mcp_call(url: str, key: str | None, *calls: tuple[str, dict[str, Any]]) -> list[Any]:
    """Connect with the mcp SDK's streamable HTTP client, list tools, make `calls`."""
    import httpx2
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def run() -> list[Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=30) as http,
            streamable_http_client(f"{url}/mcp", http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            tools = await session.list_tools()
            results: list[Any] = [sorted(t.name for t in tools.tools)]
            for name, arguments in calls:
                results.append(await session.call_tool(name, arguments))
            return results

    return anyio.run(run)


def _text(result: Any) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


def test_mcp_client_lists_tools_and_reads_the_organizations_records(world: World) -> None:
    patients = world.patients()
    sizes = {pid: len(json.dumps(world.exported(sid, pid))) for pid, sid in patients.items()}
    patient_id = max(sizes, key=sizes.__getitem__)  # the largest bundle: over 1 MB
    assert sizes[patient_id] > 1_048_576
    source_id = patients[patient_id]
    with world.store.session() as session:
        external = session.scalar(select(Share.external_id).where(Share.patient_id == patient_id))
    tools, listed, by_external, document, conditions, theirs = _mcp_call(
        world.api.url, world.key,
        ("list_patients", {}),
        ("list_patients", {"external_id": external}),
        ("get_document", {"patient_id": patient_id, "data_type": "fhir"}),
        ("search_resources", {"patient_id": patient_id, "resource_type": "Condition",
                              "limit": 1000}),
        ("get_document", {"patient_id": _stranger(world), "data_type": "fhir"}),
    )  # fmt: skip
    assert tools == ["get_document", "list_patients", "search_resources"]
    assert json.loads(_text(listed))["total"] == 13 + 2
    [only] = json.loads(_text(by_external))["patients"]
    assert only["healthexPatientId"] == patient_id
    bundle = json.loads(_text(document))
    seen = sorted(world.exported(source_id, patient_id), key=json.dumps)  # as REST shows it
    assert sorted((e["resource"] for e in bundle["entry"]), key=json.dumps) == seen
    assert [e["resource"]["id"] for e in bundle["entry"]
            if e["resource"]["resourceType"] == "Patient"] == [patient_id]  # fmt: skip
    assert f"Patient/{source_id}" not in _text(document)  # one patient ID everywhere
    wanted = [r for r in world.exported(source_id, patient_id) if r["resourceType"] == "Condition"]
    found = json.loads(_text(conditions))
    assert found["total"] == len(wanted) and sorted(found["resources"], key=lambda r: r["id"]) \
        == sorted(wanted, key=lambda r: r["id"])  # fmt: skip
    assert theirs.is_error and "no fhir document" in _text(theirs)
    with world.store.session() as session:
        reads = session.scalars(select(Disclosure.path).where(Disclosure.destination == "mcp"))
        assert sorted(reads) == ["get_document fhir", "search_resources Condition"]


@pytest.mark.security
@pytest.mark.parametrize(
    "resource_type", ["Condition\x1b[2J\nforged row", "X" * 2_000_000, "", "Patient"]
)
def test_mcp_search_refuses_resource_types_it_does_not_serve_and_records_nothing(
    world: World, resource_type: str
) -> None:
    """The disclosure ledger records facts: caller text never reaches it."""
    patient_id = next(iter(world.patients()))
    _, refused = _mcp_call(world.api.url, world.key, ("search_resources", {
        "patient_id": patient_id, "resource_type": resource_type}))  # fmt: skip
    assert refused.is_error and "resource_type must be a FHIR resource type" in _text(refused)
    assert resource_type[:20] not in _text(refused) or not resource_type
    with world.store.session() as session:
        assert session.scalar(select(func.count()).select_from(Disclosure)) == 0


def test_a_disclosure_says_what_was_asked_in_a_closed_vocabulary(world: World) -> None:
    from patient_delivery.pull.records import ASKED, Records

    records = Records(world.store)
    caller = authenticate(world.store, world.key)
    assert caller is not None
    patient, record = next(
        (p, found)
        for p in records.patients(caller, None, limit=100, offset=0)[0]
        if (found := records.fhir(caller, p.patient_id)) is not None
    )
    version = record.version
    with pytest.raises(ValueError, match="ASKED"):
        records.disclose(caller, patient, version, "Condition\nforged", "mcp")
    assert "search_resources Condition" in ASKED and "Condition?patient" in ASKED


@pytest.mark.bad_input
def test_mcp_over_http_refuses_missing_and_wrong_keys(world: World) -> None:
    for key in (None, "pdk_wrong"):
        response = httpx.post(
            f"{world.api.url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
            headers={"Authorization": f"Bearer {key}"} if key else {},
        )  # fmt: skip
        assert response.status_code == 401


def _over_stdio(
    key: str, meanwhile: Callable[[str], None], key_file: Path | None = None
) -> tuple[dict, Any, Any]:
    """`patient-delivery mcp` over stdio as a local agent runs it: list the patients, do
    `meanwhile(first patient)` while the server runs, then list again and read that patient's
    FHIR document. (The first list, parsed; the two calls' results.)"""
    import os

    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    cli = str(Path(sys.executable).parent / "patient-delivery")
    if key_file is None:
        parameters = StdioServerParameters(
            command=cli, args=["mcp"], env={**os.environ, "PATIENT_DELIVERY_API_KEY": key}
        )
    else:  # the key in an owner-only file, named on the command line instead of the key
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        parameters = StdioServerParameters(
            command=cli, args=["mcp", "--key-file", str(key_file)], env=dict(os.environ)
        )

    async def run() -> tuple[Any, Any, Any]:
        async with stdio_client(parameters) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            listed = await s.call_tool("list_patients", {})
            patient = json.loads(_text(listed))["patients"][0]["healthexPatientId"]
            meanwhile(patient)
            after = await s.call_tool("list_patients", {})
            read_after = await s.call_tool("get_document", {"patient_id": patient,
                                                            "data_type": "fhir"})  # fmt: skip
            return listed, after, read_after

    listed, after, read_after = anyio.run(run)
    return json.loads(_text(listed)), after, read_after


def test_mcp_over_stdio_serves_a_local_agent_as_one_organization(
    world: World, store: Store
) -> None:
    caller = authenticate(store, world.other_key)
    assert caller is not None

    listed, after, read_after = _over_stdio(
        world.other_key, lambda _: revoke_key(store, caller.key_id)
    )
    assert listed["total"] == 1 and listed["patients"][0]["externalId"] == "T-1"
    for refused in (after, read_after):  # the next call after revocation, and every one after
        assert refused.is_error and "not valid (revoked or unknown)" in _text(refused)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Disclosure)) == 0


def test_mcp_over_stdio_stops_serving_a_patient_once_they_stop_sharing(
    world: World, store: Store, tmp_path: Path
) -> None:
    listed, after, read_after = _over_stdio(
        world.other_key,
        lambda patient: ingest.unshare_patient(store, "trial", patient),
        key_file=tmp_path / "key",
    )
    assert listed["total"] == 1
    assert json.loads(_text(after))["total"] == 0  # the next request, same server process
    assert read_after.is_error
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Disclosure)) == 0


@pytest.mark.security
@pytest.mark.bad_input
def test_mcp_refuses_a_key_on_its_command_line_without_echoing_it(store: Store) -> None:
    """Every local user can read a process's command line: a key there is refused, one line."""
    from typer.testing import CliRunner

    from patient_delivery.cli import app

    ingest.add_organization(store, "Acme", "acme")
    _, key = create_key(store, "acme", "tests")
    refused = CliRunner().invoke(app, ["mcp", "--key", key], env={"PATIENT_DELIVERY_API_KEY": ""})
    assert refused.exit_code == 2
    assert "--key: a key on the command line is readable by every local user" in refused.output
    assert key not in refused.output
    missing = CliRunner().invoke(app, ["mcp", "--key-file", "/nonexistent/key"])
    assert missing.exit_code == 2 and "--key-file: cannot read" in missing.output


def _stranger(world: World) -> str:
    with world.store.session() as session:
        return session.scalar(select(Share.patient_id).where(Share.project_id == "trial")) or ""


def test_api_keys_from_the_command_line_are_shown_once_and_revocable(store: Store) -> None:
    from typer.testing import CliRunner

    from patient_delivery.cli import app
    from patient_delivery.pull.keys import authenticate

    runner = CliRunner()
    ingest.add_organization(store, "Acme", "acme")
    created = runner.invoke(app, ["api-key", "create", "acme", "--label", "analytics"])
    assert created.exit_code == 0, created.output
    [key] = [word for word in created.output.split() if word.startswith("pdk_")]
    assert authenticate(store, key) is not None
    listed = runner.invoke(app, ["api-key", "list"], env={"COLUMNS": "200"})
    assert "analytics" in listed.output and key not in listed.output
    assert runner.invoke(app, ["api-key", "revoke", "1"]).exit_code == 0
    assert authenticate(store, key) is None
    refused = runner.invoke(app, ["api-key", "create", "nobody"])
    assert refused.exit_code == 2 and "no organization 'nobody'" in refused.output


@pytest.mark.security
def test_out_of_range_offsets_are_a_400_on_fhir_and_an_error_on_mcp(world: World) -> None:
    patient_id, _ = world.fullest()
    for path, params in (("Patient", {}), ("Condition", {"patient": patient_id}),
                         (f"Patient/{patient_id}/$everything", {})):  # fmt: skip
        response = world.get(path, _offset=str(2**63), **params)
        assert response.status_code == 400, path
        assert response.json()["issue"][0]["diagnostics"] == "invalid parameter(s): _offset"
    _, listed, searched = _mcp_call(
        world.api.url, world.key, ("list_patients", {"offset": 2**63}),
        ("search_resources", {"patient_id": patient_id, "resource_type": "Condition",
                              "offset": 2**63}),
    )  # fmt: skip
    for refused in (listed, searched):
        assert refused.is_error and "offset must be between 0 and" in _text(refused)


@pytest.mark.security
def test_patient_search_applies_id_refuses_what_it_does_not_support_and_links_what_it_applied(
    world: World,
) -> None:
    patient_id, _ = sorted(world.patients().items())[0]
    one = world.get("Patient", _id=patient_id).json()
    assert one["total"] == 1 and one["entry"][0]["resource"]["id"] == patient_id
    theirs = world.get("Patient", key="other", _id=patient_id).json()
    assert theirs["total"] == 0 and theirs.get("entry", []) == []  # not theirs: not found
    for params in ({"identifier": ""}, {"_id": ""}, {"identifier": "system|"}):
        empty = world.get("Patient", **params)
        assert empty.status_code == 400 and empty.json()["issue"][0]["code"] == "required"
    unknown = world.get("Patient", name="Smith", **{"x" * 5000: "1"})
    assert unknown.status_code == 400
    text = unknown.json()["issue"][0]["diagnostics"]
    assert text == "unsupported search parameter(s): name, (not a FHIR name)"
    lenient = httpx.get(f"{world.api.url}/fhir/Patient", params={"name": "Smith", "_count": 1},
                        headers={"Authorization": f"Bearer {world.key}",
                                 "Prefer": "handling=lenient"})  # fmt: skip
    assert lenient.status_code == 200 and lenient.json()["total"] == 13 + 2
    [own] = [link["url"] for link in lenient.json()["link"] if link["relation"] == "self"]
    assert "name" not in own and own == f"{world.api.url}/fhir/Patient?_count=1&_offset=0"


@pytest.mark.security
def test_urls_come_from_the_public_url_and_answers_are_private_and_echo_nothing(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    patient_id, _ = world.fullest()
    forged = {"Authorization": f"Bearer {world.key}", "Host": "evil.example"}
    bundle = httpx.get(f"{world.api.url}/fhir/Condition", params={"patient": patient_id},
                       headers=forged).json()  # fmt: skip
    metadata = httpx.get(f"{world.api.url}/fhir/metadata", headers=forged).json()
    urls = [link["url"] for link in bundle["link"]] + [e["fullUrl"] for e in bundle["entry"]]
    urls.append(metadata["implementation"]["url"])
    assert urls and all(url.startswith(f"{world.api.url}/fhir") for url in urls)
    read = world.get(f"Patient/{patient_id}")
    assert read.headers["cache-control"] == "no-store"
    assert read.headers["x-content-type-options"] == "nosniff"
    long_id = "hx_" + "9" * 20_000
    caplog.set_level("WARNING", logger="patient_delivery.access")
    missing = world.get(f"Patient/{long_id}")
    assert missing.status_code == 404 and "999" not in missing.text
    assert missing.headers["cache-control"] == "no-store"
    assert world.get(f"Patient/{patient_id}", key="pdk_wrong").status_code == 401
    refused = [r.getMessage() for r in caplog.records if r.name == "patient_delivery.access"]
    key_id = authenticate(world.store, world.key).key_id  # type: ignore[union-attr]
    assert f"refused 404 GET /fhir/Patient/{{patient_id}} key=api-key:{key_id}" in refused
    assert "refused 401 GET /fhir/Patient/{patient_id} key=-" in refused
    assert not any(patient_id in line or "999" in line for line in refused)


@pytest.mark.security
def test_one_organization_cannot_fill_the_mcp_session_table(world: World) -> None:
    capped = ApiServer(world.store, mcp_sessions=2)
    try:
        first, second = _initialize(capped.url, world.key), _initialize(capped.url, world.key)
        assert (first.status_code, second.status_code) == (200, 200)
        third = _initialize(capped.url, world.key)
        assert third.status_code == 429
        assert "2 open MCP sessions, the most it may have" in third.json()["error"]["message"]
        # the others are not locked out
        assert _initialize(capped.url, world.other_key).status_code == 200
        assert _end(capped.url, first.headers["mcp-session-id"], world.key).status_code < 300
        assert _initialize(capped.url, world.key).status_code == 200  # a place again
    finally:
        capped.stop()


def _initialize(url: str, key: str) -> httpx.Response:
    message = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "tests", "version": "1"}}}  # fmt: skip
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"}
    return httpx.post(f"{url}/mcp", json=message, timeout=30, headers=headers)


def _end(url: str, session: str, key: str | None) -> httpx.Response:
    headers = {"mcp-session-id": session, "Accept": "application/json, text/event-stream"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.delete(f"{url}/mcp", headers=headers, timeout=30)


@pytest.mark.security
def test_concurrent_initializes_cannot_overshoot_the_mcp_session_cap(world: World) -> None:
    from concurrent.futures import ThreadPoolExecutor

    capped = ApiServer(world.store, mcp_sessions=3)
    try:
        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(lambda _: _initialize(capped.url, world.key), range(40)))
        statuses = sorted(answer.status_code for answer in answers)
        assert statuses == [200] * 3 + [429] * 37
    finally:
        capped.stop()


@pytest.mark.security
def test_only_the_owner_ending_a_session_frees_its_place(world: World) -> None:
    """A DELETE without a key, or with another organization's, neither ends the session nor
    frees its place in the count; the owner's DELETE does both."""
    capped = ApiServer(world.store, mcp_sessions=2)
    try:
        sessions = [_initialize(capped.url, world.key).headers["mcp-session-id"] for _ in "ab"]
        assert _initialize(capped.url, world.key).status_code == 429
        for stranger in (None, world.other_key, "pdk_not-a-key"):
            assert _end(capped.url, sessions[0], stranger).status_code >= 400
            assert _initialize(capped.url, world.key).status_code == 429, stranger
        assert _end(capped.url, sessions[0], world.key).status_code < 300
        assert _initialize(capped.url, world.key).status_code == 200
        assert _initialize(capped.url, world.key).status_code == 429
    finally:
        capped.stop()
