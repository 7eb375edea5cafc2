"""An organization's S3 bucket, written through an IAM role the organization created.

Our own identity (a prefect-aws `AwsCredentials` block, or boto3's default chain) assumes the
organization's role with its ExternalId and a readable RoleSessionName (it shows in the
organization's CloudTrail). The role's credentials are botocore *refreshable* credentials, so a
run longer than the role session re-assumes before they expire; prefect-aws caches its clients
and never refreshes STS credentials, which is why we do not use its S3 block here.

Every put carries a SHA-256 checksum (S3 rejects a body that does not match) and
`ExpectedBucketOwner` (the account in the role ARN), so a renamed or squatted bucket in
another account is never written to. S3 objects appear whole or not at all. Puts are sent by
the AWS Common Runtime's client (`blocks.s3_crt`, about a quarter of boto3's CPU per put)
unless the block says `transfer_client="boto3"`; both send the same request.
"""

from __future__ import annotations

import base64
import functools
import re
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC
from typing import Any, Literal

import boto3
from botocore.config import Config
from botocore.credentials import RefreshableCredentials
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from botocore.loaders import Loader, create_loader
from botocore.session import get_session
from prefect_aws import AwsCredentials
from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator

from blocks.base import (
    DeliveryError,
    Destination,
    DestinationSession,
    K,
    Receipt,
    TerminalDeliveryError,
    TransientDeliveryError,
    Upload,
    check_content,
)
from blocks.s3_crt import CrtWriter, PendingPut

PUT_HEADERS = {
    "ChecksumSHA256": "x-amz-checksum-sha256",
    "ExpectedBucketOwner": "x-amz-expected-bucket-owner",
    "ContentType": "Content-Type",
    "ServerSideEncryption": "x-amz-server-side-encryption",
    "SSEKMSKeyId": "x-amz-server-side-encryption-aws-kms-key-id",
    "ACL": "x-amz-acl",
}
"""PutObject's parameters and the headers botocore sends them as (its S3 model's locationName)."""
MAX_ATTEMPTS = 3  # per put, by the client itself; the flow tries a document again next run
ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}):role/[\w+=,.@/-]{1,512}$")
SESSION_NAME = re.compile(r"^[\w+=,.@-]{2,64}$")
TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "ExpiredToken", "RequestLimitExceeded",
}  # fmt: skip


@functools.cache
def _service_models() -> Loader:
    """The process's one botocore loader: service models parsed once, shared by every session
    (the way botocore's maintainers suggest in boto/botocore#3078; its cache only adds)."""
    return create_loader()


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", "Unknown"))


def _receipt(upload: Upload, checksum: str, echoed: str | None) -> Receipt:
    """The upload's receipt, unless S3 echoed a different checksum than the one we sent."""
    if echoed and echoed != checksum:
        raise TransientDeliveryError("S3 answered with a different SHA-256: checksum mismatch")
    return Receipt(path=upload.path, size=len(upload.content), sha256=upload.sha256)


def _answer(
    key: K, upload: Upload, checksum: str, pending: PendingPut
) -> tuple[K, Receipt | DeliveryError]:
    try:
        return key, _receipt(upload, checksum, pending.wait().get("x-amz-checksum-sha256"))
    except DeliveryError as exc:
        return key, exc


class S3Session(DestinationSession):
    def __init__(self, destination: S3Destination, client: Any, writer: CrtWriter | None) -> None:
        self.destination = destination
        self.client = client  # boto3: deletes, and puts when the block asks for boto3
        self.writer = writer

    def _key(self, path: str) -> str:
        if path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
            raise TerminalDeliveryError("rendered path is not a clean relative key; refused")
        return path

    def upload(self, path: str, content: bytes, sha256: str) -> Receipt:
        if self.writer is not None:
            return self._upload_through_many(path, content, sha256)
        upload = Upload(path, content, sha256)
        key, checksum, content_type = self._prepare(upload)
        echoed = self._put_with_boto3(key, content, checksum, content_type)
        return _receipt(upload, checksum, echoed)

    def upload_many(
        self, uploads: Iterable[tuple[K, Upload]]
    ) -> Iterator[tuple[K, Receipt | DeliveryError]]:
        """With the CRT writer, up to `files_in_flight` puts on their way at once, answered
        in the order sent; with boto3, one at a time."""
        writer = self.writer
        if writer is None:
            yield from super().upload_many(uploads)
            return
        on_their_way: deque[tuple[K, Upload, str, PendingPut]] = deque()
        for key, upload in uploads:
            try:
                object_key, checksum, content_type = self._prepare(upload)
                headers = self.destination.put_headers(checksum, content_type)
                pending = writer.start(object_key, upload.content, headers)
            except DeliveryError as exc:
                yield key, exc
                continue
            on_their_way.append((key, upload, checksum, pending))
            if len(on_their_way) >= self.destination.files_in_flight:
                yield _answer(*on_their_way.popleft())
        while on_their_way:
            yield _answer(*on_their_way.popleft())

    def _prepare(self, upload: Upload) -> tuple[str, str, str]:
        """Checked content; the object key, the SHA-256 as S3 wants it, the content type."""
        check_content(upload.content, upload.sha256)
        checksum = base64.b64encode(bytes.fromhex(upload.sha256)).decode()
        content_type = (
            "application/fhir+json" if upload.path.endswith(".json") else "application/xml"
        )
        return self._key(upload.path), checksum, content_type

    def _put_with_boto3(self, key: str, content: bytes, checksum: str, content_type: str) -> str:
        d = self.destination
        request: dict[str, Any] = {
            "Bucket": d.bucket_name,
            "Key": key,
            "Body": content,
            "ContentLength": len(content),
            **d.put_options(checksum, content_type),
        }
        try:
            response = self.client.put_object(**request)
        except ClientError as exc:
            raise d.explain(exc, "write") from None
        except (BotoConnectionError, BotoCoreError) as exc:
            raise TransientDeliveryError(f"S3 write failed: {type(exc).__name__}") from None
        return str(response.get("ChecksumSHA256") or "")

    def remove(self, path: str) -> None:
        try:
            self.client.delete_object(
                Bucket=self.destination.bucket_name,
                Key=self._key(path),
                ExpectedBucketOwner=self.destination.bucket_owner,
            )
        except ClientError as exc:
            raise self.destination.explain(exc, "delete") from None


class S3Destination(Destination):
    """Deliver into an organization's S3 bucket by assuming the IAM role it created for us."""

    _block_type_name = "S3 Destination"
    _block_type_slug = "s3-destination"
    _description = "Deliver patient documents into an organization's S3 bucket via an IAM role."

    bucket_name: str = Field(title="Bucket", description="The organization's bucket.")
    role_arn: str = Field(
        title="Role ARN",
        description="The IAM role the organization created for us: arn:aws:iam::ACCOUNT:role/NAME.",
    )
    external_id: SecretStr | None = Field(
        default=None,
        title="External ID",
        description="The sts:ExternalId the role's trust policy requires (per organization).",
    )
    region_name: str = Field(default="us-east-1", title="Region", description="Bucket region.")
    endpoint_url: str | None = Field(
        default=None,
        title="S3 endpoint URL",
        description="For S3-compatible stores and tests; empty for AWS.",
    )
    sts_endpoint_url: str | None = Field(
        default=None,
        title="STS endpoint URL",
        description="Where to assume the role; empty for AWS's regional STS.",
    )
    aws_credentials: AwsCredentials | None = Field(
        default=None,
        title="Our AWS identity",
        description="Credentials that may assume the role; empty for boto3's default chain.",
    )
    role_session_name: str = Field(
        default="patient-delivery",
        title="Role session name",
        description="Shows in the organization's CloudTrail next to every write.",
    )
    session_duration_seconds: int = Field(
        default=3600,
        ge=900,
        le=43200,
        title="Role session (s)",
        description="How long assumed credentials last; they are renewed before they expire.",
    )
    server_side_encryption: Literal["AES256", "aws:kms"] | None = Field(
        default="AES256",
        title="Server-side encryption",
        description="AES256 (SSE-S3) or aws:kms (SSE-KMS with the key below); empty for none.",
    )
    kms_key_id: str | None = Field(
        default=None, title="KMS key", description="The organization's KMS key for aws:kms."
    )
    bucket_owner_full_control: bool = Field(
        default=False,
        title="bucket-owner-full-control ACL",
        description="Send this canned ACL, for buckets that still use ACLs.",
    )
    max_connections: int = Field(
        default=8,
        ge=1,
        le=64,
        title="Upload lanes",
        description="Documents sent in parallel, each lane with `files_in_flight` puts on their "
        "way (the CRT client opens up to lanes x puts connections).",
    )
    connect_timeout: float = Field(default=10.0, gt=0, title="Connect timeout (s)")
    read_timeout: float = Field(default=60.0, gt=0, title="Read timeout (s)")
    files_in_flight: int = Field(
        default=2,
        ge=1,
        le=32,
        title="Puts in flight per lane",
        description=(
            "Puts on their way at once in each upload lane (crt only; boto3 sends one at a "
            "time): fewer of our threads for as many puts (4 lanes x 4 puts: 747 files/s, 16 x "
            "1: 671, measured)."
        ),
    )
    transfer_client: Literal["crt", "boto3"] = Field(
        default="crt",
        title="Transfer client",
        description="crt: the AWS Common Runtime (about twice boto3's puts/s on the same CPU); "
        "boto3: for HTTP(S)_PROXY, which the CRT client does not read.",
    )

    _client: Any = PrivateAttr(default=None)
    _credentials: Any = PrivateAttr(default=None)
    _writer: CrtWriter | None = PrivateAttr(default=None)
    _sts: Any = PrivateAttr(default=None)
    _client_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @field_validator("aws_credentials", mode="before")
    @classmethod
    def _credentials_as_declared(cls, value: Any) -> Any:
        """Saved credentials come back tagged with their block type, which makes Prefect import
        every installed collection (Dask's included) to look the class up: 0.9 s of CPU in
        every run that loads this block, measured. The field's type is that class already."""
        if isinstance(value, dict) and value.get("block_type_slug") == "aws-credentials":
            return {k: v for k, v in value.items() if k != "block_type_slug"}
        return value

    @field_validator("role_arn")
    @classmethod
    def _check_role(cls, value: str) -> str:
        if not ROLE_ARN.fullmatch(value):
            raise ValueError("role ARN must look like arn:aws:iam::123456789012:role/NAME")
        return value

    @field_validator("role_session_name")
    @classmethod
    def _check_session_name(cls, value: str) -> str:
        if not SESSION_NAME.fullmatch(value):
            raise ValueError("role session name: 2-64 of letters, digits and +=,.@_-")
        return value

    @model_validator(mode="after")
    def _check_encryption(self) -> S3Destination:
        if self.kms_key_id and self.server_side_encryption != "aws:kms":
            raise ValueError("a KMS key is given but server-side encryption is not aws:kms")
        return self

    @property
    def bucket_owner(self) -> str:
        match = ROLE_ARN.fullmatch(self.role_arn)
        assert match is not None
        return match.group(1)

    def describe(self) -> str:
        prefix = self.path_template.split("{")[0]
        return f"s3://{self.bucket_name}/{prefix} (as {self.role_arn})"

    def _base_session(self) -> boto3.Session:
        if self.aws_credentials is not None:
            return self.aws_credentials.get_boto3_session()
        return boto3.Session(region_name=self.region_name)

    def _session_on(self, credentials: Any) -> boto3.Session:
        """A boto3 session on `credentials` (our own, or the role's refreshable ones) that
        shares this process's loaded service models: each new session otherwise parses the
        same JSON again (endpoints, S3's and STS's models), 100-300 ms of CPU on the run's
        critical path, measured."""
        core = get_session()
        core.register_component("data_loader", _service_models())
        core._credentials = credentials  # the documented way to inject refreshables
        core.set_config_variable("region", self.region_name)
        return boto3.Session(botocore_session=core)

    def _assume(self) -> dict[str, str]:
        """Assume the organization's role; the shape botocore's refreshable credentials want."""
        if self._sts is None:
            ours = self._base_session().get_credentials()
            self._sts = self._session_on(ours).client(
                "sts", region_name=self.region_name, endpoint_url=self.sts_endpoint_url
            )
        sts = self._sts
        request: dict[str, Any] = {
            "RoleArn": self.role_arn,
            "RoleSessionName": self.role_session_name,
            "DurationSeconds": self.session_duration_seconds,
        }
        if self.external_id is not None:
            request["ExternalId"] = self.external_id.get_secret_value()
        try:
            credentials = sts.assume_role(**request)["Credentials"]
        except ClientError as exc:
            raise self.explain(exc, "assume role") from None
        except NoCredentialsError:
            raise TerminalDeliveryError(
                "no AWS credentials of our own to assume the role with: set the block's AWS "
                "credentials or configure boto3's default chain"
            ) from None
        except (BotoConnectionError, BotoCoreError) as exc:
            raise TransientDeliveryError(f"STS unreachable: {type(exc).__name__}") from None
        return {
            "access_key": credentials["AccessKeyId"],
            "secret_key": credentials["SecretAccessKey"],
            "token": credentials["SessionToken"],
            "expiry_time": credentials["Expiration"].astimezone(UTC).isoformat(),
        }

    def client(self) -> Any:
        """The S3 client on the role's credentials, renewed before they expire.

        One per block instance, created on first use and shared by every session and thread
        (boto3 clients are thread-safe; creating one costs tens of milliseconds of model
        loading, and each would assume the role again).
        """
        with self._client_lock:
            if self._client is None:
                self._client = self._new_client()
            return self._client

    def writer(self) -> CrtWriter | None:
        """The CRT writer sharing the client's credentials (None for boto3), made on first use."""
        if self.transfer_client != "crt":
            return None
        client = self.client()
        with self._client_lock:
            if self._writer is None:
                self._writer = CrtWriter(
                    client=client,
                    bucket=self.bucket_name,
                    credentials=self._credentials,
                    explain=self.explain,
                    max_connections=self.max_connections * self.files_in_flight,
                    connect_timeout=self.connect_timeout,
                    read_timeout=self.read_timeout,
                    max_attempts=MAX_ATTEMPTS,
                )
            return self._writer

    def put_options(self, checksum: str, content_type: str) -> dict[str, str]:
        """What every PutObject carries besides its key and body, in boto3's parameter names."""
        options = {
            "ChecksumSHA256": checksum,
            "ExpectedBucketOwner": self.bucket_owner,
            "ContentType": content_type,
        }
        if self.server_side_encryption:
            options["ServerSideEncryption"] = self.server_side_encryption
            if self.server_side_encryption == "aws:kms" and self.kms_key_id:
                options["SSEKMSKeyId"] = self.kms_key_id
        if self.bucket_owner_full_control:
            options["ACL"] = "bucket-owner-full-control"
        return options

    def put_headers(self, checksum: str, content_type: str) -> dict[str, str]:
        """The same options as the HTTP headers S3 reads, for the CRT writer."""
        return {PUT_HEADERS[k]: v for k, v in self.put_options(checksum, content_type).items()}

    def _new_client(self) -> Any:
        credentials = RefreshableCredentials.create_from_metadata(
            metadata=self._assume(), refresh_using=self._assume, method="sts-assume-role"
        )
        self._credentials = credentials
        session = self._session_on(credentials)
        config = Config(
            max_pool_connections=self.max_connections,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
            request_checksum_calculation="when_required",
        )
        return session.client("s3", endpoint_url=self.endpoint_url, config=config)

    @contextmanager
    def open_session(self) -> Iterator[S3Session]:
        yield S3Session(self, self.client(), self.writer())

    def explain(
        self, error: ClientError, step: str
    ) -> TerminalDeliveryError | TransientDeliveryError:
        """Say which step failed and what to fix; retry only what may pass later."""
        code = _code(error)
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        where = f"s3://{self.bucket_name}"
        if code in TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
            return TransientDeliveryError(f"S3 {step} failed: {code} (temporary; retried)")
        if step == "assume role":
            if code in (
                "InvalidClientTokenId",
                "SignatureDoesNotMatch",
                "UnrecognizedClientException",
            ):
                return TerminalDeliveryError(
                    f"our own AWS credentials were refused by STS ({code}): check the block's "
                    "AWS credentials"
                )
            return TerminalDeliveryError(
                f"could not assume {self.role_arn} ({code}): the role's trust policy must name "
                "our identity as principal, and its sts:ExternalId condition must match this "
                "block's External ID"
            )
        if code == "NoSuchBucket":
            return TerminalDeliveryError(f"bucket {where} does not exist ({code})")
        if code in ("AccessDenied", "AllAccessDisabled", "Forbidden", "403"):
            return TerminalDeliveryError(
                f"the role may not {step} in {where} ({code}): its permission policy needs "
                f"s3:PutObject on the prefix (and kms:GenerateDataKey with SSE-KMS), and the "
                f"bucket must belong to account {self.bucket_owner}"
            )
        if code in ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidRequest"):
            return TerminalDeliveryError(
                f"S3 refused the {step} ({code}): the SHA-256 checksum did not match the bytes"
                if "Digest" in code or "SHA256" in code
                else f"S3 refused the {step} ({code})"
            )
        return TerminalDeliveryError(f"S3 {step} in {where} failed: {code}")
