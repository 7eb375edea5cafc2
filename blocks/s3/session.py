"""One S3 destination's session: puts with a SHA-256 checksum and the bucket owner's account.

Objects appear whole or not at all, so there is no temporary name. Puts go through the CRT
writer, several on their way at once, unless the block asks for boto3 (one at a time).
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from patient_delivery.blocks.contract import (
    DeliveryError,
    DestinationSession,
    K,
    Receipt,
    TransientDeliveryError,
    Upload,
    check_content,
)
from patient_delivery.blocks.naming import contained
from patient_delivery.blocks.s3.crt import CrtWriter, PendingPut

if TYPE_CHECKING:
    from patient_delivery.blocks.s3.block import S3Destination


def receipt(upload: Upload, checksum: str, echoed: str | None) -> Receipt:
    """The upload's receipt, unless S3 echoed a different checksum than the one we sent."""
    if echoed and echoed != checksum:
        raise TransientDeliveryError("S3 answered with a different SHA-256: checksum mismatch")
    return Receipt(path=upload.path, size=len(upload.content), sha256=upload.sha256)


def answer(
    key: K, upload: Upload, checksum: str, pending: PendingPut
) -> tuple[K, Receipt | DeliveryError]:
    """A put's outcome once S3 has answered it."""
    try:
        return key, receipt(upload, checksum, pending.wait().get("x-amz-checksum-sha256"))
    except DeliveryError as exc:
        return key, exc


class S3Session(DestinationSession):
    def __init__(self, destination: S3Destination, client: Any, writer: CrtWriter | None) -> None:
        self.destination = destination
        self.client = client  # boto3: deletes, and puts when the block asks for boto3
        self.writer = writer

    def upload(self, path: str, content: bytes, sha256: str) -> Receipt:
        if self.writer is not None:
            return self.upload_one_through_many(path, content, sha256)
        upload = Upload(path, content, sha256)
        key, checksum, content_type = self.prepare(upload)
        echoed = self.put_with_boto3(key, content, checksum, content_type)
        return receipt(upload, checksum, echoed)

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
                object_key, checksum, content_type = self.prepare(upload)
                headers = self.destination.put_headers(checksum, content_type)
                pending = writer.start(object_key, upload.content, headers)
            except DeliveryError as exc:
                yield key, exc
                continue
            on_their_way.append((key, upload, checksum, pending))
            if len(on_their_way) >= self.destination.files_in_flight:
                yield answer(*on_their_way.popleft())
        while on_their_way:
            yield answer(*on_their_way.popleft())

    def prepare(self, upload: Upload) -> tuple[str, str, str]:
        """Checked content; the object key, the SHA-256 as S3 wants it, the content type."""
        check_content(upload.content, upload.sha256)
        checksum = base64.b64encode(bytes.fromhex(upload.sha256)).decode()
        content_type = (
            "application/fhir+json" if upload.path.endswith(".json") else "application/xml"
        )
        return contained(upload.path), checksum, content_type

    def put_with_boto3(self, key: str, content: bytes, checksum: str, content_type: str) -> str:
        """One PutObject through boto3; the SHA-256 S3 echoed."""
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
                Key=contained(path),
                ExpectedBucketOwner=self.destination.bucket_owner,
            )
        except ClientError as exc:
            raise self.destination.explain(exc, "delete") from None
