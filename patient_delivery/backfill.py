"""Backfill and re-delivery: queue documents again on request, or show what that would do.

A backfill picks, among the document versions that match (organization, project, patients,
creation dates, data types), the newest per patient and data type, for each destination its
project subscribes to. What happens to each depends on the ledger:

- no delivery yet              -> queue it (e.g. a destination added after the fact);
- already owed (queued, pending, failed) -> nothing to do: the next run sends it;
- delivered                    -> with `force`, queue it again *at the path it was sent to*
                                  (an organization that lost its files); else skip;
- superseded or replaced, or not the newest version of its document -> skip: an older
                                  version is never sent over a newer one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, func, select

from patient_delivery.ledger import queue_delivery
from patient_delivery.store import Store
from patient_delivery.store.models import (
    Delivery,
    DeliveryStatus,
    DocumentVersion,
    Project,
    Share,
    Subscription,
)


@dataclass(frozen=True)
class BackfillRequest:
    """Which documents to deliver again; empty filters match everything."""

    organization_id: str | None = None
    project_id: str | None = None
    patient_ids: tuple[str, ...] = ()
    created_from: datetime | None = None
    created_to: datetime | None = None
    data_types: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    force: bool = False


@dataclass(frozen=True)
class PlannedDelivery:
    patient_id: str
    project_id: str
    destination: str
    data_type: str
    version: int
    action: str  # queue | resend | owed | skip
    path: str | None


@dataclass
class BackfillPlan:
    items: list[PlannedDelivery] = field(default_factory=list)

    @property
    def counts(self) -> Counter[str]:
        return Counter(item.action for item in self.items)


def _candidates(session, request: BackfillRequest):  # type: ignore[no-untyped-def]
    """(version, project, subscription, ledger row or None) for the newest matching versions."""
    newest = select(
        DocumentVersion.patient_id,
        DocumentVersion.data_type,
        func.max(DocumentVersion.id).label("id"),
    ).group_by(DocumentVersion.patient_id, DocumentVersion.data_type)
    if request.patient_ids:
        newest = newest.where(DocumentVersion.patient_id.in_(request.patient_ids))
    if request.data_types:
        newest = newest.where(DocumentVersion.data_type.in_(request.data_types))
    if request.created_from:
        newest = newest.where(DocumentVersion.created_at >= request.created_from)
    if request.created_to:
        newest = newest.where(DocumentVersion.created_at < request.created_to)
    heads = newest.subquery()
    latest = (
        select(
            DocumentVersion.patient_id,
            DocumentVersion.data_type,
            func.max(DocumentVersion.id).label("id"),
        )
        .group_by(DocumentVersion.patient_id, DocumentVersion.data_type)
        .subquery()
    )
    statement = (
        select(DocumentVersion, Share.project_id, Subscription, Delivery, latest.c.id)
        .join(heads, heads.c.id == DocumentVersion.id)
        .join(
            latest,
            and_(
                latest.c.patient_id == DocumentVersion.patient_id,
                latest.c.data_type == DocumentVersion.data_type,
            ),
        )
        .join(Share, Share.patient_id == DocumentVersion.patient_id)
        .join(Project, Project.id == Share.project_id)
        .join(Subscription, Subscription.project_id == Share.project_id)
        .outerjoin(
            Delivery,
            and_(
                Delivery.version_id == DocumentVersion.id,
                Delivery.project_id == Share.project_id,
                Delivery.destination == Subscription.destination,
            ),
        )
        .order_by(DocumentVersion.id)
    )
    if request.organization_id:
        statement = statement.where(Project.organization_id == request.organization_id)
    if request.project_id:
        statement = statement.where(Share.project_id == request.project_id)
    if request.destinations:
        statement = statement.where(Subscription.destination.in_(request.destinations))
    for version, project_id, subscription, delivery, latest_id in session.execute(statement):
        if version.data_type in subscription.data_type_list:
            yield version, project_id, subscription, delivery, latest_id == version.id


def _action(delivery: Delivery | None, force: bool, is_latest: bool) -> str:
    if not is_latest:
        return "skip"  # never send an older version over a newer one
    if delivery is None:
        return "queue"
    if delivery.status == DeliveryStatus.DELIVERED:
        return "resend" if force else "skip"
    if delivery.status in (DeliveryStatus.SUPERSEDED, DeliveryStatus.REPLACED):
        return "skip"
    return "owed"


def plan(store: Store, request: BackfillRequest) -> BackfillPlan:
    """What a backfill would do, changing nothing."""
    result = BackfillPlan()
    with store.session() as session:
        for version, project_id, subscription, delivery, is_latest in _candidates(session, request):
            result.items.append(
                PlannedDelivery(
                    patient_id=version.patient_id,
                    project_id=project_id,
                    destination=subscription.destination,
                    data_type=version.data_type,
                    version=version.version,
                    action=_action(delivery, request.force, is_latest),
                    path=delivery.path if delivery else None,
                )
            )
    return result


def apply(store: Store, request: BackfillRequest) -> Counter[str]:
    """Queue what the plan says, in one transaction; returns the counts per action."""
    counts: Counter[str] = Counter()
    with store.session() as session:
        candidates = list(_candidates(session, request))
        for version, project_id, subscription, delivery, is_latest in candidates:
            action = _action(delivery, request.force, is_latest)
            counts[action] += 1
            if action == "queue":
                project = session.get(Project, project_id)
                assert project is not None
                queue_delivery(session, version, project_id, project.organization_id, subscription)
            elif action == "resend" and delivery is not None:
                # Same row, same path: the file is replaced, not duplicated. The earlier send's
                # time and run stay in its flow run's records; the row shows the newest.
                delivery.status = DeliveryStatus.QUEUED
                delivery.flow_run_id = None
    return counts
