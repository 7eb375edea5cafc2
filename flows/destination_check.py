"""Check a destination block the moment it is saved.

Prefect's block forms do not apply a block's own rules (a template's variables, an absolute
root...): a block saved from the UI is stored as typed. The `check-destination` deployment runs
on every save of one of our destination blocks and loads it as a delivery run would. A block
that breaks its rules ends the run Failed with the fields and rules it broke (never their
values) and raises `patient-delivery.destination.unusable`, whose alert tells the people who
fix it, before a delivery run has to park anything for it. A valid block saved for a
destination that is down (a new password, a host key pinned again) has its probe made due, so
the next run tries it instead of waiting out the backoff.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from patient_delivery import destination_health
from patient_delivery.blocks.loading import BlockProblem
from patient_delivery.blocks.loading import check_destination as load_checked
from patient_delivery.flows import reporting
from patient_delivery.store import open_store

CHECK_SECONDS = 300.0
"""A check reads one block from Prefect; five minutes means something is wrong with Prefect."""


class DestinationUnusable(Exception):
    """A saved destination block breaks its rules (the message names fields, not values)."""


@flow(name="check-destination", flow_run_name="check {destination}",
      timeout_seconds=CHECK_SECONDS, validate_parameters=True)  # fmt: skip
def check_destination(destination: str) -> str:
    """Load a destination block as a delivery run would; fail, and announce it unusable, when
    it breaks its rules.

    Args:
        destination: The block, as TYPE/NAME (local-destination/acme); its trigger fills it in.
    """
    try:
        load_checked(destination)
    except BlockProblem as problem:
        reporting.announce_unusable(destination, str(problem))
        raise DestinationUnusable(str(problem)) from None
    get_run_logger().info("%s is valid", destination)
    if destination_health.probe_now(open_store(), [destination]):  # a fix, likely: try it now
        get_run_logger().info("%s is down: the next run probes it", destination)
        return f"{destination} is valid; it is down, and the next run probes it"
    return f"{destination} is valid"
