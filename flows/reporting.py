"""What a delivery run tells people: counts per destination, progress, the summary, events.

Everything here carries IDs, destination names, counts and reasons; never document content.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext
from prefect.events import emit_event
from prefect.runtime import flow_run

from patient_delivery.destination_health import Noted
from patient_delivery.flows import runtime
from patient_delivery.ledger import Outcome


@dataclass
class BatchReport:
    """What one upload (or render) did for one destination: counts and reasons only."""

    destination: str
    worker: str | None = None
    """host:pid of the process that sent the documents (the flow's own, or a Dask worker)."""
    delivered: int = 0
    failed: int = 0
    parked: int = 0
    """Deliveries left for a later run because the destination's block cannot be used (missing
    or invalid): a problem of that destination's setup, alerted on its own, not a failed send."""
    skipped: int = 0
    unrendered: int = 0
    """Of `failed`: deliveries whose path could not be rendered from their own values, a
    problem of those documents, not of the destination."""
    bytes: int = 0
    began: float | None = None
    ended: float | None = None
    """When its first send started and its last ended (wall clock, epoch seconds)."""
    reasons: Counter[str] = field(default_factory=Counter)

    def count(self, outcomes: Iterable[Outcome]) -> None:
        """Add the outcomes of sends to this destination."""
        for outcome in outcomes:
            if outcome.delivered:
                self.delivered += 1
                self.bytes += outcome.size or 0
            else:
                self.failed += 1
                self.reasons[outcome.error or "unknown"] += 1

    @property
    def seconds(self) -> float:
        """Wall-clock time from its first send to its last, over every lane."""
        return (self.ended - self.began) if self.began and self.ended else 0.0

    @property
    def destination_failing(self) -> bool:
        """Whether sends to it failed and none went through: trouble of the destination."""
        return self.failed > self.unrendered and not self.delivered

    def reasons_text(self) -> str:
        """Why its sends failed, each reason with its count, most frequent first."""
        return "; ".join(f"{n} x {why}" for why, n in self.reasons.most_common())

    def absorb(self, other: BatchReport) -> None:
        """Add another report's counts and time span to this one."""
        self.delivered += other.delivered
        self.failed += other.failed
        self.parked += other.parked
        self.skipped += other.skipped
        self.unrendered += other.unrendered
        self.bytes += other.bytes
        if other.began is not None:
            self.began = min(self.began or other.began, other.began)
        if other.ended is not None:
            self.ended = max(self.ended or other.ended, other.ended)
        self.reasons.update(other.reasons)


class WaveReports(list[BatchReport]):
    """An upload wave's reports. Shown by count alone: Prefect writes a failed task's result
    into its log line, where the reasons already stand once, in the wave's own ERROR lines."""

    def __repr__(self) -> str:
        return f"{len(self)} batch reports"


SEE_FAILED = "see `patient-delivery deliveries --status failed`"
"""Where a run's state message sends a reader for each failed delivery and its reason."""


@dataclass
class RunSummary:
    """A delivery run's outcome per destination: what the CLI prints and the artifact shows."""

    flow_run_id: str
    destinations: dict[str, BatchReport] = field(default_factory=dict)
    workers: Counter[str] = field(default_factory=Counter)
    """Documents sent per process (host:pid)."""
    manifests_failed: dict[str, str] = field(default_factory=dict)
    """Destinations whose manifest could not be written, with the reason."""
    failing_before: dict[str, datetime] = field(default_factory=dict)
    """Destinations earlier runs already found failing (nothing delivered), since when."""
    waiting: dict[str, str] = field(default_factory=dict)
    """Destinations whose deliveries wait (their block still cannot be used), with the reason:
    this run did not claim them."""
    down: dict[str, str] = field(default_factory=dict)
    """Destinations down, skipped by this run: since when, why, and the next probe."""

    def add(self, report: BatchReport) -> None:
        if report.worker:
            self.workers[report.worker] += report.delivered + report.failed
        self.destinations.setdefault(report.destination, BatchReport(report.destination)).absorb(
            report
        )

    def headline(self) -> str:
        """One line for the run's state message: counts, never content."""
        failing = [r.destination for r in self.destinations.values() if r.failed]
        parts = []
        if self.failed:
            parts.append(
                f"{self.failed} of {self.failed + self.delivered} deliveries failed (to "
                f"{', '.join(failing)}); {SEE_FAILED}"
            )
        for destination, why in self.manifests_failed.items():
            parts.append(f"manifest not written to {destination}: {why}")
        line = "; ".join(parts) or f"{self.delivered} delivered"
        return line + self.parked_note()

    def still_failing(self) -> list[BatchReport]:
        """Destinations failing as they were before this run: failures, nothing delivered, and
        already so for an earlier run. Known trouble: their own alert covers them, and they do
        not make the run fail."""
        return [
            r
            for r in self.destinations.values()
            if r.destination_failing and not r.unrendered and r.destination in self.failing_before
        ]

    def new_trouble(self) -> bool:
        """Whether the run found something to fail for: a failure at a destination that was
        not already failing (or that took some deliveries this time), or a manifest not
        written."""
        known = {r.destination for r in self.still_failing()}
        fresh = any(r.failed for r in self.destinations.values() if r.destination not in known)
        return fresh or bool(self.manifests_failed)

    def still_failing_note(self) -> str:
        """The state message of a run whose only failures are known trouble."""
        known = self.still_failing()
        since = min(self.failing_before[r.destination] for r in known)
        return (
            f"{self.delivered} delivered; {sum(r.failed for r in known)} not delivered to "
            f"{', '.join(r.destination for r in known)}, failing since "
            f"{since:%Y-%m-%d %H:%M} UTC; {SEE_FAILED}{self.parked_note()}"
        )

    def parked_note(self) -> str:
        """What waits for a destination block to be fixed or for a destination down to be
        reached, as a clause (empty when nothing)."""
        blocked = [r.destination for r in self.destinations.values() if r.parked]
        note = f"; {self.parked} parked until their block is fixed ({', '.join(blocked)})"
        waiting = [ref for ref in self.waiting if ref not in blocked]
        if waiting:
            note += f"; waiting for their block to be fixed: {', '.join(waiting)}"
        if self.down:
            note += f"; down, skipped until a probe reaches them: {', '.join(self.down)}"
        return note if blocked or waiting or self.down else ""

    @property
    def delivered(self) -> int:
        return sum(r.delivered for r in self.destinations.values())

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.destinations.values())

    @property
    def parked(self) -> int:
        return sum(r.parked for r in self.destinations.values())

    @property
    def done(self) -> int:
        """Deliveries this run has answered for: delivered, failed or parked."""
        return self.delivered + self.failed + self.parked

    def rows(self) -> list[dict[str, object]]:
        return [
            {
                "destination": r.destination,
                "delivered": r.delivered,
                "failed": r.failed,
                "parked": r.parked,
                "skipped": r.skipped,
                "MB": round(r.bytes / 1e6, 2),
                "upload seconds": round(r.seconds, 2),
                REASONS: r.reasons_text(),
            }
            for r in self.destinations.values()
        ]


REASONS = "failure reasons"
"""The column of `RunSummary.rows` with why sends failed, each reason with its count."""

progress_hooks: list[Callable[[int, int], None]] = []
"""Callables told (done, total) as batches finish, in this process: the CLI's progress bar."""


PROGRESS_KEY = "delivery-progress"

_GENERATED_NAME = re.compile(r"^[a-z]+-[a-z]+$")
"""Prefect's own names for runs (`crafty-lemur`): any other name was given by a person."""


def run_name(describe: Callable[[], str]) -> str:
    """A run's name: the one a person gave it (the UI's custom-run form, `--name`), or else
    `describe()` and, for a deployment's run, what started it (`deliver cardio to
    sftp-destination/acme, scheduled`, `deliver all-projects, trigger: patient data
    updated`)."""
    given = flow_run.name
    if given and not _GENERATED_NAME.match(given):
        return given
    context = FlowRunContext.get()
    return describe() + (started_by(context.flow_run) if context and context.flow_run else "")


def started_by(run: FlowRun) -> str:
    """What started a deployment's run, as the end of its name: its schedule, an automation
    (a deployment's trigger is one, named in prefect.yaml), or a person (the UI, the CLI, the
    API). Empty for a flow called directly."""
    if run.deployment_id is None:
        return ""
    if run.auto_scheduled:
        return ", scheduled"
    if run.created_by is not None and run.created_by.type == "AUTOMATION":
        return f", trigger: {run.created_by.display_value or 'an automation'}"
    return ", on demand"


class Progress:
    """A progress artifact that moves as uploads finish (created only for runs with work)."""

    EVERY_SECONDS = 1.0
    """At most one update a second (and the last): each is a call to Prefect's API, and the
    upload tasks of a page tend to finish together."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.updated = time.monotonic()
        self.shown = (0, total)
        """The counts last shown: done, and of how many."""
        self.artifact_id = (
            runtime.create_progress(0.0, PROGRESS_KEY, f"0 of {total} deliveries done")
            if total
            else None
        )

    def grow(self, more: int) -> None:
        """More deliveries joined the run (updates that arrived while it was sending)."""
        self.total += more
        if self.artifact_id is None and self.total:
            self.artifact_id = runtime.create_progress(
                0.0, PROGRESS_KEY, f"0 of {self.total} deliveries done"
            )

    def update(self, done: int, final: bool = False) -> None:
        if not final:
            for hook in progress_hooks:
                hook(done, self.total)
        share = min(100.0, 100.0 * done / max(1, self.total))
        if self.artifact_id is None or (done, self.total) == self.shown:
            return
        if not final and done < self.total and time.monotonic() - self.updated < self.EVERY_SECONDS:
            return
        self.updated, self.shown = time.monotonic(), (done, self.total)
        # The count says what the run took on so far: updates that joined it count too.
        runtime.update_progress(self.artifact_id, share, f"{done} of {self.total} deliveries done")


def publish(summary: RunSummary) -> None:
    """The run's summary as a table artifact (`delivery-summary`): counts per destination in
    the table, and under the headline, each failing destination's reasons as a list, where the
    UI wraps them (a table cell is cut at the page's width)."""
    rows = [{k: v for k, v in row.items() if k != REASONS} for row in summary.rows()]
    parked = f", {summary.parked} parked until their block is fixed" if summary.parked else ""
    description = f"Delivery run: {summary.delivered} delivered, {summary.failed} failed{parked}."
    if summary.waiting:
        description += "\n\nWaiting for their block to be fixed (not claimed by this run):\n\n"
        description += "\n".join(f"- {_markdown(ref)}: {_markdown(why)}"
                                  for ref, why in summary.waiting.items())  # fmt: skip
    if summary.down:
        description += "\n\nDown (skipped by this run until a probe reaches them):\n\n"
        description += "\n".join(f"- {_markdown(ref)}: {_markdown(why)}"
                                  for ref, why in summary.down.items())  # fmt: skip
    failing = [r for r in summary.destinations.values() if r.reasons]
    if failing:
        description += "\n\nWhy sends failed:\n\n" + "\n".join(
            f"- {_markdown(r.destination)}: {_markdown(r.reasons_text())}" for r in failing
        )
    runtime.create_table(
        rows or [{"destination": "(none)", "delivered": 0, "failed": 0}],
        key="delivery-summary",
        description=description,
    )


_MARKDOWN = re.compile(r"([\\`*_\[\]<>|])")


def _markdown(text: str) -> str:
    """Text shown as itself in the UI's markdown, one line."""
    return _MARKDOWN.sub(r"\\\1", " ".join(text.split()))


def announce_failing_destinations(summary: RunSummary) -> None:
    """One event per destination with failures, and one per destination whose block cannot be
    used, for its own alert (counts and reasons only)."""
    for report in summary.destinations.values():
        if report.parked:
            _announce(report, "unusable", {"parked": report.parked})
        if report.failed:
            _announce(report, "failed", {"failed": report.failed, "delivered": report.delivered})


def announce_health(noted: Noted) -> None:
    """One event per destination that went down (for the "down" alert), and one per
    destination down that took deliveries again (the "back" alert): once each, not per run."""
    for destination, reason in noted.down.items():
        _emit_destination(destination, "down", {"reason": reason})
    for destination, since in noted.back.items():
        _emit_destination(destination, "back", {"failing_since": since.isoformat()})


def announce_behind(destination: str, oldest_owed_seconds: float, objective_minutes: int) -> None:
    """The oldest delivery owed to a destination is older than its lag objective."""
    _emit_destination(destination, "behind", {
        "oldest_owed_minutes": round(oldest_owed_seconds / 60, 1),
        "objective_minutes": objective_minutes,
    })  # fmt: skip


def announce_unusable(destination: str, reason: str) -> None:
    """A destination's block cannot be used, found before any delivery was parked for it."""
    _emit_destination(destination, "unusable", {"parked": 0, "reason": reason})


def _announce(report: BatchReport, what: str, counts: dict[str, int]) -> None:
    reason = report.reasons.most_common(1)[0][0] if report.reasons else "unknown"
    _emit_destination(report.destination, what, {**counts, "reason": reason})


def _emit_destination(destination: str, what: str, payload: dict[str, object]) -> None:
    emit_event(
        event=f"patient-delivery.destination.{what}",
        resource={
            "prefect.resource.id": f"patient-delivery.destination.{destination}",
            "prefect.resource.name": destination,
        },
        payload=payload,
    )
