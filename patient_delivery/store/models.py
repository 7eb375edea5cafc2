"""The store's tables: who shares what with whom, every document version, and the delivery ledger.

The `deliveries` table is both the work queue and the accounting of disclosures: ingest adds a
*queued* row per (document version, subscribed destination); a delivery run claims rows, renders
their path (*pending*), uploads, and records *delivered* or *failed*. Gather reads it by status,
so a run costs what changed, not the size of the store.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import false


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timestamps stored as UTC and always read back timezone-aware (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use timezone-aware UTC")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Patient(Base):
    """A person whose records we hold; `id` is the healthexPatientId: ours, opaque and stable."""

    __tablename__ = "patients"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fhir_id: Mapped[str | None] = mapped_column(String(128), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Share(Base):
    """A patient shares their records with a project; the organization's externalId lives here."""

    __tablename__ = "shares"
    __table_args__ = (UniqueConstraint("project_id", "external_id"),)

    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patients.id"), primary_key=True, index=True)
    external_id: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class DocumentVersion(Base):
    """One version of one patient's document of one data type; content lives apart."""

    __tablename__ = "document_versions"
    __table_args__ = (UniqueConstraint("patient_id", "data_type", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patients.id"))
    data_type: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)


class DocumentContent(Base):
    """The bytes of a version, in their own table so metadata queries never load them."""

    __tablename__ = "document_contents"

    version_id: Mapped[int] = mapped_column(ForeignKey("document_versions.id"), primary_key=True)
    content: Mapped[bytes] = mapped_column(LargeBinary)


class Subscription(Base):
    """A project delivers these data types to this destination (a Prefect block, by slug/name)."""

    __tablename__ = "subscriptions"
    __table_args__ = (UniqueConstraint("project_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    destination: Mapped[str] = mapped_column(String(255))
    data_types: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    @property
    def data_type_list(self) -> list[str]:
        return [t for t in self.data_types.split(",") if t]


class DeliveryStatus(enum.StrEnum):
    QUEUED = "queued"  # waiting for a run; no path yet
    PENDING = "pending"  # claimed by a run, path rendered; lease protects it
    DELIVERED = "delivered"
    FAILED = "failed"  # the next run tries again (at the same path, if one was rendered)
    SUPERSEDED = "superseded"  # a newer version replaced it before it was sent
    REPLACED = "replaced"  # was delivered; a newer version was since delivered to the same path
    WITHDRAWN = "withdrawn"  # the patient stopped sharing with the project before it was sent


UNSENT = (DeliveryStatus.QUEUED, DeliveryStatus.PENDING, DeliveryStatus.FAILED)
"""Deliveries still owed: not sent yet, and neither superseded nor withdrawn."""


class Delivery(Base):
    """One document version to one destination for one project: queue entry and ledger row."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("version_id", "project_id", "destination"),
        Index("ix_deliveries_status_destination", "status", "destination"),
        Index("ix_deliveries_patient", "patient_id", "data_type", "destination"),
        Index("ix_deliveries_project_destination", "project_id", "destination"),
        Index("ix_deliveries_destination_path", "destination", "path"),
        Index("ix_deliveries_manifest_owed", "manifest_owed", "manifest_run"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("document_versions.id"))
    patient_id: Mapped[str] = mapped_column(ForeignKey("patients.id"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    data_type: Mapped[str] = mapped_column(String(16))
    destination: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.QUEUED)
    path: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(Integer)
    landing: Mapped[str | None] = mapped_column(String(16))
    """How the file was put in place, where a destination has several ways (SFTP)."""
    manifest_owed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Delivered, and not yet listed in a manifest written to its destination."""
    manifest_run: Mapped[str | None] = mapped_column(String(64))
    """The run whose manifest is to list it (the delivering run, or a later one taking over a
    manifest that could not be written)."""
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)
    rendered_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)


class DestinationFailing(Base):
    """A destination that a run could deliver nothing to and had failures at: since when, and
    by which run it was first found so. A run that delivers anything to it removes the row.
    Later runs' failures there are known trouble (the "keeps failing" alert), not new."""

    __tablename__ = "destinations_failing"

    destination: Mapped[str] = mapped_column(String(255), primary_key=True)
    since: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    first_run: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    runs: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    """Runs in a row that failed at it and delivered nothing to it."""


class DestinationWaiting(Base):
    """A destination whose deliveries wait for every run: no run claims them meanwhile, so
    runs that cannot send them do not pass them back and forth. An `unusable` block's wait
    ends at `until` (or when a run starting finds the block usable again); a destination
    `down` waits until a probe reaches it, the next one due at `until`."""

    __tablename__ = "destinations_waiting"

    destination: Mapped[str] = mapped_column(String(255), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    since: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    until: Mapped[datetime] = mapped_column(UtcDateTime)
    kind: Mapped[str] = mapped_column(String(16), default="unusable", server_default="unusable")


class ShareWithdrawal(Base):
    """A patient stopped sharing with a project: append-only (who recorded it, when, why). The
    share itself is removed, so nothing of theirs is queued, sent or served to it again."""

    __tablename__ = "share_withdrawals"
    __table_args__ = (Index("ix_share_withdrawals_patient", "patient_id", "withdrawn_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patients.id"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    reason: Mapped[str | None] = mapped_column(String(500))
    recorded_by: Mapped[str] = mapped_column(String(200))
    withdrawn_deliveries: Mapped[int] = mapped_column(Integer)
    withdrawn_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Manifest(Base):
    """A manifest a run wrote to a destination for one project: the drop it lists is complete."""

    __tablename__ = "manifests"
    __table_args__ = (Index("ix_manifests_run", "flow_run_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    flow_run_id: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(255))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    documents: Mapped[int] = mapped_column(Integer)
    failed: Mapped[int] = mapped_column(Integer)
    written_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Disclosure(Base):
    """One send of a document to a recipient: the append-only accounting of disclosures.

    A delivery row holds the latest state; a re-send (a forced backfill, a full re-delivery)
    adds a disclosure here instead of erasing the earlier one.
    """

    __tablename__ = "disclosures"
    __table_args__ = (Index("ix_disclosures_patient", "patient_id", "disclosed_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int | None] = mapped_column(ForeignKey("deliveries.id"), index=True)
    """The delivery that pushed it; empty for a read through the pull API."""
    patient_id: Mapped[str] = mapped_column(ForeignKey("patients.id"))
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    destination: Mapped[str] = mapped_column(String(255))
    version_id: Mapped[int] = mapped_column(ForeignKey("document_versions.id"))
    data_type: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    purpose: Mapped[str] = mapped_column(String(200))
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    disclosed_at: Mapped[datetime] = mapped_column(UtcDateTime)
    accessor: Mapped[str | None] = mapped_column(String(64))
    """Who read it through the pull API (`api-key:<id>`); empty for pushes."""


class ApiKey(Base):
    """An organization's key to the pull API (FHIR and MCP). Only the SHA-256 of the key is
    kept: the key itself is shown once, when it is created."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class SmartClient(Base):
    """An organization's backend service, registered for SMART Backend Services: it proves
    who it is with a JWT signed by a key of its public key set (JWKS), kept here as given."""

    __tablename__ = "smart_clients"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    """The client_id we gave it (not a secret)."""
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    jwks: Mapped[str] = mapped_column(Text)
    """Its public keys, a JWKS document (JSON)."""
    scopes: Mapped[str] = mapped_column(String(1000))
    """The scopes it may be granted, space-separated (`system/*.rs`)."""
    label: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class SmartAssertion(Base):
    """A client assertion's `jti`, kept until the assertion expires: a replay is refused."""

    __tablename__ = "smart_assertions"

    client_id: Mapped[str] = mapped_column(ForeignKey("smart_clients.id"), primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class AccessToken(Base):
    """A short-lived bearer token issued to a SMART client; only its SHA-256 is kept."""

    __tablename__ = "access_tokens"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("smart_clients.id"), index=True)
    scopes: Mapped[str] = mapped_column(String(1000))
    issued_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class BulkExport(Base):
    """A FHIR Bulk Data export an organization asked for: its request, where it stands, and,
    once complete, its files (listed in `output`, kept until `expires_at`)."""

    __tablename__ = "bulk_exports"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    accessor: Mapped[str] = mapped_column(String(120))
    project_id: Mapped[str | None] = mapped_column(String(64))
    """The group exported (a project), or None for every patient sharing with the organization."""
    types: Mapped[str] = mapped_column(Text)
    """The resource types to export, comma-separated."""
    since: Mapped[datetime | None] = mapped_column(UtcDateTime)
    request_url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    """accepted, running, complete, failed or cancelled."""
    patients_total: Mapped[int] = mapped_column(Integer, default=0)
    patients_done: Mapped[int] = mapped_column(Integer, default=0)
    transaction_time: Mapped[datetime | None] = mapped_column(UtcDateTime)
    output: Mapped[str | None] = mapped_column(Text)
    """The completed files as JSON: [{"type", "file", "count"}], errors' file among them."""
    error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    """When its writer last reported (about every second while it writes): a running export
    long silent was stopped with the process writing it."""
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
