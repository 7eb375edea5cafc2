"""The delivery ledger: what is owed to whom, who is sending it, and what was sent.

Each `Delivery` row moves through queued -> pending (claimed by one run, path rendered, under a
lease) -> delivered | failed. Failed and lease-expired rows are claimed again by a later run,
and keep the path they were first given, so a retry overwrites rather than duplicates.

Only IDs, counts, paths and reasons pass through here; document content is read one document
at a time by `read_content`, straight into an upload.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    bindparam,
    case,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from patient_delivery import destination_health
from patient_delivery.paths import PathValueError, format_timestamp
from patient_delivery.settings import get_settings
from patient_delivery.store import Store
from patient_delivery.store.models import (
    Delivery,
    DeliveryStatus,
    Disclosure,
    DocumentContent,
    DocumentVersion,
    Project,
    Share,
    Subscription,
)


def default_lease() -> timedelta:
    """How long a run owns what it claimed (setting `lease_seconds`, 10 min by default)."""
    return timedelta(seconds=get_settings().lease_seconds)


def _now() -> datetime:
    return datetime.now(UTC)


# --- queueing (called by ingest, inside its transaction) -------------------------------------


def queue_delivery(
    session: Session,
    version: DocumentVersion,
    project_id: str,
    organization_id: str,
    subscription: Subscription,
) -> None:
    """Owe one document version to one subscribed destination: a queued ledger row."""
    session.add(
        Delivery(
            version_id=version.id,
            patient_id=version.patient_id,
            project_id=project_id,
            organization_id=organization_id,
            data_type=version.data_type,
            destination=subscription.destination,
            purpose=subscription.purpose,
            status=DeliveryStatus.QUEUED,
        )
    )


def enqueue_version(session: Session, version: DocumentVersion) -> int:
    """Queue a new version for each destination that the patient's projects subscribe to."""
    rows = session.execute(
        select(Share.project_id, Project.organization_id, Subscription)
        .join(Project, Project.id == Share.project_id)
        .join(Subscription, Subscription.project_id == Share.project_id)
        .where(Share.patient_id == version.patient_id)
    ).all()
    queued = 0
    for project_id, organization_id, subscription in rows:
        if version.data_type in subscription.data_type_list:
            queue_delivery(session, version, project_id, organization_id, subscription)
            queued += 1
    return queued


def enqueue_heads(
    session: Session, subscription: Subscription, patient_id: str | None = None
) -> int:
    """Queue the newest version of each shared patient's documents for a (new) subscription."""
    project = session.get(Project, subscription.project_id)
    assert project is not None
    # max(id) is the newest version: versions of one document are inserted in order.
    newest = (
        select(func.max(DocumentVersion.id))
        .join(Share, Share.patient_id == DocumentVersion.patient_id)
        .where(
            Share.project_id == subscription.project_id,
            DocumentVersion.data_type.in_(subscription.data_type_list),
        )
        .group_by(DocumentVersion.patient_id, DocumentVersion.data_type)
    )
    owed = select(Delivery.version_id).where(  # withdrawn ones are owed again on a new share
        Delivery.project_id == subscription.project_id,
        Delivery.destination == subscription.destination,
        Delivery.status != DeliveryStatus.WITHDRAWN,
    )
    if patient_id is not None:
        newest = newest.where(DocumentVersion.patient_id == patient_id)
        owed = owed.where(Delivery.patient_id == patient_id)
    already = set(session.scalars(owed))
    withdrawn = {
        row.version_id: row
        for row in session.scalars(
            select(Delivery).where(
                Delivery.project_id == subscription.project_id,
                Delivery.destination == subscription.destination,
                Delivery.status == DeliveryStatus.WITHDRAWN,
                Delivery.version_id.in_(newest),
            )
        )
    }
    queued = 0
    for version in session.scalars(select(DocumentVersion).where(DocumentVersion.id.in_(newest))):
        if version.id in withdrawn:  # shared again: owed again, its path rendered anew
            row = withdrawn[version.id]
            row.status, row.last_error, row.path, row.rendered_at = (
                DeliveryStatus.QUEUED,
                None,
                None,
                None,
            )
            row.claimed_by, row.lease_expires_at, row.flow_run_id = None, None, None
            queued += 1
        elif version.id not in already:
            queue_delivery(
                session, version, subscription.project_id, project.organization_id, subscription
            )
            queued += 1
    return queued


# --- a delivery run -------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkFilter:
    """Narrows what a run claims; everything is eligible when empty."""

    project_id: str | None = None
    destinations: tuple[str, ...] = ()
    patient_ids: tuple[str, ...] = ()
    data_types: tuple[str, ...] = ()


def _claimable(now: datetime, claimant: str, work: WorkFilter):  # type: ignore[no-untyped-def]
    condition = and_(
        or_(
            Delivery.status.in_([DeliveryStatus.QUEUED, DeliveryStatus.FAILED]),
            and_(Delivery.status == DeliveryStatus.PENDING, Delivery.lease_expires_at < now),
        ),
        # What this run already tried and failed waits for the next run: a run always ends.
        or_(Delivery.flow_run_id.is_(None), Delivery.flow_run_id != claimant),
        # What no run can send (its destination waits) is left to every run alike.
        Delivery.destination.not_in(destination_health.waiting_destinations(now)),
    )
    if work.project_id:
        condition = and_(condition, Delivery.project_id == work.project_id)
    if work.destinations:
        condition = and_(condition, Delivery.destination.in_(work.destinations))
    if work.patient_ids:
        condition = and_(condition, Delivery.patient_id.in_(work.patient_ids))
    if work.data_types:
        condition = and_(condition, Delivery.data_type.in_(work.data_types))
    return condition


def claimants(store: Store) -> list[str]:
    """The runs holding claimed (pending) deliveries right now."""
    with store.session() as session:
        return list(
            session.scalars(
                select(Delivery.claimed_by)
                .where(Delivery.status == DeliveryStatus.PENDING, Delivery.claimed_by.is_not(None))
                .distinct()
            )
        )


def release(store: Store, claimant: str) -> int:
    """End a run's leases now (it is known to be over); its deliveries become claimable."""
    with store.session() as session:
        result = session.execute(
            update(Delivery)
            .where(Delivery.claimed_by == claimant, Delivery.status == DeliveryStatus.PENDING)
            .values(lease_expires_at=_now())
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount or 0)


def claim(
    store: Store,
    claimant: str,
    work: WorkFilter = WorkFilter(),
    limit: int = 10_000,
    lease: timedelta | None = None,
) -> dict[str, list[int]]:
    """Claim up to `limit` owed deliveries for `claimant`; returns their IDs by destination.

    One UPDATE whose WHERE re-checks eligibility, so two runs claiming at once never get the
    same row: the database serializes the writes and the loser's re-check no longer matches.
    On PostgreSQL the candidates are locked with `FOR UPDATE SKIP LOCKED`, so a run claiming
    at the same time as another takes the next rows instead of waiting for them and coming
    back short; SQLite has one writer at a time and needs no such clause.
    """
    now = _now()
    lease = lease if lease is not None else default_lease()
    eligible = _claimable(now, claimant, work)
    with store.session() as session:
        # Materialized on PostgreSQL: a subquery with LIMIT and SKIP LOCKED that the planner
        # runs more than once would take more than `limit` rows.
        candidates = (
            select(Delivery.id)
            .where(eligible)
            .order_by(Delivery.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("candidates")
            .prefix_with("MATERIALIZED", dialect="postgresql")
        )
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(select(candidates.c.id)), eligible)
            .values(
                status=DeliveryStatus.PENDING,
                claimed_by=claimant,
                lease_expires_at=now + lease,
            )
            .execution_options(synchronize_session=False)
        )
        claimed: dict[str, list[int]] = {}
        for delivery_id, destination in session.execute(
            select(Delivery.id, Delivery.destination)
            .where(Delivery.claimed_by == claimant, Delivery.status == DeliveryStatus.PENDING)
            .order_by(Delivery.id)
        ):
            claimed.setdefault(destination, []).append(delivery_id)
    return claimed


def count_owed(store: Store, claimant: str, work: WorkFilter = WorkFilter()) -> int:
    """How many deliveries a run could claim now: the denominator of its progress."""
    with store.session() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Delivery).where(_claimable(_now(), claimant, work))
            )
            or 0
        )


PathRenderer = Callable[[Mapping[str, str], str], str]


@dataclass
class RenderResult:
    ready: list[int] = field(default_factory=list)
    failed: Counter[str] = field(default_factory=Counter)


def render_paths(
    store: Store, claimant: str, delivery_ids: Sequence[int], renderer: PathRenderer
) -> RenderResult:
    """Give each claimed delivery its path, once: a row that already has one keeps it.

    A value that cannot be rendered safely fails that delivery alone, with the reason.
    """
    return render_many(store, claimant, {"": (delivery_ids, renderer)})[""]


def render_many(
    store: Store,
    claimant: str,
    destinations: Mapping[str, tuple[Sequence[int], PathRenderer]],
) -> dict[str, RenderResult]:
    """`render_paths` for many destinations at once (each with its deliveries and its
    template), in one transaction: a page's cost does not grow with its destinations."""
    results = {key: RenderResult() for key in destinations}
    owner = {id_: key for key, (ids, _) in destinations.items() for id_ in ids}
    now = _now()
    rendered: list[dict[str, object]] = []
    failed: list[dict[str, object]] = []
    with store.session() as session:
        rows = session.execute(
            select(
                Delivery.id, Delivery.path, Delivery.rendered_at, Delivery.organization_id,
                Delivery.project_id, Delivery.patient_id, Delivery.data_type, Share.external_id,
            )
            .outerjoin(
                Share,
                and_(
                    Share.project_id == Delivery.project_id, Share.patient_id == Delivery.patient_id
                ),
            )
            .where(Delivery.id.in_(owner), Delivery.claimed_by == claimant)
        ).all()  # fmt: skip
        for id_, path, rendered_at, org_id, project_id, patient_id, data_type, external_id in rows:
            key = owner[id_]
            result = results[key]
            if path:
                result.ready.append(id_)
                continue
            moment = rendered_at or now
            values = {
                "orgId": org_id,
                "projectId": project_id,
                "healthexPatientId": patient_id,
                "externalId": external_id or "",
                "dataType": data_type,
                "timestamp": format_timestamp(moment),
            }
            try:
                path = destinations[key][1](values, data_type)
                rendered.append({"b_id": id_, "b_path": path, "b_rendered_at": moment})
                result.ready.append(id_)
            except PathValueError as exc:
                reason = f"cannot render path: {exc}"
                failed.append({"b_id": id_, "b_error": reason})
                result.failed[reason] += 1
        # Core statements, many rows each: the ORM's unit of work costs far more per row.
        table = Delivery.__table__
        mine = and_(table.c.id == bindparam("b_id"), table.c.claimed_by == claimant)
        if rendered:
            session.connection().execute(
                update(table)
                .where(mine)
                .values(path=bindparam("b_path"), rendered_at=bindparam("b_rendered_at")),
                rendered,
            )
        if failed:
            session.connection().execute(
                update(table)
                .where(mine)
                .values(last_error=bindparam("b_error"), **_failed(claimant, now)),
                failed,
            )
    for result in results.values():
        result.ready.sort()
    return results


def _failed(claimant: str, now: datetime) -> dict[str, object]:
    """What failing a delivery this run holds sets (besides its reason): counted as a try,
    attributed to the run, and released."""
    table = Delivery.__table__
    return {
        "status": DeliveryStatus.FAILED,
        "attempts": table.c.attempts + 1,
        "flow_run_id": claimant,
        "claimed_by": None,
        "lease_expires_at": None,
        "updated_at": now,
    }


def park_claimed(store: Store, claimant: str, delivery_ids: Sequence[int], reason: str) -> int:
    """Leave every listed delivery this run holds for a later run, with the reason (its
    destination's block cannot be used): failed, attributed to the run, not counted as a try."""
    table = Delivery.__table__
    values = {**_failed(claimant, _now()), "attempts": table.c.attempts, "last_error": reason}
    with store.session() as session:
        result = session.connection().execute(
            update(table)
            .where(table.c.id.in_(delivery_ids), table.c.claimed_by == claimant)
            .values(**values)
        )
        return int(result.rowcount or 0)


@dataclass(frozen=True)
class UploadItem:
    """A claimed delivery ready to send: where it goes and what to expect, never its content."""

    delivery_id: int
    version_id: int
    path: str
    sha256: str
    size: int
    attempts: int = 0
    """Tries recorded by earlier runs: a retry may find a cut-off write's temporary file."""


def start_batch(
    store: Store, claimant: str, delivery_ids: Sequence[int], lease: timedelta | None = None
) -> list[UploadItem]:
    """Renew the lease on a batch about to be sent and return what is still ours to send."""
    now = _now()
    lease = lease if lease is not None else default_lease()
    with store.session() as session:
        session.execute(
            update(Delivery)
            .where(
                Delivery.id.in_(delivery_ids),
                Delivery.claimed_by == claimant,
                Delivery.status == DeliveryStatus.PENDING,
            )
            .values(lease_expires_at=now + lease)
            .execution_options(synchronize_session=False)
        )
        rows = session.execute(
            select(
                Delivery.id,
                Delivery.version_id,
                Delivery.path,
                DocumentVersion.sha256,
                DocumentVersion.size,
                DocumentVersion.patient_id,
                DocumentVersion.data_type,
                Delivery.attempts,
            )
            .join(DocumentVersion, DocumentVersion.id == Delivery.version_id)
            .where(
                Delivery.id.in_(delivery_ids),
                Delivery.claimed_by == claimant,
                Delivery.status == DeliveryStatus.PENDING,
                Delivery.path.is_not(None),
            )
            .order_by(Delivery.id)
        ).all()
        newest = dict(
            ((patient, data_type), version_id)
            for patient, data_type, version_id in session.execute(
                select(DocumentVersion.patient_id, DocumentVersion.data_type,
                       func.max(DocumentVersion.id))
                .where(DocumentVersion.patient_id.in_({row.patient_id for row in rows}))
                .group_by(DocumentVersion.patient_id, DocumentVersion.data_type)
            )
        )  # fmt: skip
        stale = [r.id for r in rows if newest[(r.patient_id, r.data_type)] != r.version_id]
        if stale:
            # A newer version arrived after this one was claimed: never send the old one over
            # it (the newer one is queued for the same destination).
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_(stale), Delivery.claimed_by == claimant)
                .values(status=DeliveryStatus.SUPERSEDED, claimed_by=None, lease_expires_at=None)
                .execution_options(synchronize_session=False)
            )
    return [
        UploadItem(row.id, row.version_id, row.path, row.sha256, row.size, row.attempts)
        for row in rows
        if row.id not in stale
    ]


class Reading:
    """What a batch's sends read over one connection: each document's bytes, one at a time, and
    whether its patient still shares it.

    A lane holds one store connection for its batch, never a second beside it: with several
    processes on one PostgreSQL, lanes that each held one and waited for another could wait on
    each other until none was left. PostgreSQL (read committed) answers each statement from what
    is committed at that moment, so the reading connection asks about consent too. A SQLite
    reader keeps the snapshot its open statement began with, so there a connection of its own
    asks (SQLite has no connection limit to wait on)."""

    def __init__(self, store: Store, connection: Connection) -> None:
        self._store = store
        self._connection = connection
        self._asks_itself = connection.dialect.name == "postgresql"

    def contents(self, items: Sequence[UploadItem]) -> Iterator[tuple[UploadItem, bytes]]:
        """Each item with its document's bytes; only the current document is in memory."""
        return _contents(self._connection, items)

    def withdrawn(self, delivery_ids: Sequence[int]) -> set[int]:
        """Which of these deliveries were withdrawn since claimed, as committed now."""
        if self._asks_itself:
            return _withdrawn(self._connection, delivery_ids)
        return withdrawn_among(self._store, delivery_ids)


@contextmanager
def reading(store: Store) -> Iterator[Reading]:
    """A batch's reads over one connection: one query per destination of the batch."""
    with store.engine.connect() as connection:
        yield Reading(store, connection)


def _contents(
    connection: Connection, items: Sequence[UploadItem]
) -> Iterator[tuple[UploadItem, bytes]]:
    by_version: dict[int, list[UploadItem]] = {}
    for item in items:
        by_version.setdefault(item.version_id, []).append(item)
    rows = connection.execution_options(yield_per=1).execute(
        select(DocumentContent.version_id, DocumentContent.content).where(
            DocumentContent.version_id.in_(by_version)
        )
    )
    for version_id, content in rows:
        for item in by_version.pop(version_id, []):
            yield item, content
    if by_version:
        raise LookupError(f"document version(s) {sorted(by_version)} have no stored content")


def read_content(store: Store, version_id: int) -> bytes:
    """The bytes of one document version, read when it is about to be sent."""
    with store.session() as session:
        content = session.scalar(
            select(DocumentContent.content).where(DocumentContent.version_id == version_id)
        )
    if content is None:
        raise LookupError(f"document version {version_id} has no stored content")
    return content


@dataclass(frozen=True)
class Outcome:
    """How one delivery ended in this run."""

    delivery_id: int
    attempts: int
    sha256: str | None = None
    size: int | None = None
    error: str | None = None
    landing: str | None = None

    @property
    def delivered(self) -> bool:
        return self.error is None


WITHDRAWN_WHILE_SENT = "sent while consent was being withdrawn"


def withdrawn_among(store: Store, delivery_ids: Sequence[int]) -> set[int]:
    """Which of these deliveries were withdrawn (the patient stopped sharing) since claimed.
    Asked before every send: one Core statement, no ORM session."""
    with store.engine.connect() as connection:
        return _withdrawn(connection, delivery_ids)


def _withdrawn(connection: Connection, delivery_ids: Sequence[int]) -> set[int]:
    return set(connection.execute(_WITHDRAWN, {"ids": list(delivery_ids)}).scalars())


_WITHDRAWN = select(Delivery.id).where(
    Delivery.id.in_(bindparam("ids", expanding=True)),
    Delivery.status == DeliveryStatus.WITHDRAWN,
)


def record_outcomes(store: Store, claimant: str, outcomes: Sequence[Outcome]) -> int:
    """Write a batch's outcomes in one transaction; returns how many rows were still ours.

    A row whose lease was lost to another run is left alone: that run now answers for it.
    """
    if not outcomes:
        return 0
    now = _now()
    table = Delivery.__table__
    withdrawn_unsent = and_(
        table.c.status == DeliveryStatus.WITHDRAWN,
        bindparam("b_status") != DeliveryStatus.DELIVERED.value,
    )
    statement = (
        update(table)
        .where(table.c.id == bindparam("b_id"), table.c.claimed_by == claimant)
        .values(
            # A withdrawn delivery stays withdrawn, unless it was sent while consent was being
            # withdrawn: then it is recorded as sent (and disclosed), as it was.
            status=case(
                (withdrawn_unsent, DeliveryStatus.WITHDRAWN.value), else_=bindparam("b_status")
            ),
            attempts=table.c.attempts + bindparam("b_attempts"),
            last_error=case(
                (withdrawn_unsent, "consent withdrawn"),
                (table.c.status == DeliveryStatus.WITHDRAWN, WITHDRAWN_WHILE_SENT),
                else_=bindparam("b_error"),
            ),
            sha256=bindparam("b_sha256"),
            size=bindparam("b_size"),
            landing=bindparam("b_landing"),
            manifest_owed=bindparam("b_status") == DeliveryStatus.DELIVERED.value,
            manifest_run=claimant,
            delivered_at=bindparam("b_delivered_at"),
            flow_run_id=claimant,
            claimed_by=None,
            lease_expires_at=None,
            updated_at=now,
        )
    )
    parameters = [
        {
            "b_id": o.delivery_id,
            "b_status": DeliveryStatus.DELIVERED if o.delivered else DeliveryStatus.FAILED,
            "b_attempts": o.attempts,
            "b_error": o.error,
            "b_sha256": o.sha256,
            "b_size": o.size,
            "b_landing": o.landing,
            "b_delivered_at": now if o.delivered else None,
        }
        for o in outcomes
    ]
    delivered_ids = [o.delivery_id for o in outcomes if o.delivered]
    with store.session() as session:
        result = session.connection().execute(statement, parameters)
        if delivered_ids:
            recorded = _recorded_as_delivered(claimant, delivered_ids, now)
            _disclose(session, recorded)
            _mark_replaced(session, recorded, now)
        return int(result.rowcount or 0)


def _recorded_as_delivered(
    claimant: str, delivery_ids: list[int], now: datetime
) -> ColumnElement[bool]:
    """The rows of `delivery_ids` this call just recorded as delivered, and only those: a row
    another run took over does not carry this run's id and time."""
    return and_(
        Delivery.id.in_(delivery_ids),
        Delivery.flow_run_id == claimant,
        Delivery.status == DeliveryStatus.DELIVERED,
        Delivery.delivered_at == now,
    )


def _mark_replaced(session: Session, recorded: ColumnElement[bool], now: datetime) -> None:
    """Older versions of the same document that were delivered to the path these deliveries
    just wrote were overwritten: their rows say so (`replaced`), so the ledger matches what
    each path holds. It happens by design with a template without `{timestamp}` (one file per
    document, the newest wins), and with one when two versions render in the same second."""
    table = Delivery.__table__
    placed = session.execute(
        select(Delivery.id, Delivery.destination, Delivery.path, Delivery.patient_id,
               Delivery.data_type).where(recorded)
    ).all()  # fmt: skip
    statement = (
        update(table)
        .where(
            table.c.destination == bindparam("b_destination"),
            table.c.path == bindparam("b_path"),
            table.c.patient_id == bindparam("b_patient"),
            table.c.data_type == bindparam("b_data_type"),
            table.c.status == DeliveryStatus.DELIVERED,
            table.c.id != bindparam("b_id"),
        )
        .values(status=DeliveryStatus.REPLACED, updated_at=now)
    )
    session.connection().execute(statement, [
        {"b_id": i, "b_destination": d, "b_path": p, "b_patient": pt, "b_data_type": dt}
        for i, d, p, pt, dt in placed
    ])  # fmt: skip


def _disclose(session: Session, recorded: ColumnElement[bool]) -> None:
    """Append a disclosure for each delivery this call just recorded as delivered."""
    columns = ["delivery_id", "patient_id", "organization_id", "project_id", "destination",
               "version_id", "data_type", "path", "sha256", "size", "purpose", "flow_run_id",
               "disclosed_at"]  # fmt: skip
    source = select(
        Delivery.id, Delivery.patient_id, Delivery.organization_id, Delivery.project_id,
        Delivery.destination, Delivery.version_id, Delivery.data_type, Delivery.path,
        Delivery.sha256, Delivery.size, Delivery.purpose, Delivery.flow_run_id,
        Delivery.delivered_at,
    ).where(recorded)  # fmt: skip
    session.execute(insert(Disclosure).from_select(columns, source))
