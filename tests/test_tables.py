"""Tables fit the terminal: at 80 and 120 columns every line fits, the columns that matter come
first and whole (status, destination, times to the second), and what is left out is named."""

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
@pytest.mark.parametrize("width", [80, 120])
def test_each_view_fits_and_keeps_its_first_columns_whole(
    store: Store, tmp_path: Path, width: int
) -> None:
    run("org", "add", "Acme Research Institute", "--id", "acme-research")
    run("project", "add", "acme-research", "Cardiology study", "--id", "cardio")
    for number in range(3):
        patient = run("patient", "add", "cardio", "--external-id", f"MRN-{number}").strip()
        run("document", "put", patient, "ccda", "-", input=CCDA)
    folder = f"acme-research-folder-{width}-{uuid.uuid4().hex[:6]}"
    run("destination", "local", folder, "--root", str(tmp_path / "org"))
    run("subscribe", "cardio", f"local-destination/{folder}")
    run("deliver")

    views = {
        "deliveries": shown(width, "deliveries"),
        "disclosures": shown(width, "disclosures"),
        "subscriptions": shown(width, "subscriptions"),
        "projects": shown(width, "project", "list"),
    }
    for name, out in views.items():
        assert all(len(line) <= width for line in out.splitlines()), (name, out)
    deliveries = views["deliveries"]
    assert deliveries.count("delivered ") >= 3 and "local-destination/" in deliveries
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", deliveries)  # to the second
    assert not re.search(r":\d\d\.\d{6}", deliveries)  # no microseconds
    assert ("not shown at 80 columns" in deliveries) == (width == 80)
    for header in ("status", "destination"):
        assert header in deliveries
