"""S3Destination: assumed role on moto (S3, STS, IAM with authorization), checksums on SeaweedFS."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from prefect_aws import AwsCredentials
from pydantic import ValidationError

from loopback.servers import MotoServer, SeaweedServer, free_port
from patient_delivery.blocks.contract import (
    DeliveryError,
    Receipt,
    TerminalDeliveryError,
    TransientDeliveryError,
    Upload,
)
from patient_delivery.blocks.s3 import S3Destination
from tests.destination_contract import BODY, DestinationContract, connect, sha

EXTERNAL_ID = "canary-external-id-7d2c"


class BucketRemote:
    def __init__(self, client, bucket: str) -> None:  # type: ignore[no-untyped-def]
        self.client = client
        self.bucket = bucket

    def read(self, path: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=path)["Body"].read()
        except ClientError:
            return None

    def names(self) -> list[str]:
        listing = self.client.list_objects_v2(Bucket=self.bucket)
        return sorted(item["Key"] for item in listing.get("Contents", []))

    def plant(self, path: str, content: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=path, Body=content)


def our_identity(moto: MotoServer) -> AwsCredentials:
    access, secret = moto.deliverer_keys
    return AwsCredentials(
        aws_access_key_id=access, aws_secret_access_key=secret, region_name="us-east-1"
    )


def s3_block(moto: MotoServer, bucket: str, role_arn: str, **overrides: object) -> S3Destination:
    fields: dict[str, object] = {
        "bucket_name": bucket,
        "role_arn": role_arn,
        "external_id": EXTERNAL_ID,
        "endpoint_url": moto.url,
        "sts_endpoint_url": moto.url,
        "aws_credentials": our_identity(moto),
        "role_session_name": "patient-delivery-test",
        "session_duration_seconds": 3600,
    }
    fields.update(overrides)
    return S3Destination(**fields)


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    name = f"org-{uuid.uuid4().hex[:12]}"
    moto.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def writer_role(moto: MotoServer, bucket: str) -> str:
    return moto.create_role(
        f"writer-{bucket}", EXTERNAL_ID, ["s3:PutObject", "s3:DeleteObject"], bucket
    )


@pytest.fixture(params=["crt", "crt-4-in-flight", "boto3"])
def destination(
    moto: MotoServer, bucket: str, writer_role: str, request: pytest.FixtureRequest
) -> S3Destination:
    """The block on each transfer client, and with several puts on their way: the contract
    holds for each."""
    client, _, in_flight = request.param.partition("-")
    return s3_block(moto, bucket, writer_role, transfer_client=client,
                    files_in_flight=4 if in_flight else 1)  # fmt: skip


@pytest.fixture
def remote(moto: MotoServer, bucket: str) -> BucketRemote:
    return BucketRemote(moto.client("s3"), bucket)


@pytest.fixture
def secrets(moto: MotoServer) -> list[str]:
    return [EXTERNAL_ID, moto.deliverer_keys[1]]


class TestS3DestinationContract(DestinationContract):
    writes_temporary_files = False  # objects appear whole: there is nothing to clean up


@pytest.mark.bad_input
def test_a_role_without_put_object_is_denied_with_the_fix_named(
    moto: MotoServer, bucket: str, remote: BucketRemote
) -> None:
    role = moto.create_role(f"reader-{bucket}", EXTERNAL_ID, ["s3:GetObject"], bucket)
    block = s3_block(moto, bucket, role)
    with block.open_session() as session, pytest.raises(TerminalDeliveryError) as error:
        session.upload("x/doc.xml", BODY, sha(BODY))
    assert "s3:PutObject" in str(error.value) and "AccessDenied" in str(error.value)
    assert remote.names() == []


@pytest.mark.bad_input
def test_a_wrong_external_id_cannot_assume_the_role(
    moto: MotoServer, bucket: str, writer_role: str
) -> None:
    block = s3_block(moto, bucket, writer_role, external_id="someone-elses-id")
    with pytest.raises(TerminalDeliveryError, match=r"could not assume .*ExternalId") as error:
        connect(block)
    assert "someone-elses-id" not in str(error.value)


@pytest.mark.bad_input
def test_a_role_that_does_not_trust_us_cannot_be_assumed(moto: MotoServer, bucket: str) -> None:
    import json

    iam = moto.client("iam")
    name = f"untrusting-{bucket}"
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
             "Principal": {"AWS": "arn:aws:iam::123456789012:user/admin"}}]}  # fmt: skip
    iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))
    block = s3_block(moto, bucket, f"arn:aws:iam::123456789012:role/{name}")
    assert not block.test_connection().ok
    with pytest.raises(TerminalDeliveryError, match="trust policy"), block.open_session():
        pass


@pytest.mark.bad_input
def test_our_own_bad_credentials_are_named(moto: MotoServer, bucket: str, writer_role: str) -> None:
    bad = AwsCredentials(aws_access_key_id="AKIAWRONG", aws_secret_access_key="wrong-secret")
    block = s3_block(moto, bucket, writer_role, aws_credentials=bad)
    with pytest.raises(TerminalDeliveryError, match="our own AWS credentials"):
        connect(block)


@pytest.fixture
def bare_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No AWS credentials anywhere boto3's default chain looks (environment, files, IMDS)."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


@pytest.mark.bad_input
def test_no_credentials_of_our_own_is_named(
    moto: MotoServer, bucket: str, writer_role: str, bare_environment: pytest.MonkeyPatch
) -> None:
    block = s3_block(moto, bucket, writer_role, aws_credentials=None)
    with pytest.raises(TerminalDeliveryError, match="no AWS credentials of our own"):
        connect(block)


def test_without_a_credentials_block_the_default_chain_assumes_the_role(
    moto: MotoServer, bucket: str, writer_role: str, bare_environment: pytest.MonkeyPatch
) -> None:
    access, secret = moto.deliverer_keys
    bare_environment.setenv("AWS_ACCESS_KEY_ID", access)
    bare_environment.setenv("AWS_SECRET_ACCESS_KEY", secret)
    block = s3_block(moto, bucket, writer_role, aws_credentials=None)
    with block.open_session() as session:
        session.upload("chain/doc.xml", BODY, sha(BODY))
    assert BucketRemote(moto.client("s3"), bucket).read("chain/doc.xml") == BODY


@pytest.mark.bad_input
def test_a_missing_bucket_is_named(moto: MotoServer, writer_role: str) -> None:
    block = s3_block(moto, "no-such-bucket-here", writer_role)
    with block.open_session() as session, pytest.raises(TerminalDeliveryError) as error:
        session.upload("x/doc.xml", BODY, sha(BODY))
    assert "no-such-bucket-here" in str(error.value)


@pytest.mark.bad_input
def test_settings_are_checked_when_the_block_is_built(moto: MotoServer, bucket: str) -> None:
    with pytest.raises(ValidationError, match="role ARN"):
        s3_block(moto, bucket, "arn:aws:iam::12:user/x")
    with pytest.raises(ValidationError, match="aws:kms"):
        s3_block(moto, bucket, "arn:aws:iam::123456789012:role/r", kms_key_id="k")
    block = s3_block(moto, bucket, "arn:aws:iam::123456789012:role/r")
    assert block.bucket_owner == "123456789012"
    assert block.describe().startswith(f"s3://{bucket}/")


@pytest.mark.parametrize("client", ["crt", "boto3"])
def test_seaweedfs_stores_byte_identical_and_rejects_a_wrong_checksum(
    moto: MotoServer, seaweed: SeaweedServer, client: str
) -> None:
    role = moto.create_role(f"seaweed-{uuid.uuid4().hex[:8]}", EXTERNAL_ID, ["s3:PutObject"], "x")
    block = s3_block(
        moto, seaweed.bucket, role, endpoint_url=seaweed.url, server_side_encryption=None,
        transfer_client=client,
    )  # fmt: skip
    good = f"{client}/doc.xml"
    wrong = base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()
    with block.open_session() as session:
        session.upload(good, BODY, sha(BODY))
        # upload() checks content against its checksum first; the server's check is behind it
        if session.writer is not None:
            with pytest.raises(TerminalDeliveryError) as refused:
                session.writer.put(f"{client}/bad.xml", BODY, block.put_headers(wrong, "x/y"))
            explained: Exception = refused.value
        else:
            with pytest.raises(ClientError) as error:
                session.client.put_object(
                    Bucket=seaweed.bucket, Key=f"{client}/bad.xml", Body=BODY, ChecksumSHA256=wrong
                )
            explained = block.explain(error.value, "write")
    assert "BadDigest" in str(explained) and "checksum" in str(explained)
    stored = seaweed.client().get_object(Bucket=seaweed.bucket, Key=good)["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == sha(BODY)
    names = [o["Key"] for o in seaweed.client().list_objects_v2(Bucket=seaweed.bucket)["Contents"]]
    assert f"{client}/bad.xml" not in names


def test_both_transfer_clients_send_the_same_put(
    moto: MotoServer, bucket: str, writer_role: str
) -> None:
    """What S3 stores about an object (bytes, type, encryption) does not depend on the client
    that sent it. (moto keeps a checksum only when told its algorithm, which neither client
    says; SeaweedFS, which checks it, is the test for that.)"""
    s3 = moto.client("s3")
    seen = {}
    for client in ("crt", "boto3"):
        block = s3_block(
            moto, bucket, writer_role, transfer_client=client, bucket_owner_full_control=True
        )
        key = f"same/{client} doc+1.json"  # a space and a plus: the key is encoded the same
        with block.open_session() as session:
            session.upload(key, BODY, sha(BODY))
        head = s3.head_object(Bucket=bucket, Key=key)
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == BODY
        seen[client] = (head["ContentType"], head["ServerSideEncryption"], head["ContentLength"])
    assert seen["crt"] == seen["boto3"] == ("application/fhir+json", "AES256", len(BODY))


@pytest.mark.parametrize("client", ["crt", "boto3"])
def test_an_s3_endpoint_that_never_answers_times_out_as_a_temporary_failure(
    moto: MotoServer, bucket: str, writer_role: str, client: str
) -> None:
    """A server that takes the connection and then says nothing: the put gives up after the
    block's timeouts instead of holding its upload lane for ever."""
    import socket
    import time

    silent = socket.create_server(("127.0.0.1", 0))  # the kernel completes connections to it
    try:
        block = s3_block(
            moto, bucket, writer_role, endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
            transfer_client=client, connect_timeout=1.0, read_timeout=1.0, files_in_flight=3,
        )  # fmt: skip
        started = time.monotonic()
        count = 3 if client == "crt" else 1  # boto3 sends one at a time
        uploads = [(i, Upload(f"x/{i}.xml", BODY, sha(BODY))) for i in range(count)]
        with block.open_session() as session:
            results = dict(session.upload_many(uploads))  # on their way together on the CRT
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    print(f"{client}: gave up after {elapsed:.1f} s: {results[0]}")
    assert sorted(results) == list(range(count))
    for error in results.values():
        assert isinstance(error, TransientDeliveryError) and str(error).startswith("S3 write")
    # 3 tries of a 1 s read timeout, with backoff, never for ever; on the CRT three puts on
    # their way at once wait out their time together, not one after another
    assert elapsed < 20


@pytest.mark.parametrize("client", ["crt", "boto3"])
def test_an_unreachable_s3_endpoint_is_a_temporary_failure(
    moto: MotoServer, bucket: str, writer_role: str, client: str
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    block = s3_block(moto, bucket, writer_role, endpoint_url=closed, transfer_client=client,
                     connect_timeout=2.0)  # fmt: skip
    with block.open_session() as session, pytest.raises(TransientDeliveryError) as error:
        session.upload("x/doc.xml", BODY, sha(BODY))
    assert str(error.value).startswith("S3 write failed")
    assert EXTERNAL_ID not in str(error.value)


@pytest.mark.parametrize("client", ["crt", "boto3"])
def test_sts_and_s3_are_asked_once_per_try_the_run_retries_not_the_clients(
    moto: MotoServer, bucket: str, writer_role: str, client: str
) -> None:
    """A failing AssumeRole or put is one request: the delivery run's rounds are the only
    retries (botocore's defaults would send an AssumeRole up to five times)."""
    from tests.faults import S3FaultProxy

    proxy = S3FaultProxy(moto.port)
    try:
        proxy.posts_fail = 503
        block = s3_block(moto, bucket, writer_role, sts_endpoint_url=proxy.url,
                         transfer_client=client)  # fmt: skip
        with pytest.raises(DeliveryError), block.open_session() as session:
            session.upload("x/doc.xml", BODY, sha(BODY))
        assert proxy.posts == 1

        proxy.always = 503
        block = s3_block(moto, bucket, writer_role, endpoint_url=proxy.url, transfer_client=client)
        with pytest.raises(TransientDeliveryError), block.open_session() as session:
            session.upload("x/doc.xml", BODY, sha(BODY))
        assert sum(proxy.puts.values()) == 1
    finally:
        proxy.stop()


def test_credentials_are_renewed_before_the_role_session_expires(
    destination: S3Destination, moto: MotoServer, bucket: str, writer_role: str
) -> None:
    # botocore renews refreshable credentials when less than 15 minutes remain: a 900 s role
    # session is always in that window, so every request re-assumes the role; 3600 s is not.
    short = s3_block(moto, bucket, writer_role, session_duration_seconds=900)
    for block, expect_renewal in ((short, True), (destination, False)):
        with block.open_session() as session:
            credentials = session.client._request_signer._credentials  # read, not patched
            keys = []
            for i in range(3):
                keys.append(credentials.get_frozen_credentials().access_key)
                session.upload(f"renew/{i}.xml", BODY, sha(BODY))
        assert (len(set(keys)) == 3) is expect_renewal
        assert len(set(keys)) in (1, 3)


def test_the_crt_writer_sends_each_put_option_under_the_header_botocore_uses() -> None:
    import botocore.session

    from patient_delivery.blocks.s3 import PUT_HEADERS

    members = (
        botocore.session.get_session()
        .get_service_model("s3")
        .operation_model("PutObject")
        .input_shape.members
    )
    assert {k: members[k].serialization["name"] for k in PUT_HEADERS} == PUT_HEADERS


@pytest.mark.bad_input
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # nothing on stderr
def test_a_failed_role_renewal_is_the_reason_the_crt_writer_gives(
    moto: MotoServer, bucket: str
) -> None:
    """The CRT asks for credentials on each signing and only learns that the callback failed;
    the writer raises what renewing the role raised (botocore raises once the credentials are
    within 10 minutes of expiry and the role can no longer be assumed)."""
    import boto3

    from patient_delivery.blocks.s3.crt import CrtWriter

    class Refused:
        def get_frozen_credentials(self) -> None:
            raise TerminalDeliveryError("could not assume the role (AccessDenied)")

    writer = CrtWriter(
        client=boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1",
                            aws_access_key_id="x", aws_secret_access_key="x"),
        bucket=bucket, credentials=Refused(), explain=lambda error, step: error,
        max_connections=1, connect_timeout=2, read_timeout=2,
    )  # fmt: skip
    with pytest.raises(TerminalDeliveryError, match=r"could not assume the role \(AccessDenied\)"):
        writer.put("x/doc.xml", BODY, {})


def test_puts_are_on_their_way_several_at_once_and_no_more(
    moto: MotoServer, seaweed: SeaweedServer
) -> None:
    role = moto.create_role(f"flight-{uuid.uuid4().hex[:8]}", EXTERNAL_ID, ["s3:PutObject"], "x")
    block = s3_block(moto, seaweed.bucket, role, endpoint_url=seaweed.url,
                     server_side_encryption=None, files_in_flight=3)  # fmt: skip
    taken: list[int] = []

    def uploads() -> Iterator[tuple[int, Upload]]:
        for number in range(8):
            taken.append(number)
            yield number, Upload(f"flight/{number}.xml", BODY, sha(BODY))

    on_their_way = []
    with block.open_session() as session:
        for done, (number, receipt) in enumerate(session.upload_many(uploads())):
            assert isinstance(receipt, Receipt) and receipt.path == f"flight/{number}.xml"
            on_their_way.append(len(taken) - done)
    assert max(on_their_way) == 3
    stored = seaweed.client().get_object(Bucket=seaweed.bucket, Key="flight/7.xml")["Body"].read()
    assert stored == BODY


def test_a_copy_with_other_settings_gets_clients_of_its_own(moto: MotoServer, bucket: str) -> None:
    """The clients (assumed role, boto3, CRT) belong to the settings they were made from."""
    block = s3_block(moto, bucket, "arn:aws:iam::123456789012:role/first")
    made = block.clients
    assert block.clients is made  # shared while nothing changes
    other = block.model_copy(update={"role_arn": "arn:aws:iam::123456789012:role/other"})
    assert other.clients is not made and other.clients.destination is other
    assert block.clients is made  # the original keeps its own
    block.read_timeout = 5.0
    assert block.clients is not made and block.clients.destination is block
