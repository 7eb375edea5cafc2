"""An organization's S3 bucket, written through an IAM role the organization created.

The block holds the settings and explains S3's answers; `clients` assumes the role and makes
the clients, `session` sends the puts. Every put carries a SHA-256 checksum (S3 rejects a body
that does not match) and `ExpectedBucketOwner` (the account in the role ARN), so a renamed or
squatted bucket in another account is never written to.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from botocore.exceptions import ClientError
from prefect_aws import AwsCredentials
from pydantic import Field, SecretStr, field_validator, model_validator

from patient_delivery.blocks.base import Destination
from patient_delivery.blocks.contract import TerminalDeliveryError, TransientDeliveryError
from patient_delivery.blocks.s3.clients import S3Clients
from patient_delivery.blocks.s3.session import S3Session
from patient_delivery.paths import PathTemplate

PUT_HEADERS = {
    "ChecksumSHA256": "x-amz-checksum-sha256",
    "ExpectedBucketOwner": "x-amz-expected-bucket-owner",
    "ContentType": "Content-Type",
    "ServerSideEncryption": "x-amz-server-side-encryption",
    "SSEKMSKeyId": "x-amz-server-side-encryption-aws-kms-key-id",
    "ACL": "x-amz-acl",
}
"""PutObject's parameters and the headers botocore sends them as (its S3 model's locationName)."""
ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}):role/[\w+=,.@/-]{1,512}$")
SESSION_NAME = re.compile(r"^[\w+=,.@-]{2,64}$")
TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "ExpiredToken", "RequestLimitExceeded",
}  # fmt: skip

CLIENTS_LOCK = threading.Lock()
"""Guards the first `S3Destination.clients` of each block, so two threads make one."""


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", "Unknown"))


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
    connect_timeout: float = Field(
        default=10.0,
        gt=0,
        title="Connect timeout (s)",
        description="Opening a connection to S3 or STS; past it the try fails and is retried.",
    )
    read_timeout: float = Field(
        default=60.0,
        gt=0,
        title="Read timeout (s)",
        description="Waiting for S3's or STS's answer to one request, once it is sent.",
    )
    files_in_flight: int = Field(
        default=2,
        ge=1,
        le=32,
        title="Puts in flight per lane",
        description=(
            "Puts on their way at once in each upload lane (crt only; boto3 sends one at a "
            "time): as many puts with fewer of our threads."
        ),
    )
    transfer_client: Literal["crt", "boto3"] = Field(
        default="crt",
        title="Transfer client",
        description="crt: the AWS Common Runtime (less of our CPU per put); boto3: for "
        "HTTP(S)_PROXY, which the CRT client does not read.",
    )

    @field_validator("aws_credentials", mode="before")
    @classmethod
    def _credentials_as_declared(cls, value: Any) -> Any:
        """Saved credentials come back tagged with their block type, which makes Prefect import
        every installed collection (Dask's included) to look the class up, in every run that
        loads this block. The field's type is that class already."""
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
        prefix = PathTemplate.parse_cached(self.path_template).fixed_prefix
        return f"s3://{self.bucket_name}/{prefix} (as {self.role_arn})"

    @property
    def clients(self) -> S3Clients:
        """The role's credentials and the clients, made on first use and shared by every
        session and thread of this block while its settings stay as they were made from (a
        copy with other settings, `model_copy(update=...)`, or a changed field, gets its own)."""
        settings = self.model_dump()  # secrets compare by value
        with CLIENTS_LOCK:
            made = vars(self).get("s3_clients")
            if made is None or made[0] is not self or made[1] != settings:
                made = vars(self)["s3_clients"] = (self, settings, S3Clients(self))
            return made[2]

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

    @contextmanager
    def open_session(self) -> Iterator[S3Session]:
        clients = self.clients
        yield S3Session(self, clients.client(), clients.writer())

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
