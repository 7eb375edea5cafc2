"""The clients one S3 destination writes with: made on first use, shared by its sessions.

Our own identity (a prefect-aws `AwsCredentials` block, or boto3's default chain) assumes the
organization's role once; the role's credentials are botocore *refreshable* credentials, so a
run longer than the role session re-assumes before they expire (prefect-aws caches its clients
and never refreshes STS credentials, which is why its S3 block is not used here). One boto3
client and one CRT writer serve every session and thread of the destination: each new one
would assume the role again and parse the service models again.
"""

from __future__ import annotations

import threading
from datetime import UTC
from typing import TYPE_CHECKING, Any

from botocore.config import Config
from botocore.credentials import RefreshableCredentials
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from patient_delivery.blocks.contract import TerminalDeliveryError, TransientDeliveryError
from patient_delivery.blocks.s3.botocore_adapter import session_on
from patient_delivery.blocks.s3.crt import CrtWriter

if TYPE_CHECKING:
    from patient_delivery.blocks.s3.block import S3Destination

PUT_ATTEMPTS = 1
"""Tries of one request (a put, an AssumeRole) by the S3 and STS clients themselves, the first
included (botocore's `total_max_attempts`; its `max_attempts` counts retries only): none beyond
the first. What failed is retried by the delivery run, the one place retries happen
(`flows.engine.retries`)."""


class S3Clients:
    """The role's credentials, the boto3 client and the CRT writer of one destination."""

    def __init__(self, destination: S3Destination) -> None:
        self.destination = destination
        self.lock = threading.Lock()
        self.sts: Any = None
        self.credentials: RefreshableCredentials | None = None
        self.s3: Any = None
        self.crt: CrtWriter | None = None

    def assume(self) -> dict[str, str]:
        """Assume the organization's role; the shape botocore's refreshable credentials want."""
        d = self.destination
        if self.sts is None:
            ours = (
                d.aws_credentials.get_boto3_session().get_credentials()
                if d.aws_credentials is not None
                else None
            )
            self.sts = session_on(ours, d.region_name).client(
                "sts", region_name=d.region_name, endpoint_url=d.sts_endpoint_url,
                config=Config(
                    connect_timeout=d.connect_timeout, read_timeout=d.read_timeout,
                    retries={"mode": "standard", "total_max_attempts": PUT_ATTEMPTS},
                ),
            )  # fmt: skip
        request: dict[str, Any] = {
            "RoleArn": d.role_arn,
            "RoleSessionName": d.role_session_name,
            "DurationSeconds": d.session_duration_seconds,
        }
        if d.external_id is not None:
            request["ExternalId"] = d.external_id.get_secret_value()
        try:
            credentials = self.sts.assume_role(**request)["Credentials"]
        except ClientError as exc:
            raise d.explain(exc, "assume role") from None
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
        """The boto3 S3 client on the role's credentials, made on first use."""
        with self.lock:
            if self.s3 is None:
                self.s3 = self.new_client()
            return self.s3

    def writer(self) -> CrtWriter | None:
        """The CRT writer sharing the client's credentials (None for boto3), made on first use."""
        d = self.destination
        if d.transfer_client != "crt":
            return None
        client = self.client()
        with self.lock:
            if self.crt is None:
                self.crt = CrtWriter(
                    client=client,
                    bucket=d.bucket_name,
                    credentials=self.credentials,
                    explain=d.explain,
                    max_connections=d.max_connections * d.files_in_flight,
                    connect_timeout=d.connect_timeout,
                    read_timeout=d.read_timeout,
                )
            return self.crt

    def new_client(self) -> Any:
        d = self.destination
        credentials = RefreshableCredentials.create_from_metadata(
            metadata=self.assume(), refresh_using=self.assume, method="sts-assume-role"
        )
        self.credentials = credentials
        config = Config(
            max_pool_connections=d.max_connections,
            connect_timeout=d.connect_timeout,
            read_timeout=d.read_timeout,
            retries={"mode": "standard", "total_max_attempts": PUT_ATTEMPTS},
            request_checksum_calculation="when_required",
        )
        session = session_on(credentials, d.region_name)
        return session.client("s3", endpoint_url=d.endpoint_url, config=config)
