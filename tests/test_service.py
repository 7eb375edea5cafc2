"""Run as a service: a real `prefect server start`, `prefect deploy --all`, a process worker.

Everything here goes through subprocesses and the CLIs an operator would use, against a server
of the test's own (separate from the in-process test harness of the other tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select

from loopback.servers import PrefectServer
from patient_delivery.flows import handover
from patient_delivery.store import open_store
from patient_delivery.store.models import Patient
from tests.faults import REPORT, check_invariant, sigkill_once_files_arrive
from tests.test_local_destination import FolderRemote

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.xdist_group("prefect-service")
"""One pytest-xdist worker runs them all, so one Prefect server and one `prefect deploy` serve
them (the largest groups go to different workers: `--dist loadgroup` orders them by size)."""


class PrefectApi(httpx.Client):
    """The server's REST API, asked as Prefect's own client asks it: a 503 (the server's answer
    while its SQLite database is busy) is asked again after a pause, a few times."""

    def send(self, request: httpx.Request, **kwargs: object) -> httpx.Response:
        for pause in (0.5, 1, 2, 4, 8):
            response = super().send(request, **kwargs)  # type: ignore[arg-type]
            if response.status_code != 503:
                return response
            response.close()
            time.sleep(pause)
        return super().send(request, **kwargs)  # type: ignore[arg-type]


api = PrefectApi()
CCDA = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>service</title></ClinicalDocument>'


@pytest.fixture(scope="module")
def server() -> Iterator[PrefectServer]:
    running = PrefectServer()
    yield running
    running.stop()


@pytest.fixture
def env(server: PrefectServer, tmp_path: Path) -> dict[str, str]:
    return {
        **server.client_env(),
        "PATIENT_DELIVERY_HOME": str(tmp_path / "home"),
        "PATIENT_DELIVERY_STORE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "PATIENT_DELIVERY_CHECKOUT": str(ROOT),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "0",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }


def run(env: dict[str, str], *command: str, input: bytes | None = None) -> str:
    done = subprocess.run(
        command, env=env, cwd=ROOT, input=input, capture_output=True, timeout=300, check=False
    )
    assert done.returncode == 0, (
        command,
        done.stdout.decode()[-3000:],
        done.stderr.decode()[-3000:],
    )
    return done.stdout.decode()


def cli(env: dict[str, str], *args: str, input: bytes | None = None) -> str:
    return run(env, str(BIN / "patient-delivery"), *args, input=input)


def prefect(env: dict[str, str], *args: str) -> str:
    return run(env, sys.executable, "-m", "prefect", *args)


def project_with_folder(
    env: dict[str, str], name: str, root: Path, external_id: str | None = None, *options: str
) -> str:
    """Organization acme, project study, one patient, subscribed to a new local folder block
    (created with `options`); returns the patient's ID."""
    cli(env, "org", "add", "Acme", "--id", "acme")
    cli(env, "project", "add", "acme", "Study", "--id", "study")
    patient_options = ["--external-id", external_id] if external_id else []
    patient = cli(env, "patient", "add", "study", *patient_options).strip()
    cli(env, "destination", "local", name, "--root", str(root), *options)
    cli(env, "subscribe", "study", f"local-destination/{name}")
    return patient


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop a process and its children; SIGKILL after 5 s (a process worker may ignore SIGTERM)."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def deployments(server: PrefectServer) -> dict[str, dict]:
    response = api.post(f"{server.url}/deployments/filter", json={}, timeout=30)
    response.raise_for_status()
    return {d["name"]: d for d in response.json()}


def wait_for_run(server: PrefectServer, run_id: str, seconds: float = 120) -> str:
    deadline = time.monotonic() + seconds
    state = "PENDING"
    while time.monotonic() < deadline:
        run = api.get(f"{server.url}/flow_runs/{run_id}", timeout=30).json()
        state = run["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(0.5)
    return state


@pytest.fixture(scope="module")
def deployed(server: PrefectServer, tmp_path_factory: pytest.TempPathFactory) -> PrefectServer:
    """The block types, the work pool and every deployment of prefect.yaml, as an operator
    creates them (the README's commands)."""
    env = {**server.client_env(), "PATIENT_DELIVERY_CHECKOUT": str(ROOT),
           "PATIENT_DELIVERY_HOME": str(tmp_path_factory.mktemp("deploy-home"))}  # fmt: skip
    registered = prefect(env, "block", "register", "-m", "patient_delivery.blocks")
    assert "SFTP Destination" in registered and "S3 Destination" in registered, registered
    prefect(env, "work-pool", "create", "patient-delivery", "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--all")
    return server


def schedules_active(server: PrefectServer, deployment: dict, active: bool) -> bool:
    """Turn a deployment's schedules on or off, and when off, delete the runs they scheduled;
    returns whether they were on. A scheduled run going when a test's trigger fires would take
    the trigger's work, and its one-at-a-time slot would cancel the triggered run: correct, but
    not what the test is about."""
    was = all(schedule["active"] for schedule in deployment["schedules"])
    for schedule in deployment["schedules"]:
        answer = api.patch(f"{server.url}/deployments/{deployment['id']}/schedules/"
                           f"{schedule['id']}", json={"active": active}, timeout=30)  # fmt: skip
        answer.raise_for_status()
    if not active:  # runs already due wait for a worker (Late); one starting would take them
        late = api.post(f"{server.url}/flow_runs/filter", timeout=30, json={
            "deployments": {"id": {"any_": [deployment["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
        }).json()  # fmt: skip
        for run in late:
            api.delete(f"{server.url}/flow_runs/{run['id']}", timeout=30).raise_for_status()
    return was


def settled(server: PrefectServer, seconds: float = 90) -> None:
    """Wait until no deployment's run is pending or running (a run lingers for updates after
    its last page): a worker stopped under one would leave it holding the one-at-a-time slot.
    Runs without a deployment are left out: one whose process a test killed stays Running."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        going = api.post(f"{server.url}/flow_runs/filter", timeout=30, json={
            "flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING"]}},
                          "deployment_id": {"is_null_": False}},
        }).json()  # fmt: skip
        if not going:
            return
        time.sleep(0.5)
    raise AssertionError("delivery runs still going")


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "patient-delivery"],
        env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    time.sleep(3)  # the worker registers with the pool
    return worker


def test_deployments_exist_and_an_update_event_gets_the_document_delivered(
    deployed: PrefectServer, env: dict[str, str], tmp_path: Path
) -> None:
    found = deployments(deployed)
    assert set(found) >= {"deliver-updates", "deliver-now", "redeliver", "backfill"}
    crons = [s["schedule"].get("cron") for s in found["deliver-updates"]["schedules"]]
    assert crons == ["*/5 * * * *"]
    assert found["deliver-updates"]["global_concurrency_limit"]["limit"] == 1
    assert found["deliver-updates"]["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"

    root = tmp_path / "org-folder"
    patient = project_with_folder(env, "service-folder", root)

    worker = start_worker(env, tmp_path / "worker.log")
    try:
        cli(env, "document", "put", patient, "ccda", "-", input=CCDA)
        sent = time.monotonic()
        deadline = sent + 120
        delivered: list[Path] = []
        while time.monotonic() < deadline and not delivered:
            delivered = [p for p in root.rglob("*.xml")] if root.exists() else []
            time.sleep(0.1)
        latency = time.monotonic() - sent
        assert delivered, (tmp_path / "worker.log").read_text()[-3000:]
        assert delivered[0].read_bytes() == CCDA
        print(f"\nevent to file through a process worker: {latency:.1f} s")

        started = cli(env, "backfill", "--project", "study", "--force", "--dry-run", "--deployment")
        first, address = started.splitlines()
        assert first.startswith("started backfill/backfill: flow run")
        run_id = first.rsplit("(", 1)[1].rstrip(")")
        assert address.endswith(f"/runs/flow-run/{run_id}")
        state = wait_for_run(deployed, run_id)
        assert state == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
        named = api.get(f"{deployed.url}/flow_runs/{run_id}", timeout=30).json()["name"]
        assert named == "backfill study (dry run), on demand"  # what it does, who started it
        artifacts = api.post(f"{deployed.url}/artifacts/filter", timeout=30, json={
            "artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": ["backfill-plan"]}}
        }).json()  # fmt: skip
        assert "nothing sent: 1 resend" in artifacts[0]["description"]
        assert len(delivered) == len(list(root.rglob("*.xml")))  # a dry run sent nothing

        watched = cli(env, "deliver", "--deployment", "--watch", "--name", "nightly fix")
        ended = watched.splitlines()[-1]  # the state and the run's headline, not "None"
        assert ended.startswith("Completed: Delivery run: ") and " delivered, " in ended
        watched_id = watched.splitlines()[0].rsplit("(", 1)[1].rstrip(")")
        named = api.get(f"{deployed.url}/flow_runs/{watched_id}", timeout=30).json()["name"]
        assert named == "nightly fix"  # a name given by a person is kept
        settled(deployed)
    finally:
        stop_group(worker)


def test_a_burst_of_updates_starts_one_or_two_runs_and_each_document_arrives_once(
    deployed: PrefectServer, env: dict[str, str], tmp_path: Path
) -> None:
    root = tmp_path / "org-folder"
    project_with_folder(env, "burst-folder", root)
    files = []
    for i in range(50):  # one import: 50 patients' updates, 50 events within a second or two
        files.append(tmp_path / f"burst-{i}.xml")
        files[-1].write_bytes(CCDA.replace(b"service", f"burst {i}".encode()))
    updates = deployments(deployed)["deliver-updates"]
    every_5_minutes = schedules_active(deployed, updates, False)  # only the trigger starts runs
    settled(deployed)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        started = time.time()
        cli(env, "import", "ccda", *map(str, files), "--project", "study")
        deadline = time.monotonic() + 240
        while len(list(root.rglob("*.xml"))) < 50 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(15)  # past the trigger's window: any run it would still start has started
        settled(deployed)  # and the runs it started have ended (they linger 15 s)
        runs = api.post(f"{deployed.url}/flow_runs/filter", timeout=30, json={
            "deployments": {"id": {"any_": [updates["id"]]}},
            "flow_runs": {"expected_start_time": {"after_": _iso(started)}},
        }).json()  # fmt: skip
    finally:
        stop_group(worker)
        schedules_active(deployed, updates, every_5_minutes)
    triggered = [run for run in runs if not run["auto_scheduled"]]
    assert 1 <= len(triggered) <= 2, [(r["name"], r["state"]["type"]) for r in triggered]
    ran = [run["name"] for run in triggered if run["state"]["type"] == "COMPLETED"]
    states = [(r["name"], r["state"]["type"], r["state"].get("message")) for r in triggered]
    arrived = len(list(root.rglob("*.xml")))
    assert ran and set(ran) == {"deliver all-projects, trigger: patient data updated"}, (
        states,
        f"{arrived} of 50 files arrived",
        (tmp_path / "worker.log").read_text()[-3000:],
    )
    delivered = sorted(p.read_bytes() for p in root.rglob("*.xml"))
    assert delivered == sorted(f.read_bytes() for f in files)  # each once, nothing else
    ledger = json.loads(cli(env, "deliveries", "--json"))["deliveries"]
    assert sorted(row["status"] for row in ledger) == ["delivered"] * 50
    print(f"\n50 updates in one import: {len(triggered)} triggered run(s)")


def save_block_as_the_ui_does(server: PrefectServer, slug: str, name: str, data: dict) -> None:
    """What the Prefect UI's block form sends on Save: the values as typed, no model in between."""
    kind = api.get(f"{server.url}/block_types/slug/{slug}", timeout=30).json()
    [schema] = api.post(f"{server.url}/block_schemas/filter", timeout=30, json={
        "block_schemas": {"block_type_id": {"any_": [kind["id"]]}}, "limit": 1,
    }).json()  # fmt: skip
    saved = api.post(f"{server.url}/block_documents/", timeout=30, json={
        "name": name, "data": data, "block_schema_id": schema["id"], "block_type_id": kind["id"],
    })  # fmt: skip
    assert saved.status_code == 201, saved.text  # Prefect stores it: nothing checks the rules


def test_the_block_schema_carries_the_rules_a_form_can_check(deployed: PrefectServer) -> None:
    """The schema Prefect serves for our blocks holds each rule JSON Schema can say (a pattern
    for the templates and the root), and Prefect's own validation, the one its forms call,
    refuses the values the UI stored above; the same rules pass every default."""

    def refused(values: dict, slug: str = "local-destination") -> set[str]:
        kind = api.get(f"{deployed.url}/block_types/slug/{slug}", timeout=30).json()
        [schema] = api.post(f"{deployed.url}/block_schemas/filter", timeout=30, json={
            "block_schemas": {"block_type_id": {"any_": [kind["id"]]}}, "limit": 1,
        }).json()  # fmt: skip
        answer = api.post(f"{deployed.url}/ui/schemas/validate", timeout=30,
                            json={"schema": schema["fields"], "values": values}).json()  # fmt: skip
        return {error["property"] for error in answer["errors"]}

    typed = {"root": "relative/folder", "path_template": "/{orgId}/{bogus}/../x",
             "manifest_template": "{orgId}/manifest.json"}  # fmt: skip
    assert refused(typed) == {"root", "path_template", "manifest_template"}
    assert refused({"root": "/srv/org"}) == set()  # the defaults pass
    assert refused({"root": "~/org", "manifest_template": ""}) == set()  # empty: no manifests
    sftp = {"host": "sftp.example", "username": "u", "host_keys": "SHA256:x"}
    assert "root" in refused({**sftp, "root": "../outside"}, "sftp-destination")
    assert "root" not in refused({**sftp, "root": "/incoming"}, "sftp-destination")
    # Host keys are typed one per line into a text box, not as a JSON list; blank is refused.
    assert refused({**sftp, "host_keys": "SHA256:x\nSHA256:y"}, "sftp-destination") == set()
    assert refused({**sftp, "host_keys": " \n"}, "sftp-destination") == {"host_keys"}


def test_the_run_forms_take_the_clis_options_each_typed(deployed: PrefectServer) -> None:
    """The Run form of a deployment shows each option of its CLI command under the same name,
    as a typed field (a date picker, a multi-select of data types), never a choice between a
    type and null; Prefect's validation, the one the form calls, refuses a data type we lack."""
    import typer.main

    from patient_delivery.cli import app

    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}  # type: ignore[attr-defined]
    found = deployments(deployed)
    for deployment, command in (("backfill", "backfill"), ("redeliver", "redeliver"),
                                ("deliver-now", "deliver")):  # fmt: skip
        schema = found[deployment]["parameter_openapi_schema"]
        fields = schema["properties"]
        assert all("type" in field and "anyOf" not in field for field in fields.values()), fields
        options = {p.opts[0].removeprefix("--").replace("-", "_")
                   for p in commands[command].params if p.opts[0].startswith("--")}  # fmt: skip
        options -= {"deployment", "watch", "name", "dask"}  # how to run, not what
        assert options <= set(fields), (deployment, options - set(fields))
        if deployment != "redeliver":
            assert fields["data_type"]["items"]["enum"] == ["ccda", "fhir"]
        answer = api.post(f"{deployed.url}/ui/schemas/validate", timeout=30, json={
            "schema": schema, "values": {"project": "study", "data_type": ["pdf"]}
            if deployment != "redeliver" else {"project": 7},
        }).json()  # fmt: skip
        assert [e["property"] for e in answer["errors"]] in (["data_type"], ["project"]), answer
    backfill = found["backfill"]["parameter_openapi_schema"]["properties"]
    assert backfill["created_from"]["format"] == backfill["created_to"]["format"] == "date-time"


def test_destinations_saved_from_the_ui_are_checked_at_once_a_run_per_burst(
    deployed: PrefectServer, env: dict[str, str], tmp_path: Path
) -> None:
    """The UI's form stores a template with an unknown variable and a '..' folder, and a
    relative root; the check run started by the save fails naming both fields (not their
    values) and raises the "unusable" event. Valid blocks saved the same way pass, among them
    an SFTP block whose two pinned host keys were typed one per line. A burst of 40 saves
    starts a run per 10 s window, not one per save, and each checks every block of its window
    (a second bad block, saved late in the burst, is found too)."""
    since = _iso(time.time() - 1)
    check = deployments(deployed)["check-destination"]["id"]
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        began = time.monotonic()
        save_block_as_the_ui_does(deployed, "local-destination", "typed-in-ui", {
            "root": "relative/folder", "path_template": "/{orgId}/{bogus}/../x",
        })  # fmt: skip
        save_block_as_the_ui_does(deployed, "sftp-destination", "pins-in-ui", {
            "host": "sftp.example", "username": "u", "password": "p",
            "host_keys": f"SHA256:{'A' * 43}\n  [sftp.example]:22 ssh-ed25519 {'B' * 68}\n",
        })  # fmt: skip
        for i in range(37):
            save_block_as_the_ui_does(deployed, "local-destination", f"fine-{i}", {
                "root": str(tmp_path / f"fine-{i}"),
            })  # fmt: skip
        save_block_as_the_ui_does(deployed, "local-destination", "late-and-bad", {
            "root": "also/relative",
        })  # fmt: skip
        saving = time.monotonic() - began
        time.sleep(12)  # past the last window: every run its trigger starts has been asked for
        settled(deployed, seconds=120)
        runs = api.post(f"{deployed.url}/flow_runs/filter", timeout=30, json={
            "deployments": {"id": {"any_": [check]}},
            "flow_runs": {"expected_start_time": {"after_": since}},
            "sort": "EXPECTED_START_TIME_ASC",
        }).json()  # fmt: skip
    finally:
        stop_group(worker)
    log = (tmp_path / "worker.log").read_text()[-3000:]
    print(f"\n40 saves in {saving:.1f} s: {len(runs)} check run(s)")
    assert 1 <= len(runs) <= saving // 10 + 2, [r["name"] for r in runs]  # a run per window
    assert {r["state"]["type"] for r in runs} <= {"COMPLETED", "FAILED"}, log
    first = runs[0]
    assert first["name"] == "check local-destination/typed-in-ui"
    assert first["state"]["type"] == "FAILED", log
    message = first["state"]["message"]
    assert "local-destination/typed-in-ui is invalid: " in message, message
    assert "root: must be an absolute folder" in message and "path_template: " in message, message
    assert "relative/folder" not in message and "../x" not in message  # fields, not values
    failed = " ".join(r["state"]["message"] for r in runs if r["state"]["type"] == "FAILED")
    assert "local-destination/late-and-bad is invalid: root: must be an absolute folder" in failed
    assert "fine-" not in failed and "pins-in-ui" not in failed  # the valid ones passed
    announced: list[str] = []
    deadline = time.monotonic() + 60  # the server stores events a moment after taking them
    while len(set(announced)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        events = api.post(f"{deployed.url}/events/filter", timeout=30, json={
            "filter": {"event": {"name": ["patient-delivery.destination.unusable"]},
                       "occurred": {"since": since}},
        }).json()["events"]  # fmt: skip
        announced = [e["resource"]["prefect.resource.name"] for e in events]
    assert set(announced) == {"local-destination/late-and-bad", "local-destination/typed-in-ui"}


def _iso(moment: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(moment, UTC).isoformat()


def test_commands_exit_with_their_events_sent_and_seed_announces_what_it_stores(
    server: PrefectServer, env: dict[str, str], tmp_path: Path
) -> None:
    """No "Still processing items" as a command exits: its events were sent before. Each seeded
    document is announced like any other ingest (two per patient)."""
    patient = project_with_folder(env, "events-folder", tmp_path / "org-folder")
    since = _iso(time.time() - 1)
    commands = [
        ("document", "put", patient, "ccda", "-"),
        ("seed", "--project", "study", "--patients", "3"),
    ]
    for command in commands:
        done = subprocess.run(
            [str(BIN / "patient-delivery"), *command], env=env, cwd=ROOT, input=CCDA,
            capture_output=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        assert b"Still processing" not in done.stderr, done.stderr.decode()[-3000:]
        assert b"warning" not in done.stderr, done.stderr.decode()[-3000:]
    with open_store(env["PATIENT_DELIVERY_STORE_URL"]).session() as session:
        seeded = set(session.scalars(select(Patient.id))) - {patient}
    assert len(seeded) == 3
    announced: list[str] = []
    deadline = time.monotonic() + 60  # the server stores events a moment after taking them
    while len(announced) < 7 and time.monotonic() < deadline:
        time.sleep(0.5)
        page = api.post(f"{server.url}/events/filter", timeout=30, json={
            "filter": {"event": {"name": ["patient.data.updated"]},
                       "occurred": {"since": since}, "order": "ASC"},
            "limit": 50,
        }).json()  # fmt: skip
        announced = [event["resource"]["prefect.resource.id"] for event in page["events"]]
    expected = [f"patient-delivery.patient.{patient}"] + [
        f"patient-delivery.patient.{p}" for p in sorted(seeded) for _ in ("ccda", "fhir")
    ]
    assert sorted(announced) == sorted(expected)


def start_listener(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`patient-delivery listen`, once it says it listens (its output appended to `log`)."""
    ready_before = log.read_text().count("listening") if log.exists() else 0
    listener = subprocess.Popen(
        [str(BIN / "patient-delivery"), "listen"], env=env, cwd=ROOT, stdout=log.open("ab"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while log.read_text().count("listening") < 1 + ready_before and time.monotonic() < deadline:
        time.sleep(0.1)
    return listener


def automation_states(server: PrefectServer) -> dict[str, bool]:
    """Each automation's name and whether it is enabled."""
    automations = api.post(f"{server.url}/automations/filter", json={}, timeout=30).json()
    return {a["name"]: a["enabled"] for a in automations}


def test_the_listener_delivers_within_seconds_in_one_run_per_burst_and_no_idle_run(
    deployed: PrefectServer, env: dict[str, str], tmp_path: Path
) -> None:
    """The documented setup with `listen`: it pauses the deployment's update trigger while it
    runs, so an update starts one run (in the listener's warm process), never a worker run
    too; the trigger is back when the listener stops, or falls silent (killed)."""
    trigger, fallback = "patient data updated", handover.FALLBACK
    updates = deployments(deployed)["deliver-updates"]
    every_5_minutes = schedules_active(deployed, updates, False)
    root = tmp_path / "org-folder"
    patient = project_with_folder(env, "listener-folder", root)
    env = {**env, "PATIENT_DELIVERY_LISTENER_SILENT_SECONDS": "15"}
    log = tmp_path / "listener.log"
    started = time.time()
    listener = start_listener(env, log)
    try:
        assert "listening" in log.read_text(), log.read_text()[-3000:]
        deadline = time.monotonic() + 30
        while automation_states(deployed).get(trigger) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert automation_states(deployed)[trigger] is False  # the listener holds it
        assert automation_states(deployed)[fallback] is True

        cli(env, "document", "put", patient, "ccda", "-", input=CCDA)
        sent = time.monotonic()
        while not list(root.rglob("*.xml")) and time.monotonic() < sent + 60:
            time.sleep(0.05)
        latency = time.monotonic() - sent
        assert [p.read_bytes() for p in root.rglob("*.xml")] == [CCDA], log.read_text()[-3000:]
        print(f"\nevent to file through the listener: {latency:.2f} s")

        files = []
        for i in range(30):  # one import: 30 patients' updates announced within milliseconds
            files.append(tmp_path / f"burst-{i}.xml")
            files[-1].write_bytes(CCDA.replace(b"service", f"burst {i}".encode()))
        cli(env, "import", "ccda", *map(str, files), "--project", "study")
        deadline = time.monotonic() + 60
        while len(list(root.rglob("*.xml"))) < 31 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(list(root.rglob("*.xml"))) == 31
        time.sleep(2)  # any run the burst's last events would start has started
        listening = {"flows": {"name": {"any_": ["deliver-updates"]}}, "flow_runs": {
            "deployment_id": {"is_null_": True}, "start_time": {"after_": _iso(started)},
            "state": {"type": {"any_": ["PENDING", "RUNNING"]}}}}  # fmt: skip
        deadline = time.monotonic() + 60
        while api.post(f"{deployed.url}/flow_runs/filter", json=listening, timeout=30).json():
            assert time.monotonic() < deadline, "the listener's runs did not end"
            time.sleep(0.2)
    finally:
        stop_group(listener)  # SIGTERM: it gives the trigger back as it stops
    given_back = automation_states(deployed)
    assert (given_back[trigger], given_back[fallback]) == (True, False)
    by_workers = api.post(f"{deployed.url}/flow_runs/filter", timeout=30, json={
        "deployments": {"id": {"any_": [updates["id"]]}},
        "flow_runs": {"expected_start_time": {"after_": _iso(started)}},
    }).json()  # fmt: skip
    assert by_workers == []  # the trigger asked for no run while the listener delivered
    by_listener = api.post(f"{deployed.url}/flow_runs/filter", timeout=30, json={
        "flows": {"name": {"any_": ["deliver-updates"]}},
        "flow_runs": {"deployment_id": {"is_null_": True},
                      "start_time": {"after_": _iso(started)}},
    }).json()  # fmt: skip
    ledger = json.loads(cli(env, "deliveries", "--json"))["deliveries"]
    assert sorted(row["status"] for row in ledger) == ["delivered"] * 31
    delivering = {row["flow_run_id"] for row in ledger}
    assert {run["id"] for run in by_listener} == delivering  # none idle
    assert len(by_listener) == 2, [run["name"] for run in by_listener]  # one update, one burst

    listener = start_listener(env, log)  # again, then killed: Prefect resumes the trigger
    try:
        deadline = time.monotonic() + 30
        while automation_states(deployed)[trigger] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert automation_states(deployed)[trigger] is False
    finally:
        os.killpg(listener.pid, signal.SIGKILL)
        listener.wait()
    killed = time.monotonic()
    while not automation_states(deployed)[trigger] and time.monotonic() < killed + 60:
        time.sleep(0.5)
    states = automation_states(deployed)
    schedules_active(deployed, updates, every_5_minutes)
    assert states[trigger] is True, "the fallback did not resume the update trigger"
    print(f"trigger resumed {time.monotonic() - killed:.0f} s after the listener was killed")
    deadline = time.monotonic() + 15
    while automation_states(deployed)[fallback] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert automation_states(deployed)[fallback] is False  # it fired once and paused itself


def test_a_failed_run_sends_an_alert_through_the_installed_automation(
    server: PrefectServer, env: dict[str, str], tmp_path: Path
) -> None:
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            received.append(json.loads(self.rfile.read(length) or b"{}"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{hook.server_address[1]}/alert"
        run(env, sys.executable, "-c", (
            "from prefect.blocks.notifications import CustomWebhookNotificationBlock as W;"
            f"W(name='ops', url='{url}', json_data={{'subject': '{{{{subject}}}}', "
            "'body': '{{body}}'}).save('ops-hook', overwrite=True)"
        ))  # fmt: skip
        installed = cli(env, "alerts", "install", "--notify", "custom-webhook/ops-hook")
        assert installed.count("created automation") == 7
        retired = "patient delivery destination keeps failing"  # an earlier version's alert
        api.post(f"{server.url}/automations/", timeout=30, json={
            "name": retired, "actions": [{"type": "do-nothing"}],
            "trigger": {"type": "event", "posture": "Reactive", "expect": ["nothing.at.all"],
                        "threshold": 1, "within": 0},
        }).raise_for_status()  # fmt: skip
        again = cli(env, "alerts", "install", "--notify", "custom-webhook/ops-hook")
        assert again.count("updated automation") == 7 and "created" not in again
        assert f"removed retired automation '{retired}'" in again
        assert len(alert_names(server)) == len(set(alert_names(server))) == 7  # one of each
        listed = json.loads(cli(env, "alerts", "list", "--json"))["alerts"]
        assert [(a["installed"], a["enabled"]) for a in listed] == [(True, True)] * 7

        patient = project_with_folder(env, "alert-folder", tmp_path / "org", "../escape",
                                      "--template", "{projectId}/{externalId}")  # fmt: skip
        cli(env, "document", "put", patient, "ccda", "-", input=CCDA)
        failed = subprocess.run([str(BIN / "patient-delivery"), "deliver"], env=env, cwd=ROOT,
                                capture_output=True, timeout=300, check=False)  # fmt: skip
        assert failed.returncode == 1

        deadline = time.monotonic() + 90
        while not received and time.monotonic() < deadline:
            time.sleep(0.5)
        assert received, "no alert arrived"
        alert = json.dumps(received[0])
        assert "failed" in alert and "1 of 1 deliveries failed" in alert
        assert "service" not in alert and "escape" not in alert  # no content, no externalId
        assert "removed 7 automation(s)" in cli(env, "alerts", "remove")
        assert alert_names(server) == []
        assert "no" in cli(env, "alerts", "list")
        missing = subprocess.run(
            [str(BIN / "patient-delivery"), "alerts", "install", "--notify", "slack-webhook/none"],
            env=env, cwd=ROOT, capture_output=True, timeout=300, check=False,
        )  # fmt: skip
        assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1, missing.stderr
        assert b"no notification block slack-webhook/none" in missing.stderr
    finally:
        hook.shutdown()


def alert_names(server: PrefectServer) -> list[str]:
    """The names of our alert automations on the server (not the deployments' triggers)."""
    automations = api.post(f"{server.url}/automations/filter", json={}, timeout=30).json()
    return [a["name"] for a in automations if a["name"].startswith("patient delivery ")]


def test_a_delivery_killed_mid_run_is_completed_by_the_next_at_the_same_paths(
    server: PrefectServer, env: dict[str, str], tmp_path: Path
) -> None:
    import sqlite3

    env = {**env, "PATIENT_DELIVERY_LEASE_SECONDS": "5"}
    cli(env, "org", "add", "Acme", "--id", "acme")
    cli(env, "project", "add", "acme", "Study", "--id", "study")
    cli(env, "seed", "--project", "study", "--patients", "200")
    root = tmp_path / "org-folder"
    cli(env, "destination", "local", "kill-folder", "--root", str(root), "--max-connections", "1")
    cli(env, "subscribe", "study", "local-destination/kill-folder")
    victim = subprocess.Popen(
        [str(BIN / "patient-delivery"), "deliver", "--batch-size", "20"], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    database = sqlite3.connect(tmp_path / "store.db")
    pending = "SELECT count(*) FROM deliveries WHERE status = 'pending'"
    sigkill_once_files_arrive(victim, root, 50, lambda: database.execute(pending).fetchone()[0] > 0)
    before = dict(database.execute("SELECT status, count(*) FROM deliveries GROUP BY status"))
    rendered = dict(database.execute("SELECT id, path FROM deliveries WHERE path IS NOT NULL"))
    assert before.get("delivered", 0) < 400 and before.get("pending", 0) > 0, before

    time.sleep(5)  # the killed run's leases run out
    resumed = subprocess.run([str(BIN / "patient-delivery"), "deliver"], env=env, cwd=ROOT,
                             capture_output=True, timeout=300, check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    print(
        f"\nkilled with {before.get('delivered', 0)} of 400 delivered; the next run sent the rest"
    )

    after = dict(database.execute("SELECT status, count(*) FROM deliveries GROUP BY status"))
    assert after == {"delivered": 400}
    paths = dict(database.execute("SELECT id, path FROM deliveries"))
    assert all(paths[i] == path for i, path in rendered.items())  # same paths as first rendered
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                   if p.is_file() and "_manifests" not in p.parts)  # fmt: skip
    assert files == sorted(paths.values())  # each exactly once, nothing partial or temporary
    figures = check_invariant(
        open_store(f"sqlite:///{tmp_path / 'store.db'}"),
        {"local-destination/kill-folder": FolderRemote(root)},
    )
    REPORT.record("delivery process SIGKILLed mid-run (local folder)", figures,
                  {"SIGKILL of the delivery process": 1})  # fmt: skip
    assert (figures.delivered, figures.lost, figures.duplicated, figures.partial) == (400, 0, 0, 0)


def flow_run_processes(run_id: str) -> list[int]:
    """The PIDs of the processes running flow run `run_id` (Prefect puts its ID in their
    environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if f"PREFECT__FLOW_RUN_ID={run_id}".encode() in environ.split(b"\0"):
            found.append(int(proc.name))
    return found


CRASHED_MESSAGE = next(
    action["message"]
    for automation in yaml.safe_load((ROOT / "flows" / "alerts.yaml").read_text())["automations"]
    for action in automation["actions"]
    if action["type"] == "change-flow-run-state"
)


def test_a_run_whose_worker_died_is_crashed_and_the_next_run_is_not_refused(
    deployed: PrefectServer, env: dict[str, str], tmp_path: Path
) -> None:
    """A worker's machine dies under a deliver-updates run (the worker and the run's process
    SIGKILLed): the installed automation marks the run Crashed once its heartbeats stop, so the
    one-at-a-time slot is free and the next update's run delivers, instead of being cancelled
    until Prefect's 5-minute slot lease ends."""
    since = _iso(time.time())
    root = tmp_path / "org-folder"
    patient = project_with_folder(env, "zombie-folder", root)
    run(env, sys.executable, "-c", (
        "from prefect.blocks.notifications import CustomWebhookNotificationBlock as W;"
        "W(name='ops', url='http://127.0.0.1:9/nowhere').save('zombie-hook', overwrite=True)"
    ))  # fmt: skip
    cli(env, "alerts", "install", "--notify", "custom-webhook/zombie-hook")
    updates = deployments(deployed)["deliver-updates"]
    every_5_minutes = schedules_active(deployed, updates, False)
    settled(deployed)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        cli(env, "document", "put", patient, "ccda", "-", input=CCDA)
        deadline = time.monotonic() + 120
        while not list(root.rglob("*.xml")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(root.rglob("*.xml")), (tmp_path / "worker.log").read_text()[-3000:]
        [going] = api.post(f"{deployed.url}/flow_runs/filter", timeout=30, json={
            "deployments": {"id": {"any_": [updates["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}},  # it lingers for more
        }).json()  # fmt: skip
        processes = flow_run_processes(going["id"])
        assert processes
        os.killpg(worker.pid, signal.SIGKILL)
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
    finally:
        stop_group(worker)
    state = wait_for_run(deployed, going["id"], seconds=150)
    crashed_after = time.monotonic() - killed
    ended = api.get(f"{deployed.url}/flow_runs/{going['id']}", timeout=30).json()["state"]
    assert (state, ended["message"]) == ("CRASHED", CRASHED_MESSAGE)  # by the automation
    print(f"\na run whose worker died was Crashed {crashed_after:.0f} s after the kill")

    worker = start_worker(env, tmp_path / "worker-2.log")
    try:
        second = patient_with_document(env, b"after the crash")
        deadline = time.monotonic() + 120
        while len(list(root.rglob("*.xml"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        settled(deployed)
    finally:
        stop_group(worker)
        schedules_active(deployed, updates, every_5_minutes)
        cli(env, "alerts", "remove")
    assert second in {p.read_bytes() for p in root.rglob("*.xml")}  # the next run delivered
    later = api.post(f"{deployed.url}/flow_runs/filter", timeout=30, json={
        "deployments": {"id": {"any_": [updates["id"]]}},
        "flow_runs": {"id": {"not_any_": [going["id"]]},
                      "expected_start_time": {"after_": since}},
    }).json()  # fmt: skip
    assert [r["state"]["type"] for r in later if not r["auto_scheduled"]] == ["COMPLETED"], [
        (r["name"], r["state"]["type"], r["state"].get("message")) for r in later
    ]


def patient_with_document(env: dict[str, str], title: bytes) -> bytes:
    """A new patient of project study with one C-CDA titled `title`; returns its bytes."""
    patient = cli(env, "patient", "add", "study").strip()
    document = CCDA.replace(b"service", title)
    cli(env, "document", "put", patient, "ccda", "-", input=document)
    return document
