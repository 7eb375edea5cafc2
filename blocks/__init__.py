"""Destination blocks. `prefect block register -m blocks` registers every one of them."""

from patient_delivery.blocks.base import Destination
from patient_delivery.blocks.contract import (
    DeliveryError,
    DestinationSession,
    Receipt,
    TerminalDeliveryError,
    TransientDeliveryError,
)
from patient_delivery.blocks.loading import (
    DESTINATION_TYPES,
    BlockProblem,
    MissingBlock,
    check_destination,
    load_destination,
    load_destinations,
    problem,
)
from patient_delivery.blocks.local import LocalDestination
from patient_delivery.blocks.probe import ConnectionReport
from patient_delivery.blocks.s3 import S3Destination
from patient_delivery.blocks.sftp import SftpDestination

__all__ = [
    "DESTINATION_TYPES",
    "BlockProblem",
    "ConnectionReport",
    "DeliveryError",
    "Destination",
    "DestinationSession",
    "LocalDestination",
    "MissingBlock",
    "Receipt",
    "S3Destination",
    "SftpDestination",
    "TerminalDeliveryError",
    "TransientDeliveryError",
    "check_destination",
    "load_destination",
    "load_destinations",
    "problem",
]
