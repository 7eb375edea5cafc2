"""Which destinations are failing or down, and since when: known trouble, told apart from new.

A run that had failures at a destination and delivered nothing to it notes the destination as
failing (since then, found by that run); a run that delivers anything to it clears the note.
After `down_after_runs` such runs in a row the destination is **down**: runs skip it without
trying and its deliveries wait (neither failed nor lost) until a probe reaches it, the first
`probe_first_seconds` after it went down, then each after as long again as it has been down
(at most `probe_most_seconds`); `destination resume` ends it by hand. A run whose only failures
are at destinations already failing when it began ends Completed, so the runs that deliver
every other organization's updates stay green; the "down" and "back" alerts tell, once each.

A destination whose deliveries no run can send (its block cannot be used) waits too, until a
time: no run claims its deliveries (`ledger.claim`), so overlapping runs do not take turns
parking the same ones. A run that starts checks whether the waiting destinations' blocks can
be used again and resumes those.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, Select, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from patient_delivery.settings import get_settings
from patient_delivery.store import Store
from patient_delivery.store.models import DestinationFailing, DestinationWaiting

DOWN = "down"
"""The kind of wait of a destination down (the other: "unusable", a block)."""

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


@dataclass(frozen=True)
class Noted:
    """What a run's outcome changed: destinations that went down (with the reason), and
    destinations that were down and took deliveries again."""

    down: dict[str, str] = field(default_factory=dict)
    back: dict[str, datetime] = field(default_factory=dict)
    """Destinations back, each with since when it had been failing."""


def note(
    store: Store, run: str, delivered_to: Collection[str], failing_at: Mapping[str, str]
) -> Noted:
    """After a run: the destinations it delivered to are healthy again (and no longer down);
    those it only failed at (with a reason) are failing, since now unless they already were,
    and down once `down_after_runs` runs in a row found them so."""
    settings = get_settings()
    now = datetime.now(UTC)
    noted = Noted()
    with store.session() as session:
        if delivered_to:
            healed = session.execute(
                select(DestinationFailing.destination, DestinationFailing.since).where(
                    DestinationFailing.destination.in_(list(delivered_to)),
                    DestinationFailing.runs >= settings.down_after_runs,
                )
            )
            noted.back.update({destination: since for destination, since in healed})
            session.execute(
                delete(DestinationFailing).where(
                    DestinationFailing.destination.in_(list(delivered_to))
                )
            )
            session.execute(
                delete(DestinationWaiting).where(
                    DestinationWaiting.destination.in_(list(delivered_to)),
                    DestinationWaiting.kind == DOWN,
                )
            )
        known = {
            row.destination: row
            for row in session.scalars(
                select(DestinationFailing)
                .where(DestinationFailing.destination.in_(list(failing_at)))
                .with_for_update()
            )
        }
        for destination, reason in failing_at.items():
            row = known.get(destination)
            if row is None:
                try:
                    with session.begin_nested():  # another run may note it at the same moment
                        row = DestinationFailing(
                            destination=destination,
                            first_run=run,
                            reason=reason[:500],
                            since=now,
                            runs=1,
                        )
                        session.add(row)
                except IntegrityError:
                    continue
            else:
                row.runs += 1
            if row.runs >= settings.down_after_runs:
                if row.runs == settings.down_after_runs:
                    noted.down[destination] = reason
                _mark_down(session, destination, reason, row.since, now)
    return noted


def _mark_down(session: Session, destination: str, reason: str, since: datetime,
               now: datetime) -> None:  # fmt: skip
    """The destination's deliveries wait until a probe reaches it, the next one after the
    backoff."""
    until = now + _backoff(since, now)
    row = session.get(DestinationWaiting, destination, with_for_update=True)
    if row is None:
        try:
            with session.begin_nested():
                session.add(DestinationWaiting(destination=destination, reason=reason[:500],
                                               since=since, until=until, kind=DOWN))  # fmt: skip
        except IntegrityError:
            pass
    else:
        row.reason, row.until, row.kind = reason[:500], max(row.until, until), DOWN


def _backoff(since: datetime, now: datetime) -> timedelta:
    """How long until the next probe: as long as the destination has been down, between
    `probe_first_seconds` and `probe_most_seconds` (so the waits about double)."""
    settings = get_settings()
    seconds = min(max((now - since).total_seconds(), settings.probe_first_seconds),
                  settings.probe_most_seconds)  # fmt: skip
    return timedelta(seconds=seconds)


def probes_due(store: Store, destinations: Collection[str] | None = None) -> list[str]:
    """The destinations down whose next probe is due (of `destinations`, when given), taken
    by this caller: their next probe is moved past the backoff first, so runs starting at the
    same moment do not probe the same destination."""
    now = datetime.now(UTC)
    taken = []
    with store.session() as session:
        due = select(DestinationWaiting).where(
            DestinationWaiting.kind == DOWN, DestinationWaiting.until <= now
        )
        if destinations is not None:
            due = due.where(DestinationWaiting.destination.in_(list(destinations)))
        for row in session.scalars(due).all():
            moved = session.execute(
                update(DestinationWaiting)
                .where(DestinationWaiting.destination == row.destination,
                       DestinationWaiting.until == row.until)
                .values(until=now + _backoff(row.since, now))
            )  # fmt: skip
            if moved.rowcount:  # type: ignore[attr-defined]
                taken.append(row.destination)
    return taken


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


def probe_now(store: Store, destinations: Collection[str] | None = None) -> int:
    """Make the next probe of the destinations down (of `destinations`, when given) due now:
    a re-delivery asked for tries them at its start. How many were down."""
    with store.session() as session:
        due = update(DestinationWaiting).where(DestinationWaiting.kind == DOWN)
        if destinations is not None:
            due = due.where(DestinationWaiting.destination.in_(list(destinations)))
        moved = session.execute(due.values(until=datetime.now(UTC)))
        return int(moved.rowcount or 0)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Wait:
    """Why a destination's deliveries wait, since when, and until when: for a block that
    cannot be used, the end of the wait; for a destination down, the next probe."""

    reason: str
    since: datetime
    until: datetime
    down: bool


def waiting(store: Store) -> dict[str, Wait]:
    """The destinations whose deliveries wait now."""
    now = datetime.now(UTC)
    with store.session() as session:
        rows = session.scalars(select(DestinationWaiting).where(_waits_now(now)))
        return {row.destination: Wait(row.reason, row.since, row.until, row.kind == DOWN)
                for row in rows}  # fmt: skip


def waiting_destinations(now: datetime) -> Select[tuple[str]]:
    """The destinations no run claims deliveries of, as a subquery (`ledger`'s claims)."""
    return select(DestinationWaiting.destination).where(_waits_now(now))


def _waits_now(now: datetime) -> ColumnElement[bool]:
    return or_(DestinationWaiting.until > now, DestinationWaiting.kind == DOWN)


def resume(store: Store, destinations: Collection[str]) -> int:
    """Let runs claim these destinations' deliveries again; how many destinations waited."""
    if not destinations:
        return 0
    with store.session() as session:
        result = session.execute(
            delete(DestinationWaiting).where(DestinationWaiting.destination.in_(list(destinations)))
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
