"""Check destination blocks the moment they are saved.

Prefect's block forms do not apply a block's own rules (a template's variables, an absolute
root...): a block saved from the UI is stored as typed. The `check-destination` deployment runs
when one of our destination blocks is saved and loads it as a delivery run would. A block that
breaks its rules ends the run Failed with the fields and rules it broke (never their values)
and raises `patient-delivery.destination.unusable`, whose alert tells the people who fix it,
before a delivery run has to park anything for it. A valid block saved for a destination that
is down (a new password, a host key pinned again) has its probe made due, so the next run tries
it instead of waiting out the backoff.

Saves come in bursts (a script that sets up 200 organizations): the deployment's trigger fires
at the first save and then at most once per `SAVES_WINDOW_SECONDS`, passing when that first
save happened; the run waits for the window to end and checks every block saved in it. A burst
costs a run per window, not a process per save.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from prefect import flow, get_run_logger

from patient_delivery import destination_health
from patient_delivery.blocks.loading import BlockProblem, saved_since
from patient_delivery.blocks.loading import check_destination as load_checked
from patient_delivery.flows import reporting
from patient_delivery.store import open_store

CHECK_SECONDS = 300.0
"""A check reads its blocks from Prefect; five minutes means something is wrong with Prefect."""

SAVES_WINDOW_SECONDS = 10.0
"""The trigger's `within` in prefect.yaml: saves this long after the first go in one run."""

CLOCK_MARGIN = timedelta(seconds=1)
"""Slack around the window for timestamps rounded or taken a moment apart by the server."""


class DestinationUnusable(Exception):
    """A saved destination block breaks its rules (the message names fields, not values)."""


@flow(name="check-destination", flow_run_name="check {destination}",
      timeout_seconds=CHECK_SECONDS, validate_parameters=True)  # fmt: skip
def check_destination(destination: str, saved_from: datetime | None = None) -> str:
    """Load destination blocks as a delivery run would; fail, and announce each unusable one,
    when any breaks its rules.

    Args:
        destination: A block, as TYPE/NAME (local-destination/acme); its trigger fills in the
            first one saved.
        saved_from: When a burst of saves began (its trigger fills it in): every destination
            block saved from then to the end of the trigger's window is checked too.
    """
    references = {destination}
    if saved_from is not None:
        window_ends = saved_from.timestamp() + SAVES_WINDOW_SECONDS + CLOCK_MARGIN.seconds
        time.sleep(max(0.0, window_ends - time.time()))  # the burst's later saves are in
        references.update(saved_since(saved_from - CLOCK_MARGIN))
    problems: dict[str, str] = {}
    for reference in sorted(references):
        try:
            load_checked(reference)
        except BlockProblem as problem:
            reporting.announce_unusable(reference, str(problem))
            problems[reference] = str(problem)
    valid = sorted(references - set(problems))
    down = destination_health.probe_now(open_store(), valid) if valid else 0  # a fix, likely
    if problems:
        raise DestinationUnusable(" | ".join(problems.values()))  # each names its block
    get_run_logger().info("%d destination block(s) valid: %s", len(valid), ", ".join(valid))
    if len(valid) == 1:
        [only] = valid
        return f"{only} is valid" + ("; it is down, and the next run probes it" if down else "")
    return f"{len(valid)} destination blocks are valid" + (
        f"; {down} of them down, which the next run probes" if down else ""
    )
