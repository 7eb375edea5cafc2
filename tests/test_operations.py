"""Operating it from the shell: subscriptions that cannot dead-end, blocks saved invalid,
one-line refusals, output for scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from patient_delivery.cli import app
from patient_delivery.store import Store
from tests.test_cli import run
from tests.test_deliver_flow import save_as_the_ui_would, save_local

pytestmark = pytest.mark.usefixtures("prefect_api")

runner = CliRunner()
CCDA = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>ops</title></ClinicalDocument>'


def refused(*args: str) -> str:
    """A refusal: exit 2 and one line on stderr."""
    result = runner.invoke(app, list(args), env={"COLUMNS": "80"})
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.output
    return result.stderr


def as_json(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


@pytest.fixture
def study(store: Store) -> str:
    run("org", "add", "Acme", "--id", "acme")
    run("project", "add", "acme", "Study", "--id", "study")
    patient = run("patient", "add", "study").strip()
    run("document", "put", patient, "ccda", "-", input=CCDA)
    return "study"


@pytest.mark.bad_input
def test_a_subscription_to_a_block_that_cannot_be_used_is_refused_and_queues_nothing(
    study: str, tmp_path: Path
) -> None:
    assert "no destination block local-destination/nosuch" in refused(
        "subscribe", study, "local-destination/nosuch"
    )
    assert "block reference" in refused("subscribe", study, "acme-folder")
    assert "unknown destination type 'folder'" in refused("subscribe", study, "folder/acme")
    assert "no project 'nosuch'" in refused("subscribe", "nosuch", save_local(tmp_path / "a"))
    invalid = save_local(tmp_path / "b")
    save_as_the_ui_would(invalid, {"root": "relative", "path_template": "/{orgId}/{bogus}/../x"})
    refusal = refused("subscribe", study, invalid)
    assert f"block {invalid} is invalid: " in refusal
    assert "path_template: " in refusal and "; root: " in refusal
    assert as_json("subscriptions")["subscriptions"] == []
    assert as_json("deliveries")["deliveries"] == []


@pytest.mark.bad_input
def test_a_python_caller_subscribing_meets_the_same_rule(
    store: Store, study: str, tmp_path: Path
) -> None:
    """The rule lives where Python callers meet it, not in the CLI alone."""
    from patient_delivery.blocks import BlockProblem
    from patient_delivery.flows.subscriptions import subscribe

    with pytest.raises(BlockProblem, match="no destination block local-destination/nosuch"):
        subscribe(store, study, "local-destination/nosuch")
    invalid = save_local(tmp_path / "b")
    save_as_the_ui_would(invalid, {"root": "relative"})
    with pytest.raises(BlockProblem, match=f"block {invalid} is invalid: root: "):
        subscribe(store, study, invalid)
    assert as_json("subscriptions")["subscriptions"] == []
    assert subscribe(store, study, save_local(tmp_path / "ok")) == 1  # the document waiting


def test_subscriptions_organizations_and_projects_list_and_an_unsubscribe_withdraws(
    study: str, tmp_path: Path
) -> None:
    destination = save_local(tmp_path / "org")
    assert "1 deliveries queued" in run("subscribe", study, destination)
    [subscription] = as_json("subscriptions", "--project", study)["subscriptions"]
    assert subscription["destination"] == destination
    assert (subscription["queued"], subscription["failed"], subscription["delivered"]) == (1, 0, 0)
    assert subscription["data_types"] == "ccda,fhir"
    assert as_json("org", "list")["organizations"][0] | {"created_at": None} == {
        "org_id": "acme", "org_name": "Acme", "projects": 1, "created_at": None,
    }  # fmt: skip
    [project] = as_json("project", "list", "acme")["projects"]
    assert (project["project_id"], project["patients"], project["destinations"]) == (study, 1, 1)
    assert "acme" in run("org", "list") and "Study" in run("project", "list")

    assert "1 queued deliveries cancelled (superseded)" in run("unsubscribe", study, destination)
    assert as_json("subscriptions")["subscriptions"] == []
    [row] = as_json("deliveries")["deliveries"]
    assert (row["status"], row["last_error"]) == ("superseded", "unsubscribed")
    assert "does not deliver to" in refused("unsubscribe", study, destination)
    run("deliver")
    assert not (tmp_path / "org").exists()


def test_destination_list_shows_a_block_saved_invalid_and_still_lists_the_others(
    tmp_path: Path,
) -> None:
    good = save_local(tmp_path / "good")
    bad = save_local(tmp_path / "bad")
    save_as_the_ui_would(bad, {"root": "relative", "path_template": "/{orgId}/{bogus}/../x"})

    listed = {row["reference"]: row for row in as_json("destination", "list")["destinations"]}
    assert listed[good]["writes_to"] == (tmp_path / "good").as_uri()
    assert listed[good]["problem"] is None
    assert listed[bad]["writes_to"] is None
    assert listed[bad]["problem"].startswith(f"block {bad} is invalid: ")
    assert "path_template: " in listed[bad]["problem"] and "; root: " in listed[bad]["problem"]
    assert "example of a valid" not in listed[bad]["problem"]  # the rule, short
    assert len(listed[bad]["problem"]) < 400 and "{bogus}" in listed[bad]["problem"]
    table = run("destination", "list")
    assert f"INVALID: block {bad} is invalid" in table and (tmp_path / "good").as_uri() in table


@pytest.mark.bad_input
@pytest.mark.parametrize("command", ["show", "test"])
def test_destination_show_and_test_refuse_what_cannot_be_loaded_in_one_line(
    command: str, tmp_path: Path
) -> None:
    bad = save_local(tmp_path / "bad")
    save_as_the_ui_would(bad, {"root": "relative", "path_template": "{bogus}"})
    assert "no destination block local-destination/nosuch" in refused(
        "destination", command, "local-destination/nosuch"
    )
    assert "not a block reference: write TYPE/NAME, e.g. local-destination/acme-folder" in refused(
        "destination", command, "acme-folder"
    )
    assert f"block {bad} is invalid" in refused("destination", command, bad)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["deliveries", "--since", "yesterday"], "--since: not an ISO date or time"),
        (["disclosures", "--until", "soon"], "--until: not an ISO date or time"),
        (["deliveries", "--status", "bogus"], "--status: not a delivery status (one of queued"),
        (["deliver", "--project", "nosuch"], "no project 'nosuch'"),
        (["deliver", "--type", "pdf"], "unknown data type 'pdf'"),
        (["backfill", "--from", "nope"], "--created-from: not an ISO date or time"),
        (["backfill", "--created-to", "1 May"], "--created-to: not an ISO date or time"),
        (["backfill", "--org", "nosuch"], "no organization 'nosuch'"),
        (["redeliver", "--project", "nosuch"], "no project 'nosuch'"),
        (["deliver", "--deployment"], "no deployment deliver-updates/deliver-now"),
    ],
)
def test_every_mistake_a_person_can_make_is_one_line_and_exit_2(
    study: str, args: list[str], says: str
) -> None:
    assert says in refused(*args)


def test_ledger_views_as_json_and_csv_on_stdout_with_full_run_ids(
    study: str, tmp_path: Path
) -> None:
    run("subscribe", study, save_local(tmp_path / "org"))
    run("deliver")
    status = as_json("status")
    [run_row] = status["recent_runs"]
    assert len(run_row["flow_run_id"]) == 36 and run_row["delivered"] == 1
    [delivered] = as_json("deliveries", "--status", "delivered")["deliveries"]
    assert delivered["flow_run_id"] == run_row["flow_run_id"]
    assert delivered["delivered_at"].endswith("+00:00")  # ISO 8601, UTC
    [sent] = as_json("disclosures", "--project", study, "--limit", "5")["disclosures"]
    assert sent["sha256"] == delivered["sha256"] and len(sent["sha256"]) == 64
    assert as_json("disclosures", "--until", "2000-01-01")["disclosures"] == []

    result = runner.invoke(app, ["deliveries", "--csv", "-"])
    assert result.exit_code == 0 and not (Path.cwd() / "-").exists()
    header, row, *rest = result.stdout.splitlines()
    assert header.startswith("delivered_at,status,") and "delivered" in row and rest == []
    assert run_row["flow_run_id"] in run("deliveries")  # the table shows the whole ID
    assert run("--version").startswith("patient-delivery ")


@pytest.mark.bad_input
def test_a_run_for_a_project_that_does_not_exist_is_refused_before_it_starts(
    study: str,
) -> None:
    from patient_delivery.flows.backfill import backfill
    from patient_delivery.flows.deliver import deliver_state

    state = deliver_state(project="nosuch")
    assert state.is_failed() and "no project 'nosuch'" in state.message
    with pytest.raises(Exception, match="no organization 'nobody'"):
        backfill(org="nobody")


def test_our_blocks_load_in_any_flow_of_the_environment_without_importing_the_project(
    tmp_path: Path,
) -> None:
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    reference = save_local(tmp_path / "theirs")
    for own in ("flows", "blocks"):  # a Prefect project's own folders, as is common
        (tmp_path / own).mkdir()
        (tmp_path / own / "__init__.py").write_text("")
    code = (
        "import sys; from prefect.blocks.core import Block; block = Block.load(sys.argv[1]); "
        "print(type(block).__module__, block.describe())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, reference], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}, timeout=300,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["patient_delivery.blocks.local", (tmp_path / "theirs").as_uri()]


def test_prefect_log_lines_go_through_the_progress_bars_console_while_it_shows() -> None:
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from patient_delivery.cli.common import errors
    from patient_delivery.cli.runs import progress_bar

    def handlers() -> list[PrefectConsoleHandler]:
        return [h for h in logging.getLogger().handlers
                if isinstance(h, PrefectConsoleHandler)]  # fmt: skip

    with progress_bar("delivering"):
        assert handlers() and all(h.console is errors for h in handlers())
    assert handlers() and not any(h.console is errors for h in handlers())


def test_the_ui_form_shows_each_destinations_required_fields_first_then_its_own_then_shared() -> (
    None
):
    from patient_delivery.blocks.base import Destination
    from patient_delivery.blocks.local import LocalDestination
    from patient_delivery.blocks.s3 import S3Destination
    from patient_delivery.blocks.sftp import SftpDestination

    expected_first = {
        LocalDestination: ["root"],
        S3Destination: ["bucket_name", "role_arn"],
        SftpDestination: ["host", "username", "host_keys"],
    }
    for kind, first in expected_first.items():
        fields = kind.model_json_schema()["properties"]
        order = sorted(fields, key=lambda name: fields[name]["position"])
        assert order[: len(first)] == first, kind.__name__
        assert sorted(fields[name]["position"] for name in fields) == list(range(len(fields)))
        shared = [name for name in order if name in Destination.model_fields]
        assert order[-len(shared) :] == shared, kind.__name__  # the shared settings come last


@pytest.mark.bad_input
def test_the_ui_form_refuses_a_relative_folder_for_a_local_destination() -> None:
    from pydantic import ValidationError

    from patient_delivery.blocks.local import LocalDestination

    fields = LocalDestination.model_json_schema()["properties"]
    assert fields["root"]["pattern"] == "^[/~]"  # the form's own check
    with pytest.raises(ValidationError, match="must be an absolute folder"):
        LocalDestination(root="relative/folder")
