"""Manifests reach a locked-down bucket and are owed like documents.

The README's own S3 setup, as an organization follows it (its permission policy, scoped to
`incoming/*`, and its path template), checked on moto with IAM's permission checks on: the
documents and the manifest arrive, and `destination test` probes both places. A manifest that
could not be written is written by the next run, listing the files it should have listed, so
every delivered file is in exactly one manifest.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from loopback.servers import MotoServer
from patient_delivery import ingest
from patient_delivery.flows.deliver import deliver
from patient_delivery.store import Store
from patient_delivery.store.models import Delivery
from tests.test_s3_destination import EXTERNAL_ID, BucketRemote, s3_block

pytestmark = pytest.mark.usefixtures("prefect_api")

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
CCDA = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>%d</title></ClinicalDocument>'


def readme_policy(bucket: str) -> dict:
    """The permission policy the README tells the organization to attach, for `bucket`, with
    its S3 statement only (no KMS key here: SSE-S3)."""
    blocks = re.findall(r"```json\n(.*?)```", README, re.S)
    [policy] = [json.loads(b) for b in blocks if "s3:PutObject" in b]
    policy["Statement"] = [s for s in policy["Statement"] if "s3:PutObject" in s["Action"]]
    return json.loads(json.dumps(policy).replace("ORG-BUCKET", bucket))


def readme_template() -> str:
    [template] = re.findall(r"destination s3 .*?--template '([^']+)'", README, re.S)
    return template


def scoped_role(moto: MotoServer, bucket: str) -> str:
    role = moto.create_role(f"scoped-{bucket}", EXTERNAL_ID, [], bucket)
    policy = json.dumps(readme_policy(bucket))
    moto.client("iam").put_role_policy(
        RoleName=f"scoped-{bucket}", PolicyName="readme", PolicyDocument=policy
    )
    return role


def subscribed(store: Store, reference: str, patients: int = 3) -> str:
    tag = f"o{uuid.uuid4().hex[:8]}"
    ingest.add_organization(store, tag, tag)
    project = ingest.add_project(store, tag, "Study", f"{tag}-study")
    ingest.subscribe(store, project, reference)
    for number in range(patients):
        patient = ingest.add_patient(store, project, f"MRN-{number}")
        ingest.put_document(store, patient, "ccda", CCDA % number)
    return project


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    name = f"org-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=name)
    return name


def test_the_readmes_scoped_role_receives_the_documents_and_the_manifest(
    moto: MotoServer, bucket: str, store: Store
) -> None:
    name = f"readme-{uuid.uuid4().hex[:8]}"
    block = s3_block(moto, bucket, scoped_role(moto, bucket), path_template=readme_template())
    block.save(name)
    report = block.test_connection()
    assert report.ok, report.checks
    assert [c.step for c in report.checks].count("write probe file") == 1  # one place: incoming/
    subscribed(store, f"s3-destination/{name}")

    summary = deliver()

    assert (summary.delivered, summary.failed, summary.manifests_failed) == (3, 0, {})
    names = BucketRemote(moto.client("s3"), bucket).names()
    assert names and all(n.startswith("incoming/") for n in names)
    [manifest] = [n for n in names if "/_manifests/" in n]
    listed = json.loads(BucketRemote(moto.client("s3"), bucket).read(manifest) or b"")
    assert listed["format"] == "patient-delivery manifest 1" and len(listed["output"]) == 3


def test_a_manifest_refused_once_is_written_by_the_next_run_listing_what_it_missed(
    moto: MotoServer, bucket: str, store: Store
) -> None:
    name = f"owed-{uuid.uuid4().hex[:8]}"
    role = scoped_role(moto, bucket)
    elsewhere = "elsewhere/{projectId}/{runId}.json"  # outside what the role may write
    s3_block(moto, bucket, role, path_template=readme_template(),
             manifest_template=elsewhere).save(name)  # fmt: skip
    reference = f"s3-destination/{name}"
    project = subscribed(store, reference)
    report = s3_block(moto, bucket, role, path_template=readme_template(),
                      manifest_template=elsewhere).test_connection()  # fmt: skip
    assert not report.ok and report.checks[-1].step == "write probe file (where manifests go)"

    first = deliver()
    assert (first.delivered, first.failed) == (3, 0) and set(first.manifests_failed) == {reference}
    assert "AccessDenied" in first.manifests_failed[reference] or "denied" in (
        first.manifests_failed[reference].lower()
    )
    with store.session() as session:
        owed = session.execute(select(Delivery.manifest_owed, Delivery.manifest_run)).all()
    assert owed == [(True, None)] * 3  # owed, and free for the next run to take

    s3_block(moto, bucket, role, path_template=readme_template()).save(name, overwrite=True)
    second = deliver()

    assert (second.delivered, second.manifests_failed) == (0, {})
    remote = BucketRemote(moto.client("s3"), bucket)
    [manifest] = [n for n in remote.names() if "/_manifests/" in n]
    assert manifest.startswith(f"incoming/{project.split('-')[0]}/{project}/_manifests/")
    listed = json.loads(remote.read(manifest) or b"")
    assert len(listed["output"]) == 3 and listed["runId"] == second.flow_run_id
    with store.session() as session:
        assert not any(session.scalars(select(Delivery.manifest_owed)).all())
    deliver()
    assert len([n for n in remote.names() if "/_manifests/" in n]) == 1  # nothing more owed
