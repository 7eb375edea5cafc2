"""The S3 destination: an organization's bucket, written through an IAM role it created.

block.py             settings, validation, and what S3's answers mean
clients.py           the role's refreshable credentials, the boto3 client, the CRT writer
session.py           puts with a SHA-256 checksum and the bucket owner's account
crt.py               PutObject through the AWS Common Runtime, several on their way at once
botocore_adapter.py  every use of botocore's internals
"""

from patient_delivery.blocks.s3.block import PUT_HEADERS, S3Destination
from patient_delivery.blocks.s3.session import S3Session

__all__ = ["PUT_HEADERS", "S3Destination", "S3Session"]
