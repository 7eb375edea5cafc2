"""Ingest: organizations, projects, patients and their documents enter the store here.

Every document is validated before anything is written; a stored new version queues one
delivery per destination its patient's projects subscribe to, in the same transaction, so no
change can be stored without also being owed to its recipients.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from patient_delivery.documents import DATA_TYPES, CheckedDocument, check_data_type, check_document
from patient_delivery.events import emit_data_updated, emit_share_withdrawn, events_enabled
from patient_delivery.ledger import enqueue_heads, enqueue_version
from patient_delivery.store import Store
from patient_delivery.store.models import (
    UNSENT,
    Delivery,
    DeliveryStatus,
    DocumentContent,
    DocumentVersion,
    Organization,
    Patient,
    Project,
    Share,
    ShareWithdrawal,
    Subscription,
    utcnow,
)

IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEFAULT_PURPOSE = "Patient-directed sharing"
MAX_EXTERNAL_ID_LENGTH = 1024


class IngestError(ValueError):
    """A request the store refused; nothing was written."""


def _check_identifier(kind: str, value: str) -> str:
    # Organization and project IDs are path variables: checked once here so that they can never
    # be the reason a delivery fails.
    if not IDENTIFIER.fullmatch(value):
        raise IngestError(
            f"{kind} ID must be 1-64 letters, digits, '-' or '_' and start with a letter or digit"
        )
    return value


def new_patient_id() -> str:
    """A healthexPatientId: random, so it reveals nothing about the patient or sign-up order."""
    return "hx_" + secrets.token_hex(10)


def add_organization(store: Store, name: str, org_id: str | None = None) -> str:
    org_id = _check_identifier("organization", org_id or "org_" + secrets.token_hex(6))
    with store.session() as session:
        if session.get(Organization, org_id):
            raise IngestError(f"organization {org_id!r} already exists")
        session.add(Organization(id=org_id, name=name))
    return org_id


def add_project(store: Store, org_id: str, name: str, project_id: str | None = None) -> str:
    project_id = _check_identifier("project", project_id or "prj_" + secrets.token_hex(6))
    with store.session() as session:
        if session.get(Organization, org_id) is None:
            raise IngestError(f"no organization {org_id!r}")
        if session.get(Project, project_id):
            raise IngestError(f"project {project_id!r} already exists")
        session.add(Project(id=project_id, organization_id=org_id, name=name))
    return project_id


def check_external_id(external_id: str | None) -> None:
    # Stored as the organization gave it: whether it is safe in a path is decided at render time,
    # for templates that use it, and fails only that delivery.
    if external_id is not None and (external_id == "" or len(external_id) > MAX_EXTERNAL_ID_LENGTH):
        raise IngestError(f"externalId must be 1-{MAX_EXTERNAL_ID_LENGTH} characters (or omitted)")
    # The one exception: no identifier has a NUL, and PostgreSQL cannot store one in text.
    if external_id is not None and "\x00" in external_id:
        raise IngestError("externalId contains a NUL character; refused")


def add_patient(store: Store, project_id: str, external_id: str | None = None) -> str:
    """Create a patient who shares with `project_id`; returns the new healthexPatientId."""
    check_external_id(external_id)
    with store.session() as session:
        patient_id = create_shared_patient(session, project_id, external_id)
    return patient_id


def create_shared_patient(session: Session, project_id: str, external_id: str | None) -> str:
    if session.get(Project, project_id) is None:
        raise IngestError(f"no project {project_id!r}")
    if external_id is not None and find_share(session, project_id, external_id):
        raise IngestError(f"project {project_id!r} already has a patient with that externalId")
    patient = Patient(id=new_patient_id())
    session.add(patient)
    session.add(Share(project_id=project_id, patient_id=patient.id, external_id=external_id))
    session.flush()
    return patient.id


def find_share(session: Session, project_id: str, external_id: str) -> Share | None:
    return session.scalars(
        select(Share).where(Share.project_id == project_id, Share.external_id == external_id)
    ).first()


def share_patient(
    store: Store, patient_id: str, project_id: str, external_id: str | None = None
) -> int:
    """An existing patient shares with another project; their latest documents are queued for it.

    Returns how many deliveries were queued.
    """
    check_external_id(external_id)
    with store.session() as session:
        if session.get(Patient, patient_id) is None:
            raise IngestError(f"no patient {patient_id!r}")
        if session.get(Project, project_id) is None:
            raise IngestError(f"no project {project_id!r}")
        if session.get(Share, (project_id, patient_id)):
            raise IngestError("the patient already shares with that project")
        if external_id is not None and find_share(session, project_id, external_id):
            raise IngestError(f"project {project_id!r} already has a patient with that externalId")
        session.add(Share(project_id=project_id, patient_id=patient_id, external_id=external_id))
        session.flush()
        return sum(
            enqueue_heads(session, subscription, patient_id=patient_id)
            for subscription in session.scalars(
                select(Subscription).where(Subscription.project_id == project_id)
            )
        )


@dataclass(frozen=True)
class Withdrawal:
    """What ending a share did: deliveries withdrawn (queued, pending or failed)."""

    project_id: str
    patient_id: str
    organization_id: str
    withdrawn_deliveries: int


def unshare_patient(
    store: Store,
    project_id: str,
    patient_id: str,
    reason: str | None = None,
    recorded_by: str = "api",
) -> Withdrawal:
    """The patient stops sharing with `project_id`, from now on: the share is removed (no new
    deliveries, no pull reads through that project), every delivery of theirs to it not yet
    sent becomes `withdrawn` (a run holding one re-checks before sending it), and the withdrawal
    is recorded (who, when, why). Sharing again later queues the newest documents anew."""
    if reason is not None and len(reason) > 500:
        raise IngestError("reason: at most 500 characters")
    with store.session() as session:
        share = session.get(Share, (project_id, patient_id))
        if share is None:
            raise IngestError(f"patient {patient_id!r} does not share with project {project_id!r}")
        project = session.get(Project, project_id)
        assert project is not None
        withdrawn = session.execute(
            update(Delivery)
            .where(
                Delivery.project_id == project_id,
                Delivery.patient_id == patient_id,
                Delivery.status.in_(UNSENT),
            )
            .values(  # a run's claim stays: what it sent meanwhile is still recorded as sent
                status=DeliveryStatus.WITHDRAWN, last_error="consent withdrawn", updated_at=utcnow()
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        session.delete(share)
        session.add(
            ShareWithdrawal(
                patient_id=patient_id,
                project_id=project_id,
                organization_id=project.organization_id,
                reason=reason,
                recorded_by=recorded_by,
                withdrawn_deliveries=int(withdrawn or 0),
            )
        )
        result = Withdrawal(project_id, patient_id, project.organization_id, int(withdrawn or 0))
    emit_share_withdrawn(patient_id, project_id, result.organization_id)
    return result


@dataclass(frozen=True)
class PutResult:
    """What `put_document` did: the version now current, and whether it is new."""

    patient_id: str
    data_type: str
    version: int
    version_id: int
    created: bool
    queued: int
    sha256: str
    size: int


def put_document(store: Store, patient_id: str, data_type: str, content: bytes) -> PutResult:
    """Store `content` as the patient's newest `data_type` document, unless it is unchanged.

    Raises `InvalidDocument` (nothing stored) when the content does not validate.
    """
    document = check_document(data_type, content)
    try:
        with store.session() as session:
            result = put_checked(session, patient_id, document)
    except IntegrityError:
        raise IngestError(
            "another document for this patient and data type was stored at the same moment; "
            "put it again"
        ) from None
    announce(store, result)
    return result


def announce(store: Store, result: PutResult) -> None:
    """Emit `patient.data.updated` for a new version, after it is committed."""
    if not result.created or not events_enabled():
        return
    with store.session() as session:
        projects = list(
            session.scalars(select(Share.project_id).where(Share.patient_id == result.patient_id))
        )
    emit_data_updated(result.patient_id, result.data_type, result.version, projects)


def put_checked(session: Session, patient_id: str, document: CheckedDocument) -> PutResult:
    patient = session.get(Patient, patient_id)
    if patient is None:
        raise IngestError(f"no patient {patient_id!r}")
    if document.fhir_patient_id is not None:
        if patient.fhir_id is None:
            patient.fhir_id = document.fhir_patient_id
        elif patient.fhir_id != document.fhir_patient_id:
            raise IngestError(
                "the FHIR bundle's Patient id differs from the one this patient's earlier "
                "bundles carried; is it the right patient?"
            )
    latest = session.scalars(
        select(DocumentVersion)
        .where(
            DocumentVersion.patient_id == patient_id,
            DocumentVersion.data_type == document.data_type,
        )
        .order_by(DocumentVersion.version.desc())
        .limit(1)
    ).first()
    if latest is not None and latest.sha256 == document.sha256:
        return PutResult(
            patient_id, document.data_type, latest.version, latest.id, False, 0,
            latest.sha256, latest.size,
        )  # fmt: skip
    version = DocumentVersion(
        patient_id=patient_id,
        data_type=document.data_type,
        version=(latest.version + 1) if latest else 1,
        sha256=document.sha256,
        size=document.size,
    )
    session.add(version)
    session.flush()
    session.add(DocumentContent(version_id=version.id, content=document.content))
    # Older versions still waiting are replaced by this one: the organization gets the newest.
    session.execute(
        update(Delivery)
        .where(
            Delivery.patient_id == patient_id,
            Delivery.data_type == document.data_type,
            Delivery.status.in_([DeliveryStatus.QUEUED, DeliveryStatus.FAILED]),
        )
        .values(status=DeliveryStatus.SUPERSEDED)
    )
    queued = enqueue_version(session, version)
    return PutResult(
        patient_id, document.data_type, version.version, version.id, True, queued,
        version.sha256, version.size,
    )  # fmt: skip


def check_scope(
    store: Store,
    org_id: str | None = None,
    project_id: str | None = None,
    patient_ids: Sequence[str] = (),
    destinations: Sequence[str] = (),
) -> None:
    """Refuse (`IngestError`) an organization, project or patient that does not exist, or a
    destination no project delivers to: a run, a backfill or a report for it would find nothing
    and say so as if all were well."""
    with store.session() as session:
        if org_id is not None and session.get(Organization, org_id) is None:
            raise IngestError(f"no organization {org_id!r} (see `patient-delivery org list`)")
        if project_id is not None and session.get(Project, project_id) is None:
            raise IngestError(f"no project {project_id!r} (see `patient-delivery project list`)")
        for patient_id in patient_ids:
            if session.get(Patient, patient_id) is None:
                raise IngestError(f"no patient {patient_id!r}")
        subscribed = set(session.scalars(select(Subscription.destination).where(
            Subscription.destination.in_(destinations)))) if destinations else set()  # fmt: skip
        for destination in destinations:
            if destination not in subscribed:
                raise IngestError(f"no project delivers to {destination!r} (see "
                                  "`patient-delivery subscriptions`)")  # fmt: skip


def check_subscription(store: Store, project_id: str, destination: str) -> None:
    """Refuse (`IngestError`) a subscription that cannot be made: not a block reference, no
    such project, or one that already exists. Whether the block itself exists and is valid is
    the blocks layer's to check (`blocks.check_destination`)."""
    _check_reference(destination)
    with store.session() as session:
        _existing_subscription(session, project_id, destination)


def _check_reference(destination: str) -> None:
    if "/" not in destination:
        raise IngestError(
            "destination must be a block reference 'block-type/name', e.g. local-destination/demo"
        )


def _existing_subscription(session: Session, project_id: str, destination: str) -> None:
    if session.get(Project, project_id) is None:
        raise IngestError(f"no project {project_id!r} (see `patient-delivery project list`)")
    existing = session.scalars(
        select(Subscription).where(
            Subscription.project_id == project_id, Subscription.destination == destination
        )
    ).first()
    if existing:
        raise IngestError(f"project {project_id!r} already delivers to {destination!r}")


def subscribe(
    store: Store,
    project_id: str,
    destination: str,
    data_types: list[str] | tuple[str, ...] = DATA_TYPES,
    purpose: str = DEFAULT_PURPOSE,
) -> int:
    """Deliver a project's documents of `data_types` to `destination` (a block `type/name`).

    The latest documents the project already has are queued at once; returns how many. The
    block is not checked here (the core cannot load blocks): callers go through
    `patient_delivery.flows.subscriptions.subscribe`, which refuses a missing or invalid one.
    """
    types = sorted({check_data_type(t) for t in data_types})
    if not types:
        raise IngestError("subscribe to at least one data type")
    _check_reference(destination)
    with store.session() as session:
        _existing_subscription(session, project_id, destination)
        subscription = Subscription(
            project_id=project_id,
            destination=destination,
            data_types=",".join(types),
            purpose=purpose,
        )
        session.add(subscription)
        session.flush()
        return enqueue_heads(session, subscription)


def unsubscribe(store: Store, project_id: str, destination: str) -> int:
    """Stop delivering to `destination`; deliveries still queued are withdrawn (returns count)."""
    with store.session() as session:
        subscription = session.scalars(
            select(Subscription).where(
                Subscription.project_id == project_id, Subscription.destination == destination
            )
        ).first()
        if subscription is None:
            raise IngestError(f"project {project_id!r} does not deliver to {destination!r}")
        withdrawn = session.execute(
            update(Delivery)
            .where(
                Delivery.project_id == project_id,
                Delivery.destination == destination,
                Delivery.status.in_([DeliveryStatus.QUEUED, DeliveryStatus.FAILED]),
            )
            .values(status=DeliveryStatus.SUPERSEDED, last_error="unsubscribed")
        ).rowcount
        session.delete(subscription)
        return int(withdrawn or 0)
