"""What a delivery run tells people: counts per destination, progress, the summary, events.

Everything here carries IDs, destination names, counts and reasons; never document content.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prefect.events import emit_event

from flows import runtime
from patient_delivery.ledger import Outcome


@dataclass
class BatchReport:
    """What one upload (or render) did for one destination: counts and reasons only."""

    destination: str
    worker: str | None = None
    """host:pid of the process that sent the documents (the flow's own, or a Dask worker)."""
    delivered: int = 0
    failed: int = 0
    skipped: int = 0
    bytes: int = 0
    seconds: float = 0.0
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

    def absorb(self, other: BatchReport) -> None:
        """Add another report's counts to this one (seconds add up as lane-seconds)."""
        self.delivered += other.delivered
        self.failed += other.failed
        self.skipped += other.skipped
        self.bytes += other.bytes
        self.seconds += other.seconds
        self.reasons.update(other.reasons)


@dataclass
class RunSummary:
    """A delivery run's outcome per destination: what the CLI prints and the artifact shows."""

    flow_run_id: str
    destinations: dict[str, BatchReport] = field(default_factory=dict)
    workers: Counter[str] = field(default_factory=Counter)
    """Documents sent per process (host:pid)."""

    def add(self, report: BatchReport) -> None:
        if report.worker:
            self.workers[report.worker] += report.delivered + report.failed
        self.destinations.setdefault(report.destination, BatchReport(report.destination)).absorb(
            report
        )

    def headline(self) -> str:
        """One line for the run's state message: counts, never content."""
        failing = [r.destination for r in self.destinations.values() if r.failed]
        return (
            f"{self.failed} of {self.failed + self.delivered} deliveries failed "
            f"(to {', '.join(failing)}); see `patient-delivery deliveries --status failed`"
        )

    @property
    def delivered(self) -> int:
        return sum(r.delivered for r in self.destinations.values())

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.destinations.values())

    def rows(self) -> list[dict[str, object]]:
        return [
            {
                "destination": r.destination,
                "delivered": r.delivered,
                "failed": r.failed,
                "skipped": r.skipped,
                "bytes": r.bytes,
                "upload seconds": round(r.seconds, 2),
                "failure reasons": "; ".join(f"{n} x {why}" for why, n in r.reasons.most_common()),
            }
            for r in self.destinations.values()
        ]


progress_hooks: list[Callable[[int, int], None]] = []
"""Callables told (done, total) as batches finish, in this process: the CLI's progress bar."""


class Progress:
    """A progress artifact that moves as uploads finish (created only for runs with work)."""

    EVERY_SECONDS = 1.0
    """At most one update a second (and the last): each is a call to Prefect's API, and the
    upload tasks of a page tend to finish together."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.updated = time.monotonic()
        self.shown = 0.0
        self.artifact_id = (
            runtime.create_progress(0.0, f"{total} deliveries owed at start") if total else None
        )

    def update(self, done: int, final: bool = False) -> None:
        if not final:
            for hook in progress_hooks:
                hook(done, self.total)
        share = min(100.0, 100.0 * done / max(1, self.total))
        if self.artifact_id is None or share == self.shown:
            return
        if not final and done < self.total and time.monotonic() - self.updated < self.EVERY_SECONDS:
            return
        self.updated, self.shown = time.monotonic(), share
        runtime.update_progress(self.artifact_id, share)


def publish(summary: RunSummary) -> None:
    """The run's summary as a table artifact (`delivery-summary`)."""
    rows = summary.rows() or [{"destination": "(none)", "delivered": 0, "failed": 0}]
    description = f"Delivery run: {summary.delivered} delivered, {summary.failed} failed."
    runtime.create_table(rows, key="delivery-summary", description=description)


def announce_failing_destinations(summary: RunSummary) -> None:
    """One event per destination with failures, for the "keeps failing" alert (counts only)."""
    for report in summary.destinations.values():
        if report.failed:
            reason = report.reasons.most_common(1)[0][0] if report.reasons else "unknown"
            emit_event(
                event="patient-delivery.destination.failed",
                resource={
                    "prefect.resource.id": f"patient-delivery.destination.{report.destination}",
                    "prefect.resource.name": report.destination,
                },
                payload={"failed": report.failed, "delivered": report.delivered, "reason": reason},
            )
