"""No patient data or secret leaves through a side door: a canary in every one, after a run
with failures, must not appear in logs, CLI output, artifacts, exception messages, the ledger's
reasons or Prefect's own database."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loopback.servers import MotoServer, SshServer
from patient_delivery import ingest
from patient_delivery.cli import app
from patient_delivery.importers import fhir_bundle
from patient_delivery.store import Store
from tests.faults import REPORT
from tests.test_deliver_flow import rows
from tests.test_s3_destination import s3_block
from tests.test_sftp_destination import sftp_block

pytestmark = pytest.mark.usefixtures("prefect_api")

CONTENT_CANARY = "CANARY-CONTENT-91e4"
NAME_CANARY = "Canaryfamily-5b7d"
PASSWORD_CANARY = "CANARY-PASSWORD-c2a8"
EXTERNAL_ID_CANARY = "CANARY-EXTERNAL-ID-3f60"


def prefect_database_bytes() -> bytes:
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = PREFECT_API_DATABASE_CONNECTION_URL.value() or ""
    path = Path(url.split("///", 1)[1])
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def test_canaries_stay_out_of_every_side_channel(
    store: Store,
    sshd: SshServer,
    moto: MotoServer,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prefect.artifacts import Artifact

    from patient_delivery.blocks.local import LocalDestination

    suffix = uuid.uuid4().hex[:8]
    LocalDestination(root=tmp_path / "ok").save(f"leak-ok-{suffix}")
    folder = sshd.make_folder(f"leak-{suffix}")
    sftp_block(sshd, folder, password=PASSWORD_CANARY).save(f"leak-sftp-{suffix}")
    bucket = f"leak-{suffix}"
    moto.client("s3").create_bucket(Bucket=bucket)
    role = moto.create_role(f"leak-{suffix}", "the-right-one", ["s3:PutObject"], bucket)
    s3_block(moto, bucket, role, external_id=EXTERNAL_ID_CANARY).save(f"leak-s3-{suffix}")

    ingest.add_organization(store, "Acme", "acme")
    project = ingest.add_project(store, "acme", "Study", "study")
    references = [
        "local-destination/leak-ok",
        "sftp-destination/leak-sftp",
        "s3-destination/leak-s3",
    ]
    for reference in references:
        ingest.subscribe(store, project, f"{reference}-{suffix}")
    patient = ingest.add_patient(store, project, "MRN-1")
    ccda = (
        '<ClinicalDocument xmlns="urn:hl7-org:v3"><title>'
        f"{CONTENT_CANARY}</title></ClinicalDocument>"
    ).encode()
    ingest.put_document(store, patient, "ccda", ccda)
    bundle = fhir_bundle({"resourceType": "Patient", "id": "p1",
                          "name": [{"family": NAME_CANARY}]}, [])  # fmt: skip
    ingest.put_document(store, patient, "fhir", bundle)
    malformed = ccda.replace(b"</title>", b"</titel>")
    runner = CliRunner()
    refused = runner.invoke(app, ["document", "put", patient, "ccda", "-"], input=malformed)

    delivered = runner.invoke(app, ["deliver"], env={"COLUMNS": "200"})
    ledger_view = runner.invoke(app, ["deliveries", "--wide"], env={"COLUMNS": "400"})
    listed = runner.invoke(app, ["destination", "show", f"s3-destination/leak-s3-{suffix}"])

    assert refused.exit_code == 2 and delivered.exit_code == 1  # the failures really happened
    statuses = sorted((r.destination.split("/")[0], r.status) for r in rows(store))
    assert statuses == [("local-destination", "delivered")] * 2 + [
        ("s3-destination", "failed")] * 2 + [("sftp-destination", "failed")] * 2  # fmt: skip
    captured = capfd.readouterr()
    artifacts = [Artifact.get("delivery-summary")]
    channels = {
        "CLI output": refused.output + delivered.output + ledger_view.output + listed.output,
        "stdout/stderr": captured.out + captured.err,
        "log records": "\n".join(r.getMessage() for r in caplog.records),
        "artifacts": "\n".join(f"{a.description} {a.data}" for a in artifacts if a),
        "ledger reasons": "\n".join(r.last_error or "" for r in rows(store)),
    }
    database = prefect_database_bytes()
    assert len(database) > 100_000  # the harness's real database, not an empty read
    sent = b"".join(p.read_bytes() for p in (tmp_path / "ok").rglob("*") if p.is_file())
    assert CONTENT_CANARY.encode() in sent and NAME_CANARY.encode() in sent  # it went through
    canaries = (CONTENT_CANARY, NAME_CANARY, PASSWORD_CANARY, EXTERNAL_ID_CANARY)
    hits = [f"{canary} leaked into {channel}" for canary in canaries
            for channel, text in channels.items() if canary in text]  # fmt: skip
    hits += [f"{c} is in Prefect's database" for c in canaries if c.encode() in database]
    REPORT.canary_places += len(canaries) * (len(channels) + 1)
    REPORT.canary_hits += len(hits)
    assert hits == []
    assert (
        "login as" in channels["ledger reasons"]
        and "could not assume" in channels["ledger reasons"]
    )
