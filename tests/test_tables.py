"""Tables fit the terminal: at 80, 120 and 200 columns every line fits, each view keeps the
columns that answer its question, IDs are never cut (they are what people paste), names break
only after a `/`, and what is left out is named with the options that show it."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from patient_delivery.cli import app
from patient_delivery.store import Store
from tests.test_cli import CCDA, run

runner = CliRunner()


def shown(width: int, *args: str) -> str:
    result = runner.invoke(app, list(args), env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("width", [80, 120, 200])
def test_each_view_fits_and_keeps_its_first_columns_whole(
    store: Store, tmp_path: Path, width: int
) -> None:
    run("org", "add", "Acme Research Institute", "--id", "acme-research")
    run("project", "add", "acme-research", "Cardiology study", "--id", "cardio")
    patients = []
    for external_id in ("MRN-0", "MRN-1", "MRN-2", "../escapes"):  # the last one fails
        patients.append(run("patient", "add", "cardio", "--external-id", external_id).strip())
        run("document", "put", patients[-1], "ccda", "-", input=CCDA)
    folder = f"acme-research-folder-{width}-{uuid.uuid4().hex[:6]}"
    run(
        "destination",
        "local",
        folder,
        "--root",
        str(tmp_path / "org"),
        "--template",
        "{projectId}/{externalId}/{dataType}",
    )
    run("subscribe", "cardio", f"local-destination/{folder}")
    runner.invoke(app, ["deliver"])  # exit 1: one delivery failed
    run("api-key", "create", "acme-research", "--label", "warehouse")

    views = {
        "deliveries": shown(width, "deliveries"),
        "disclosures": shown(width, "disclosures"),
        "subscriptions": shown(width, "subscriptions"),
        "projects": shown(width, "project", "list"),
        "organizations": shown(width, "org", "list"),
        "failed": shown(width, "deliveries", "--status", "failed"),
        "status": shown(width, "status"),
        "api keys": shown(width, "api-key", "list"),
    }
    for name, out in views.items():
        assert all(len(line) <= width for line in out.splitlines()), (name, out)
    deliveries = views["deliveries"]
    assert deliveries.count("delivered ") >= 3 and "local-destination/" in deliveries
    if width > 80:  # at 80 the patient IDs take the room and the time is named below
        assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", deliveries)  # to the second
    assert not re.search(r":\d\d\.\d{6}", deliveries)  # no microseconds
    assert ("not shown at 80 columns" in deliveries) == (width == 80)
    for header in ("status", "destination"):
        assert header in deliveries

    for name in ("deliveries", "failed"):  # IDs whole, at every width
        assert all(patient in views[name] for patient in patients[:3] if name == "deliveries"), (
            patients,
            views[name],
        )
        assert patients[3] in views["failed"], views["failed"]
        assert "…" not in views[name]
    for name in ("deliveries", "failed", "subscriptions", "status"):  # names break at / or not
        assert folder in views[name], (name, views[name])
    assert (
        "last_error" in views["failed"] and "escapes" not in views["failed"].split("last_error")[0]
    )
    assert "separator" in views["failed"]  # the reason itself, folded, not cut
    for header in ("queued", "failed", "delivered"):
        assert header in views["subscriptions"], views["subscriptions"]
    assert "failed" in views["status"] and "failing_since" in views["status"]
    assert "org_name" in views["organizations"] and "key_id" in views["api keys"]
    for name in ("status",):
        assert "--csv" not in views[name]  # it has no --csv to offer


def test_every_listing_takes_json_and_csv(store: Store, tmp_path: Path) -> None:
    """One name per thing across them: `org_id` for an organization's ID, `org_name` for its
    display name."""
    import csv
    import json

    run("org", "add", "Acme Research", "--id", "acme")
    run("project", "add", "acme", "Study", "--id", "study")
    run("api-key", "create", "acme")
    listings = {
        "organizations": ["org", "list"],
        "projects": ["project", "list"],
        "subscriptions": ["subscriptions"],
        "api_keys": ["api-key", "list"],
        "clients": ["client", "list"],
    }
    for title, command in listings.items():
        rows = json.loads(run(*command, "--json"))[title]
        written = tmp_path / f"{title}.csv"
        run(*command, "--csv", str(written))
        header = next(csv.reader(written.open()))
        assert header and "organization" not in header and "organization_id" not in header
        if rows:
            assert list(rows[0]) == header, title
    [organization] = json.loads(run("org", "list", "--json"))["organizations"]
    assert (organization["org_id"], organization["org_name"]) == ("acme", "Acme Research")
    [key] = json.loads(run("api-key", "list", "--json"))["api_keys"]
    assert key["org_id"] == "acme" and "key" not in key


def test_the_run_summary_breaks_a_destination_only_after_its_slash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from collections import Counter

    from patient_delivery.cli.runs import print_summary
    from patient_delivery.flows.reporting import BatchReport, RunSummary

    monkeypatch.setenv("COLUMNS", "80")
    summary = RunSummary(flow_run_id="175ae172-2e27-4d4c-b016-8d5c9cd37c60")
    summary.add(BatchReport("local-destination/demo-folder", delivered=80, bytes=11_400_000))
    refused = Counter({"cannot reach host (Connection refused)": 2})
    summary.add(BatchReport("sftp-destination/acme-sftp", failed=2, reasons=refused))
    print_summary(summary)
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines()), out
    for part in ("local-destination/", "demo-folder", "sftp-destination/", "acme-sftp",
                 "delivered", "failed", "175ae172-2e27-4d4c-b016-8d5c9cd37c60"):  # fmt: skip
        assert part in out, (part, out)
