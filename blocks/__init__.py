"""Destination blocks. `prefect block register -m blocks` registers every one of them."""

from blocks.base import (
    ConnectionReport,
    DeliveryError,
    Destination,
    DestinationSession,
    Receipt,
    TerminalDeliveryError,
    TransientDeliveryError,
)
from blocks.local import LocalDestination
from blocks.s3 import S3Destination
from blocks.sftp import SftpDestination

DESTINATION_TYPES: dict[str, type[Destination]] = {
    kind.get_block_type_slug(): kind for kind in (LocalDestination, S3Destination, SftpDestination)
}
"""Our destination block types by slug (`sftp-destination`, ...), to load without a lookup."""

__all__ = [
    "DESTINATION_TYPES",
    "ConnectionReport",
    "DeliveryError",
    "Destination",
    "DestinationSession",
    "LocalDestination",
    "Receipt",
    "S3Destination",
    "SftpDestination",
    "TerminalDeliveryError",
    "TransientDeliveryError",
]
