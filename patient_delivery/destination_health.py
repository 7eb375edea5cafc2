"""Which destinations are failing, and since when: known trouble, told apart from new trouble.

A run that had failures at a destination and delivered nothing to it notes the destination as
failing (since then, found by that run); a run that delivers anything to it clears the note.
A later run whose only failures are at destinations noted before it began ends Completed: the
"keeps failing" alert covers those, and the runs that deliver every other organization's
updates stay green. A destination newly failing still fails its run.

A destination whose deliveries no run can send (its block cannot be used) is made to **wait**:
until a time, no run claims its deliveries (`ledger.claim`), so overlapping runs do not take
turns parking the same ones. A run that starts checks whether the waiting destinations' blocks
can be used again and resumes those; `destination resume` does it by hand.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from patient_delivery.store import Store
from patient_delivery.store.models import DestinationFailing, DestinationWaiting

PARKED_WAIT = timedelta(minutes=5)
"""How long the deliveries of a destination whose block cannot be used wait before a run claims
them again, when nobody fixed the block meanwhile (a fixed block is resumed at a run's start)."""


def failing(store: Store, run: str) -> dict[str, datetime]:
    """The destinations earlier runs found failing, each with the time it was first found so."""
    with store.session() as session:
        rows = session.execute(
            select(DestinationFailing.destination, DestinationFailing.since).where(
                DestinationFailing.first_run != run
            )
        )
        return {destination: since for destination, since in rows}


def note(
    store: Store, run: str, delivered_to: Collection[str], failing_at: Mapping[str, str]
) -> None:
    """After a run: the destinations it delivered to are healthy again; those it only failed
    at (with a reason) are failing, since now unless they already were."""
    with store.session() as session:
        if delivered_to:
            session.execute(
                delete(DestinationFailing).where(
                    DestinationFailing.destination.in_(list(delivered_to))
                )
            )
        known = set(
            session.scalars(
                select(DestinationFailing.destination).where(
                    DestinationFailing.destination.in_(list(failing_at))
                )
            )
        )
        for destination, reason in failing_at.items():
            if destination in known:
                continue
            try:
                with session.begin_nested():  # another run may note it at the same moment
                    session.add(DestinationFailing(destination=destination, first_run=run,
                                                   reason=reason[:500]))  # fmt: skip
            except IntegrityError:
                pass


def wait(store: Store, destination: str, reason: str, until: datetime) -> None:
    """Let no run claim the destination's deliveries until `until` (later, if it already
    waits longer), with the reason."""
    with store.session() as session:
        row = session.get(DestinationWaiting, destination, with_for_update=True)
        if row is None:
            try:
                with session.begin_nested():  # another run may note it at the same moment
                    session.add(DestinationWaiting(destination=destination, reason=reason[:500],
                                                   until=until))  # fmt: skip
            except IntegrityError:
                pass
        else:
            row.reason, row.until = reason[:500], max(row.until, until)


def park(store: Store, destination: str, reason: str) -> None:
    """The destination's block cannot be used: its deliveries wait `PARKED_WAIT`."""
    wait(store, destination, reason, datetime.now(UTC) + PARKED_WAIT)


def waiting(store: Store) -> dict[str, tuple[str, datetime]]:
    """The destinations whose deliveries wait now: the reason, and until when."""
    now = datetime.now(UTC)
    with store.session() as session:
        rows = session.execute(
            select(DestinationWaiting.destination, DestinationWaiting.reason,
                   DestinationWaiting.until).where(DestinationWaiting.until > now)
        )  # fmt: skip
        return {destination: (reason, until) for destination, reason, until in rows}


def resume(store: Store, destinations: Collection[str]) -> int:
    """Let runs claim these destinations' deliveries again; how many destinations waited."""
    if not destinations:
        return 0
    with store.session() as session:
        result = session.execute(
            delete(DestinationWaiting).where(DestinationWaiting.destination.in_(list(destinations)))
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
