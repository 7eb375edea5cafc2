"""Which destinations are failing, and since when: known trouble, told apart from new trouble.

A run that had failures at a destination and delivered nothing to it notes the destination as
failing (since then, found by that run); a run that delivers anything to it clears the note.
A later run whose only failures are at destinations noted before it began ends Completed: the
"keeps failing" alert covers those, and the runs that deliver every other organization's
updates stay green. A destination newly failing still fails its run.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from patient_delivery.store import Store
from patient_delivery.store.models import DestinationFailing


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
