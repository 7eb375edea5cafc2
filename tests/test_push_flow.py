"""A delivery run to S3 and SFTP at once, on real servers: both arrive, a bad one fails alone."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from loopback.servers import MotoServer, SshServer
from patient_delivery import ingest
from patient_delivery.flows.deliver import deliver
from patient_delivery.importers import import_ccda, import_fhir_bulk
from patient_delivery.store import Store
from patient_delivery.store.models import Delivery
from tests.faults import documents
from tests.test_s3_destination import EXTERNAL_ID, BucketRemote, s3_block
from tests.test_sftp_destination import sftp_block

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_a_project_subscribed_to_s3_and_sftp_gets_both_and_a_bad_password_fails_alone(
    store: Store, fixtures_dir: Path, sshd: SshServer, moto: MotoServer
) -> None:
    suffix = uuid.uuid4().hex[:8]
    bucket = f"org-{suffix}"
    moto.client("s3").create_bucket(Bucket=bucket)
    role = moto.create_role(f"flow-{suffix}", EXTERNAL_ID, ["s3:PutObject"], bucket)
    s3_block(moto, bucket, role, path_template="inbox/{projectId}/{externalId}").save(
        f"s3-{suffix}"
    )
    folder = sshd.make_folder(f"flow-{suffix}")
    sftp_block(sshd, folder, max_connections=2).save(f"sftp-{suffix}")
    sftp_block(sshd, folder, password="wrong").save(f"bad-{suffix}")

    ingest.add_organization(store, "Acme", "acme")
    project = ingest.add_project(store, "acme", "Study", "study")
    for reference in (f"s3-destination/s3-{suffix}", f"sftp-destination/sftp-{suffix}",
                      f"sftp-destination/bad-{suffix}"):  # fmt: skip
        ingest.subscribe(store, project, reference)
    import_ccda(store, sorted((fixtures_dir / "ccda").glob("*.xml"))[:4], project_id=project)
    import_fhir_bulk(store, fixtures_dir / "fhir-bulk-10", project)

    logins_before = sshd.log.read_text().count("Accepted password")
    summary = deliver(batch_size=5)
    logins = sshd.log.read_text().count("Accepted password") - logins_before

    per = {
        name.split("/")[1].split("-")[0]: report for name, report in summary.destinations.items()
    }
    assert (per["s3"].delivered, per["s3"].failed) == (17, 0)
    assert (per["sftp"].delivered, per["sftp"].failed) == (17, 0)
    assert (per["bad"].delivered, per["bad"].failed) == (0, 17)
    assert any("login as" in reason for reason in per["bad"].reasons)
    # Four batches of five shared at most two connections: sessions are reused, not reopened.
    assert 1 <= logins <= 2

    remote = BucketRemote(moto.client("s3"), bucket)
    with store.session() as session:
        delivered = session.scalars(select(Delivery).where(Delivery.status == "delivered")).all()
    for row in delivered:
        if row.destination.startswith("s3-destination"):
            body = remote.read(row.path)
        else:
            body = (folder / row.path).read_bytes()
        assert body is not None and hashlib.sha256(body).hexdigest() == row.sha256
    assert len(documents(remote.names())) == 17

    again = deliver()  # the bad password's destination is down: skipped, its deliveries wait
    assert (again.delivered, again.failed) == (0, 0) and list(again.down) == [
        f"sftp-destination/bad-{suffix}"
    ]
