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

__all__ = [
    "ConnectionReport",
    "DeliveryError",
    "Destination",
    "DestinationSession",
    "LocalDestination",
    "Receipt",
    "TerminalDeliveryError",
    "TransientDeliveryError",
]
