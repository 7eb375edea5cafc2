"""PutObject through the AWS Common Runtime's S3 client (awscrt), botocore doing the rest.

Why: the CRT client signs and sends in its own C threads, a fraction of the Python CPU boto3
spends on each put_object, which matters when the flow shares the machine's cores with many
uploads (`docs/performance.md`). It is the client boto3 itself uses for large transfers when
`awscrt` is installed.

botocore keeps everything that is not the hot path, so behaviour reads the same either way: it
assumes and renews the role (the CRT asks our credentials callback on each signing), resolves
the endpoint once (virtual-hosted or path style, FIPS, custom endpoints), and parses S3's error
responses into the `ClientError` that `S3Destination.explain` turns into a clear message.
Each put is one plain PutObject request (never the CRT's automatic multipart upload), so the
SHA-256 checksum header covers the whole object and S3 rejects a body that does not match.
The CRT retries nothing: a failed put is retried by the delivery run (`flows.engine.retries`).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any
from urllib.parse import quote, urlsplit

from awscrt import auth, http, s3
from awscrt import io as crt_io
from awscrt.exceptions import AwsCrtError
from botocore.exceptions import ClientError

from patient_delivery.blocks.contract import TerminalDeliveryError, TransientDeliveryError
from patient_delivery.blocks.s3.botocore_adapter import ErrorParser

PROBE_KEY = "probe"
SLOWEST_RATE = 128 * 1024
"""Bytes/s a put may take at worst before it is given up (with the timeouts: `PendingPut`)."""
REFUSED_KEY = "renewal-failed"
"""Signs a request when the role could not be renewed: S3 refuses it, put() says why."""


class PendingPut:
    """A put on its way: `wait()` for its answer (the response headers, lower-cased).

    The CRT has no timeout per read, so a server that stops answering is bounded here: a put
    has the connect and read timeouts plus its bytes at `SLOWEST_RATE`, counted from when it
    was sent, then it is cancelled and reported as temporary (the run's next round, or the
    next run, sends it again).
    """

    def __init__(
        self, writer: CrtWriter, pending: s3.S3Request, answered: dict[str, str], budget: float
    ) -> None:
        self.writer = writer
        self.pending = pending
        self.answered = answered
        self.budget = budget
        self.deadline = time.monotonic() + budget

    def wait(self) -> dict[str, str]:
        try:
            self.pending.finished_future.result(timeout=max(0.0, self.deadline - time.monotonic()))
        except FutureTimeout:
            self.pending.cancel()
            message = f"S3 write got no answer in {self.budget:.0f} s"
            raise TransientDeliveryError(message) from None
        except AwsCrtError as exc:
            raise self.writer.explain_failure(exc) from None
        return self.answered


class CrtWriter:
    """Puts whole objects into one bucket; thread-safe, one per S3 destination and run."""

    def __init__(
        self,
        *,
        client: Any,
        bucket: str,
        credentials: Any,
        explain: Callable[[ClientError, str], Exception],
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        # botocore's endpoint rules decide the URL once: a presigned URL for a probe key shows
        # scheme, host and the path before the key (/bucket/ in path style, / when virtual).
        url = urlsplit(
            client.generate_presigned_url(
                "put_object", Params={"Bucket": bucket, "Key": PROBE_KEY}, ExpiresIn=60
            )
        )
        if not url.path.endswith("/" + PROBE_KEY):
            raise TerminalDeliveryError(f"cannot derive the S3 URL for bucket {bucket}")
        self.host = url.netloc
        self.prefix = url.path[: -len(PROBE_KEY)]
        self.credentials = credentials
        self.credential_error: Exception | None = None
        self.explain = explain
        self.timeout = connect_timeout + read_timeout
        self.errors = ErrorParser(client)
        tls = url.scheme == "https"
        options: dict[str, Any] = {}
        if tls:
            context = crt_io.TlsContextOptions()
            bundle = os.environ.get("AWS_CA_BUNDLE")
            if bundle:
                context.override_default_trust_store_from_path(ca_filepath=bundle)
            options["tls_connection_options"] = crt_io.ClientTlsContext(
                context
            ).new_connection_options()
        self.client = s3.S3Client(
            bootstrap=crt_io.ClientBootstrap.get_or_create_static_default(),
            region=client.meta.region_name,
            credential_provider=auth.AwsCredentialsProvider.new_delegate(self.frozen),
            tls_mode=s3.S3RequestTlsMode.ENABLED if tls else s3.S3RequestTlsMode.DISABLED,
            max_active_connections_override=max_connections,
            retry_config=s3.S3RetryConfig(retry_mode=s3.S3RetryMode.NONE),
            connect_timeout_ms=int(connect_timeout * 1000),
            **options,
        )

    def frozen(self) -> auth.AwsCredentials:
        """Called by the CRT on each signing: botocore renews the role before it expires.

        When renewing fails, the request is signed with credentials S3 refuses, and put()
        raises the renewal's own error: an exception raised here would only reach the CRT as
        "delegate failure", and Python would print it to stderr as unraisable.
        """
        try:
            frozen = self.credentials.get_frozen_credentials()
        except Exception as exc:
            self.credential_error = exc
            return auth.AwsCredentials(REFUSED_KEY, REFUSED_KEY)
        self.credential_error = None
        return auth.AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token)

    def put(self, key: str, body: bytes, headers: Mapping[str, str]) -> dict[str, str]:
        """One PutObject of `body` at `key`; the response headers, lower-cased."""
        return self.start(key, body, headers).wait()

    def start(self, key: str, body: bytes, headers: Mapping[str, str]) -> PendingPut:
        """Send a PutObject of `body` at `key` and return at once; `wait()` for its answer."""
        request = http.HttpRequest(
            "PUT",
            self.prefix + quote(key, safe="/~"),
            http.HttpHeaders(
                [("Host", self.host), ("Content-Length", str(len(body))), *headers.items()]
            ),
            io.BytesIO(body),
        )
        answered: dict[str, str] = {}

        def on_headers(status_code: int, headers: list[tuple[str, str]], **_: Any) -> None:
            answered.update((name.lower(), value) for name, value in headers)

        pending = self.client.make_request(
            type=s3.S3RequestType.DEFAULT,
            operation_name="PutObject",
            request=request,
            on_headers=on_headers,
        )
        return PendingPut(self, pending, answered, self.timeout + len(body) / SLOWEST_RATE)

    def explain_failure(self, exc: AwsCrtError) -> Exception:
        """What a failed put raises: the role renewal's own error when that is why, S3's
        answer explained as botocore's would be, or a temporary failure to reach S3."""
        if self.credential_error is not None:  # the role could not be renewed
            return self.credential_error
        if isinstance(exc, s3.S3ResponseError):
            return self.explain(self.client_error(exc), "write")
        return TransientDeliveryError(f"S3 write failed: {exc.name}")

    def client_error(self, error: s3.S3ResponseError) -> ClientError:
        """S3's error response as botocore would have raised it, so it is explained the same."""
        headers = {name.lower(): value for name, value in error.headers}
        return self.errors.client_error(error.status_code, headers, error.body or b"")
