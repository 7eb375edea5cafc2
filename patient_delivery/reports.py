"""Reports over the ledger, as pandas DataFrames: the accounting of disclosures and its exports.

A table is the natural shape here (filter, print, write CSV or Parquet); the upload path
never uses pandas.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pandas as pd
from sqlalchemy import case, func, select

from patient_delivery import destination_health
from patient_delivery.store import Store
from patient_delivery.store.models import (
    UNSENT,
    Delivery,
    DeliveryStatus,
    DestinationFailing,
    Disclosure,
    DocumentVersion,
    Organization,
    Project,
    Share,
    ShareWithdrawal,
    Subscription,
)

DISCLOSURE_COLUMNS = [
    "delivered_at",
    "status",
    "patient_id",
    "org_name",
    "project_id",
    "destination",
    "data_type",
    "version",
    "sha256",
    "document_sha256",
    "size",
    "path",
    "purpose",
    "flow_run_id",
    "attempts",
    "last_error",
]


@dataclass(frozen=True)
class LedgerQuery:
    patient_id: str | None = None
    project_id: str | None = None
    destination: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = None


def _narrowed(statement, query: LedgerQuery, table, when, limited: bool = True):  # type: ignore[no-untyped-def]
    """`statement` narrowed to the query's patient, project and period (on `when`), and to its
    row limit unless `limited` is off."""
    if query.patient_id:
        statement = statement.where(table.patient_id == query.patient_id)
    if query.project_id:
        statement = statement.where(table.project_id == query.project_id)
    if query.since:
        statement = statement.where(when >= query.since)
    if query.until:
        statement = statement.where(when < query.until)
    if limited and query.limit:
        statement = statement.limit(query.limit)
    return statement


def deliveries_frame(store: Store, query: LedgerQuery = LedgerQuery()) -> pd.DataFrame:
    """Ledger rows matching `query`, newest first, with the accounting-of-disclosures fields:
    when, to whom (organization, destination), what (data type, version, path; `sha256` and
    `size` of the file as sent, `document_sha256` of the stored document, which differ when it
    was encrypted), why (purpose) and by which run."""
    statement = (
        select(
            Delivery.delivered_at,
            Delivery.status,
            Delivery.patient_id,
            Organization.name.label("org_name"),
            Delivery.project_id,
            Delivery.destination,
            Delivery.data_type,
            DocumentVersion.version,
            Delivery.sha256,
            DocumentVersion.sha256,
            Delivery.size,
            Delivery.path,
            Delivery.purpose,
            Delivery.flow_run_id,
            Delivery.attempts,
            Delivery.last_error,
        )
        .join(DocumentVersion, DocumentVersion.id == Delivery.version_id)
        .join(Organization, Organization.id == Delivery.organization_id)
        .order_by(Delivery.updated_at.desc(), Delivery.id.desc())
    )
    statement = _narrowed(statement, query, Delivery, Delivery.updated_at)
    if query.destination:
        statement = statement.where(Delivery.destination == query.destination)
    if query.status:
        statement = statement.where(Delivery.status == query.status)
    with store.session() as session:
        rows = session.execute(statement).all()
    return pd.DataFrame(rows, columns=DISCLOSURE_COLUMNS)


def records(frame: pd.DataFrame) -> list[dict[str, object]]:
    """A table's rows as JSON-ready records: missing values as null (`--json`, artifacts)."""
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")


def status_counts(store: Store) -> pd.DataFrame:
    """Deliveries per destination and status: what is owed, sent and failing; for a
    destination that runs deliver nothing to, since when; for one down, since when; for one
    whose deliveries wait, until when (`destination_health`); how far behind each is (`lag`)."""
    statement = select(Delivery.destination, Delivery.status, func.count()).group_by(
        Delivery.destination, Delivery.status
    )
    with store.session() as session:
        rows = session.execute(statement).all()
    frame = pd.DataFrame(rows, columns=["destination", "status", "count"])
    if frame.empty:
        return frame
    table = frame.pivot_table(index="destination", columns="status", values="count", fill_value=0)
    table = table.astype(int).reset_index()
    with store.session() as session:
        failing = dict(session.execute(select(DestinationFailing.destination,
                                              DestinationFailing.since)).all())  # fmt: skip
    # Since when a destination has taken nothing and failed: empty for one that delivers.
    table["failing_since"] = pd.to_datetime(table["destination"].map(failing), utc=True)
    waiting = destination_health.waiting(store)
    # Since when runs skip it (down until a probe reaches it): empty for one that is not down.
    down = {ref: wait.since for ref, wait in waiting.items() if wait.down}
    table["down_since"] = pd.to_datetime(table["destination"].map(down), utc=True)
    # Until when no run claims its deliveries: the end of a wait for a block to be fixed, or
    # the next probe of a destination down. Empty when none wait.
    until = {ref: wait.until for ref, wait in waiting.items()}
    table["waiting_until"] = pd.to_datetime(table["destination"].map(until), utc=True)
    return table.merge(lag(store), on="destination", how="left")


LAG_WINDOWS = {"1h": timedelta(hours=1), "1d": timedelta(days=1)}
LAG_COLUMNS = ["destination", "oldest_owed_s", *(
    f"lag_{q}_{w}_s" for w in LAG_WINDOWS for q in ("p50", "p95")
), "landed_1d"]  # fmt: skip


def lag(store: Store, destinations: Collection[str] | None = None) -> pd.DataFrame:
    """How far behind each destination is, in seconds: the age of its oldest owed delivery
    (empty when nothing is owed), and from each update's arrival to its file landing, the
    median and 95th percentile over the deliveries that landed in the last hour and day."""
    now = datetime.now(UTC)
    oldest = select(Delivery.destination, func.min(Delivery.created_at)).where(
        Delivery.status.in_(UNSENT)
    )
    landed = select(Delivery.destination, Delivery.created_at, Delivery.delivered_at).where(
        Delivery.status == DeliveryStatus.DELIVERED,
        Delivery.delivered_at >= now - max(LAG_WINDOWS.values()),
    )
    if destinations is not None:
        oldest = oldest.where(Delivery.destination.in_(list(destinations)))
        landed = landed.where(Delivery.destination.in_(list(destinations)))
    with store.session() as session:
        owed = session.execute(oldest.group_by(Delivery.destination)).all()
        times = pd.DataFrame(session.execute(landed).all(),
                             columns=["destination", "created", "landed"])  # fmt: skip
    table = pd.DataFrame(owed, columns=["destination", "oldest"]).set_index("destination")
    table["oldest_owed_s"] = (
        now - pd.to_datetime(table.pop("oldest"), utc=True)
    ).dt.total_seconds()
    times["landed"] = pd.to_datetime(times["landed"], utc=True)
    times["seconds"] = (
        times["landed"] - pd.to_datetime(times["created"], utc=True)
    ).dt.total_seconds()
    for window, span in LAG_WINDOWS.items():
        recent = times[times["landed"] >= now - span].groupby("destination")["seconds"]
        for name, share in (("p50", 0.5), ("p95", 0.95)):
            table = table.join(recent.quantile(share).rename(f"lag_{name}_{window}_s"), how="outer")
    table = table.join(times.groupby("destination").size().rename("landed_1d"), how="outer")
    table["landed_1d"] = table["landed_1d"].fillna(0).astype(int)
    return table.round(1).rename_axis("destination").reset_index()[LAG_COLUMNS]


def recent_runs(store: Store, limit: int = 10) -> pd.DataFrame:
    """The latest delivery runs as the ledger saw them: when, delivered, failed."""
    delivered = func.sum(case((Delivery.status == DeliveryStatus.DELIVERED, 1), else_=0))
    failed = func.sum(case((Delivery.status == DeliveryStatus.FAILED, 1), else_=0))
    statement = (
        select(Delivery.flow_run_id, func.max(Delivery.updated_at), delivered, failed)
        .where(Delivery.flow_run_id.is_not(None))
        .group_by(Delivery.flow_run_id)
        .order_by(func.max(Delivery.updated_at).desc())
        .limit(limit)
    )
    with store.session() as session:
        rows = session.execute(statement).all()
    return pd.DataFrame(rows, columns=["flow_run_id", "last_activity", "delivered", "failed"])


DISCLOSURE_LOG_COLUMNS = [
    "disclosed_at", "patient_id", "org_name", "project_id", "destination", "data_type",
    "version", "sha256", "document_sha256", "size", "path", "purpose", "flow_run_id", "accessor",
]  # fmt: skip


def disclosures_frame(store: Store, query: LedgerQuery = LedgerQuery()) -> pd.DataFrame:
    """Every send and pull read matching `query` (its destination and status aside), newest
    first: the accounting of disclosures (date, recipient, what, why)."""
    statement = (
        select(
            Disclosure.disclosed_at,
            Disclosure.patient_id,
            Organization.name,
            Disclosure.project_id,
            Disclosure.destination,
            Disclosure.data_type,
            DocumentVersion.version,
            Disclosure.sha256,
            DocumentVersion.sha256,
            Disclosure.size,
            Disclosure.path,
            Disclosure.purpose,
            Disclosure.flow_run_id,
            Disclosure.accessor,
        )
        .join(Organization, Organization.id == Disclosure.organization_id)
        .join(DocumentVersion, DocumentVersion.id == Disclosure.version_id)
        .order_by(Disclosure.disclosed_at.desc(), Disclosure.id.desc())
    )
    statement = _narrowed(statement, query, Disclosure, Disclosure.disclosed_at)
    with store.session() as session:
        rows = session.execute(statement).all()
    return pd.DataFrame(rows, columns=DISCLOSURE_LOG_COLUMNS)


WITHDRAWAL_COLUMNS = [
    "withdrawn_at", "patient_id", "org_name", "project_id", "withdrawn_deliveries", "reason",
    "recorded_by",
]  # fmt: skip


def withdrawals_frame(store: Store, query: LedgerQuery = LedgerQuery()) -> pd.DataFrame:
    """Shares ended by their patient, newest first: who recorded it, when and why."""
    statement = (
        select(
            ShareWithdrawal.withdrawn_at,
            ShareWithdrawal.patient_id,
            Organization.name,
            ShareWithdrawal.project_id,
            ShareWithdrawal.withdrawn_deliveries,
            ShareWithdrawal.reason,
            ShareWithdrawal.recorded_by,
        )
        .join(Organization, Organization.id == ShareWithdrawal.organization_id)
        .order_by(ShareWithdrawal.withdrawn_at.desc(), ShareWithdrawal.id.desc())
    )
    statement = _narrowed(statement, query, ShareWithdrawal, ShareWithdrawal.withdrawn_at,
                          limited=False)  # fmt: skip
    with store.session() as session:
        rows = session.execute(statement).all()
    return pd.DataFrame(rows, columns=WITHDRAWAL_COLUMNS)


def organizations_frame(store: Store) -> pd.DataFrame:
    """Every organization, with how many projects it has."""
    projects = func.count(Project.id)
    statement = (
        select(Organization.id, Organization.name, projects, Organization.created_at)
        .outerjoin(Project, Project.organization_id == Organization.id)
        .group_by(Organization.id, Organization.name, Organization.created_at)
        .order_by(Organization.id)
    )
    with store.session() as session:
        rows = session.execute(statement).all()
    return pd.DataFrame(rows, columns=["org_id", "org_name", "projects", "created_at"])


def projects_frame(store: Store, org_id: str | None = None) -> pd.DataFrame:
    """Projects (of one organization, or all), with how many patients share with each and how
    many destinations each delivers to."""
    shares = select(func.count()).where(Share.project_id == Project.id).scalar_subquery()
    subscribed = select(func.count()).where(Subscription.project_id == Project.id).scalar_subquery()
    statement = select(
        Project.id, Project.organization_id, Project.name, shares, subscribed, Project.created_at
    ).order_by(Project.organization_id, Project.id)
    if org_id:
        statement = statement.where(Project.organization_id == org_id)
    with store.session() as session:
        rows = session.execute(statement).all()
    columns = ["project_id", "org_id", "project_name", "patients", "destinations", "created_at"]
    return pd.DataFrame(rows, columns=columns)


SUBSCRIPTION_COLUMNS = [
    "project_id", "destination", "data_types", "purpose", "since", "queued", "failed", "delivered",
]  # fmt: skip


def subscriptions_frame(store: Store, project_id: str | None = None) -> pd.DataFrame:
    """What each project delivers where, and where its deliveries stand there."""

    def counted(*statuses: DeliveryStatus):  # type: ignore[no-untyped-def]
        return (
            select(func.count())
            .where(
                Delivery.project_id == Subscription.project_id,
                Delivery.destination == Subscription.destination,
                Delivery.status.in_(statuses),
            )
            .scalar_subquery()
        )

    statement = select(
        Subscription.project_id,
        Subscription.destination,
        Subscription.data_types,
        Subscription.purpose,
        Subscription.created_at,
        counted(DeliveryStatus.QUEUED, DeliveryStatus.PENDING),
        counted(DeliveryStatus.FAILED),
        counted(DeliveryStatus.DELIVERED),
    ).order_by(Subscription.project_id, Subscription.destination)
    if project_id:
        statement = statement.where(Subscription.project_id == project_id)
    with store.session() as session:
        rows = session.execute(statement).all()
    return pd.DataFrame(rows, columns=SUBSCRIPTION_COLUMNS)
