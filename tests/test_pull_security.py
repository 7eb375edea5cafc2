"""The pull API as an attacker tries it: a replayed client assertion, a token reaching past its
scopes through another client's export, one organization flooding the exports, a withdrawal
after an export was written, malformed values aiming for a 500, private key parts in a key set,
exports orphaned by a restart, and a CSV path another local user planted."""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jwk
from sqlalchemy import select, update

from patient_delivery import ingest
from patient_delivery.pull import bulk_export, smart
from patient_delivery.pull.export_queue import ExportQueue
from patient_delivery.store import Store
from patient_delivery.store.models import BulkExport, utcnow
from tests.test_bulk_export import call, finished, kick_off
from tests.test_cli import run
from tests.test_pull import ApiServer, World
from tests.test_pull import world as world
from tests.test_smart import Service

pytestmark = pytest.mark.security


def registered(world: World, scopes: str = "system/*.rs") -> Service:
    """A backend service of acme's, registered with `scopes`."""
    service = Service(world.api.url)
    service.client_id = smart.add_client(world.store, "acme", service.jwks(), scopes)
    return service


def test_an_assertion_replayed_after_its_exp_but_within_the_leeway_is_refused(
    world: World,
) -> None:
    service = registered(world)
    assertion = service.assertion(exp=int(time.time()) + 1)
    assert service.ask(assertion).status_code == 200
    time.sleep(2.5)  # past its exp, inside the 30 s leeway: still a valid signature and time
    for _ in range(2):
        replay = service.ask(assertion)
        assert (replay.status_code, replay.json()["error"]) == (401, "invalid_client")
        assert "used before" in replay.json()["error_description"]


def test_export_files_are_served_only_within_the_downloaders_scopes(world: World) -> None:
    everything = registered(world).token()
    started = kick_off(world, everything, "Group/study/$export")
    done = finished(world, everything, started.headers["Content-Location"]).json()
    urls = {entry["type"]: entry["url"] for entry in done["output"]}
    assert {"Patient", "Condition"} <= set(urls)

    patients_only = registered(world).token(scope="system/Patient.rs")
    conditions = call(world, "GET", urls["Condition"], patients_only)
    assert conditions.status_code == 403
    assert conditions.json()["resourceType"] == "OperationOutcome"
    assert "Condition" in conditions.text and 'resourceType":"Observation' not in conditions.text
    assert call(world, "GET", urls["Patient"], patients_only).status_code == 200
    listed = call(world, "GET", started.headers["Content-Location"], patients_only).json()
    assert [entry["type"] for entry in listed["output"]] == ["Patient"]


def test_one_organization_cannot_queue_more_than_its_share_of_exports(world: World) -> None:
    """A flood of kick-offs while the server's writers are busy (here: never write)."""
    world.api.stop()
    world.api = ApiServer(world.store, start_export=lambda export_id: None)
    most = 3  # the default `exports_per_organization`
    answers = [kick_off(world, world.key, "Patient/$export") for _ in range(12)]
    accepted = [a for a in answers if a.status_code == 202]
    refused = [a for a in answers if a.status_code == 429]
    assert (len(accepted), len(refused)) == (most, len(answers) - most)
    for answer in refused:
        assert int(answer.headers["Retry-After"]) > 0
        assert answer.json()["issue"][0]["code"] == "throttled"
    other = kick_off(world, world.other_key, "Patient/$export")
    assert other.status_code == 202  # another organization is not held back by the cap


def test_exports_are_written_organizations_in_turn_not_first_in_first_out(store: Store) -> None:
    """One writer; organization A queues three exports, then B one: B's is written second,
    after A's first, not fourth (within twice its time alone)."""
    for organization in ("a", "b"):
        ingest.add_organization(store, organization.upper(), organization)
    ids = {}
    with store.session() as session:
        for name, organization in (("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b")):
            ids[name] = f"{name}-{os.urandom(4).hex()}"
            session.add(BulkExport(
                id=ids[name], organization_id=organization, accessor="api-key:1",
                types="Patient", request_url="t", status=bulk_export.ACCEPTED,
                heartbeat_at=utcnow(),
            ))  # fmt: skip
    written: list[str] = []
    first_begun, go_on = threading.Event(), threading.Event()
    all_written = threading.Event()

    def write(export_id: str) -> None:
        written.append(export_id)
        if len(written) == 1:
            first_begun.set()
            assert go_on.wait(10)
        if len(written) == 4:
            all_written.set()

    queue = ExportQueue(store, write, writers=1)
    queue.start(ids["a1"])
    assert first_begun.wait(10)  # a1 is being written; the rest arrive meanwhile
    for name in ("a2", "a3", "b1"):
        queue.start(ids[name])
    go_on.set()
    assert all_written.wait(10)
    assert written == [ids["a1"], ids["b1"], ids["a2"], ids["a3"]]


def test_a_patient_who_withdraws_after_an_export_was_written_is_not_served_from_it(
    world: World,
) -> None:
    started = kick_off(world, world.key, "Group/study/$export")
    status_url = started.headers["Content-Location"]
    before = finished(world, world.key, status_url).json()
    assert all("count" in entry for entry in before["output"])
    leaving = sorted(world.patients())[0]
    staying = sorted(world.patients())[-1]
    patient_url = next(e["url"] for e in before["output"] if e["type"] == "Patient")
    assert leaving in call(world, "GET", patient_url, world.key).text

    ingest.unshare_patient(world.store, "study", leaving, recorded_by="test")

    after = call(world, "GET", status_url, world.key).json()
    assert all("count" not in entry for entry in after["output"])  # no longer what is served
    served = ""
    for entry in after["output"]:
        answer = call(world, "GET", entry["url"], world.key)
        assert answer.status_code == 200
        for line in answer.text.splitlines():
            json.loads(line)  # whole lines only
        served += answer.text
    assert leaving not in served
    assert staying in served
    assert world.get(f"Patient/{leaving}").status_code == 404  # as the FHIR API says


def test_since_outside_what_the_store_holds_is_a_400_not_a_500(world: World) -> None:
    for since in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"):
        for path in ("Patient/$export", "Group/study/$export"):
            answer = kick_off(world, world.key, path, _since=since)
            assert answer.status_code == 400, (since, path, answer.text)
            assert answer.json()["resourceType"] == "OperationOutcome"


TIME_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet="0123456789.-e", max_size=24),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(claims=st.fixed_dictionaries({}, optional={"exp": TIME_VALUES, "iat": TIME_VALUES,
                                                  "nbf": TIME_VALUES}))  # fmt: skip
def test_no_claims_of_a_correctly_signed_assertion_make_the_token_endpoint_fail(
    world: World, claims: dict[str, Any]
) -> None:
    service = _service(world)
    answer = service.ask(service.assertion(**claims))
    assert answer.status_code in (200, 400, 401), (claims, answer.status_code, answer.text)
    if answer.status_code != 200:
        assert answer.json()["error"] in ("invalid_client", "invalid_request")


def _service(world: World) -> Service:
    """One registered service per test world (Hypothesis calls the test many times)."""
    cached = getattr(world, "_service", None)
    if cached is None:
        cached = registered(world)
        world._service = cached  # type: ignore[attr-defined]
    return cached


KICK_OFF_TEXT = st.text(max_size=40)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    since=st.one_of(st.none(), KICK_OFF_TEXT, st.datetimes(timezones=st.timezones()).map(
        lambda moment: moment.isoformat())),
    types=st.one_of(st.none(), KICK_OFF_TEXT),
    output_format=st.one_of(st.none(), KICK_OFF_TEXT),
    group=st.sampled_from(["Patient", "Group/study", "Group/trial", "Group/%00"]),
)  # fmt: skip
def test_no_kick_off_parameters_make_the_export_endpoint_fail(
    world: World, since: str | None, types: str | None, output_format: str | None, group: str
) -> None:
    params = {name: value for name, value in
              (("_since", since), ("_type", types), ("_outputFormat", output_format))
              if value is not None}  # fmt: skip
    answer = kick_off(world, world.key, f"{group}/$export", **params)
    assert answer.status_code in (202, 400, 403, 404, 429), (params, group, answer.text)
    if answer.status_code == 202:  # not a test of the cap: cancel what was accepted
        call(world, "DELETE", answer.headers["Content-Location"], world.key)
    else:
        assert answer.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "oth", "k"])
def test_a_key_set_with_any_private_member_is_refused(
    world: World, tmp_path: Path, member: str
) -> None:
    private = jwk.RSAKey.generate_key(2048, parameters={"kid": "k"}, private=True).as_dict(
        private=True
    )
    key = {**jwk.RSAKey.import_key(private).as_dict(private=False),
           member: private.get(member, "AQAB")}  # fmt: skip
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [key]}))
    output = run("client", "add", "acme", "--jwks", str(path), code=2)
    assert len(output.strip().splitlines()) == 1 and "private key" in output, output
    assert str(key[member]) not in output  # no key material echoed
    assert smart.list_clients(world.store) == []


def test_exports_accepted_by_a_server_that_stopped_are_taken_up_by_the_next(
    world: World,
) -> None:
    """A server that accepted exports and stopped before writing them (its queue gone with
    it): once they have waited silent for SILENT_SECONDS, the next server writes them."""
    world.api.stop()
    world.api = ApiServer(world.store, start_export=lambda export_id: None)  # never writes
    try:
        status_urls = [kick_off(world, world.key, "Group/study/$export")
                       .headers["Content-Location"] for _ in range(3)]  # fmt: skip
    finally:
        world.api.stop()
    stopped = world.api
    with world.store.session() as session:  # as the store looks SILENT_SECONDS later
        session.execute(update(BulkExport).values(
            heartbeat_at=utcnow() - timedelta(seconds=bulk_export.SILENT_SECONDS + 1)))  # fmt: skip
    world.api = ApiServer(world.store)
    for status_url in status_urls:
        answer = finished(world, world.key, status_url.replace(str(stopped.port),
                                                               str(world.api.port)))  # fmt: skip
        assert answer.status_code == 200, answer.text
        assert answer.json()["output"]
    with world.store.session() as session:
        states = set(session.scalars(select(BulkExport.status)))
    assert states == {bulk_export.COMPLETE}


def test_a_csv_file_is_never_written_through_a_link_or_a_file_already_there(
    store: Store, tmp_path: Path
) -> None:
    theirs = tmp_path / "theirs.txt"
    theirs.write_text("another user's file\n")
    planted = tmp_path / "x.csv"
    planted.symlink_to(theirs)
    refused = run("deliveries", "--csv", str(planted), code=2)
    assert len(refused.strip().splitlines()) == 1 and "--overwrite" in refused
    assert theirs.read_text() == "another user's file\n" and planted.is_symlink()

    run("deliveries", "--csv", str(planted), "--overwrite")  # replaces the link itself
    assert theirs.read_text() == "another user's file\n"
    assert not planted.is_symlink() and planted.read_text().count("\n") >= 1  # the header
    assert oct(planted.stat().st_mode & 0o777) == oct(0o600)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
