"""A destination's health as runs leave it, on SQLite (the claims that skip destinations down
run on both stores in test_deliver_flow): how far behind it is, and a fixed block's probe."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from patient_delivery import ingest
from patient_delivery.flows.deliver import deliver_state
from patient_delivery.store import Store
from patient_delivery.store.models import Delivery
from tests.test_deliver_flow import CCDA, _events, save_local
from tests.test_deliver_flow import project as project

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.mark.usefixtures("sshd")
def test_lag_is_shown_per_destination_and_a_destination_behind_its_objective_alerts(
    store: Store, project: str, tmp_path: Path, sshd
) -> None:  # type: ignore[no-untyped-def]
    """`status --json` and the run's `delivery-lag` artifact give each destination's oldest
    owed age and its update-to-landed percentiles; a destination whose oldest owed delivery is
    older than its block's objective raises the "behind" event (its payload: minutes only)."""
    from prefect.artifacts import Artifact
    from typer.testing import CliRunner

    from loopback.servers import free_port
    from patient_delivery.cli import app
    from tests.test_sftp_destination import sftp_block

    name = f"t-{uuid.uuid4().hex[:10]}"
    sftp_block(sshd, Path("/in"), port=free_port(), connect_timeout=2,
               lag_objective_minutes=1).save(name)  # no server there: nothing lands  # fmt: skip
    late, healthy = f"sftp-destination/{name}", save_local(tmp_path / "org")
    ingest.subscribe(store, project, late)
    ingest.subscribe(store, project, healthy)
    for number in range(3):
        patient = ingest.add_patient(store, project, f"MRN-{number}")
        ingest.put_document(store, patient, "ccda", CCDA)
    with store.session() as session:  # these updates arrived five minutes ago
        for row in session.scalars(select(Delivery)):
            row.created_at = datetime.now(UTC) - timedelta(minutes=5)
    started = datetime.now(UTC)
    deliver_state()

    shown = CliRunner().invoke(app, ["status", "--json"])
    assert shown.exit_code == 0, shown.output
    lags = {row["destination"]: row for row in json.loads(shown.output)["destinations"]}
    assert lags[healthy]["oldest_owed_s"] is None and lags[healthy]["landed_1d"] == 3
    assert 290 < lags[healthy]["lag_p50_1h_s"] <= lags[healthy]["lag_p95_1d_s"] < 600
    assert 290 < lags[late]["oldest_owed_s"] < 600 and lags[late]["landed_1d"] == 0
    assert lags[late]["lag_p95_1h_s"] is None
    card = Artifact.get("delivery-lag")
    assert card is not None and {row["destination"] for row in json.loads(str(card.data))} == {
        late, healthy,
    }  # fmt: skip
    assert _events(late, started, "behind") == 1  # stored, and so is any of the same run:
    assert _events(healthy, started, "behind", wait=0) == 0


def test_a_valid_block_saved_for_a_destination_down_is_probed_by_the_next_run(
    store: Store, tmp_path: Path
) -> None:
    """The organization's fix (a block saved again, found valid by `check-destination`) makes
    the probe of a destination down due now, instead of after its backoff."""
    from patient_delivery import destination_health
    from patient_delivery.flows.destination_check import check_destination

    reference = save_local(tmp_path / "org")
    noted = destination_health.note(store, "run-1", [], {reference: "1 x cannot reach it"})
    assert list(noted.down) == [reference]
    assert destination_health.probes_due(store) == []  # its first probe is a minute away
    assert check_destination(reference).endswith("it is down, and the next run probes it")
    assert destination_health.probes_due(store) == [reference]  # taken by one run
    assert destination_health.probes_due(store) == []  # and by no other at the same time
    destination_health.resume(store, [reference])
    assert check_destination(reference) == f"{reference} is valid"  # no longer down
