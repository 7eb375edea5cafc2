"""Destination blocks. `prefect block register -m blocks` registers every one of them."""

from prefect.blocks.core import Block

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


def load_destination(reference: str) -> Destination:
    """The destination block saved as `block-type/name`.

    Our own block types load through their class: `Block.load` first imports every installed
    Prefect collection to find the class (prefect-dask pulls in Dask's `distributed`).
    """
    slug, _, name = reference.partition("/")
    kind = DESTINATION_TYPES.get(slug)
    destination = kind.load(name) if kind is not None and name else Block.load(reference)
    if not isinstance(destination, Destination):
        raise TypeError(f"block {reference!r} is not a destination")
    return destination


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
    "load_destination",
]
