"""Per-organization API keys for the pull API: created and revoked by CLI, stored as hashes;
and who a request's bearer token (an API key or a SMART access token) stands for.

A key is 32 random bytes (`pdk_` + URL-safe base64) shown once at creation. We keep its
SHA-256 only: the key has enough entropy that a slow password hash would add nothing, and
checking one costs one indexed lookup.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from patient_delivery.pull import smart
from patient_delivery.store import Store
from patient_delivery.store.models import ApiKey, Organization, utcnow

PREFIX = "pdk_"


class ApiKeyError(Exception):
    """A key operation that cannot be done (unknown organization or key)."""


@dataclass(frozen=True)
class Caller:
    """Who is reading: the organization, and with which of its API keys or SMART clients (for
    the disclosure record); a SMART client's token reads only within its scopes."""

    organization_id: str
    key_id: int | None = None
    client_id: str | None = None
    scopes: frozenset[str] | None = None
    """The token's SMART scopes; None for an API key, which reads whatever is shared."""

    @property
    def accessor(self) -> str:
        if self.client_id is not None:
            return f"smart-client:{self.client_id}"
        return f"api-key:{self.key_id}"

    @classmethod
    def of(cls, organization_id: str, accessor: str) -> Caller:
        """The caller an `accessor` (`api-key:3`, `smart-client:ID`) names, for work done on
        its behalf later (an export); its scopes were applied when the work was asked for."""
        kind, _, name = accessor.partition(":")
        if kind == "smart-client":
            return cls(organization_id, client_id=name)
        return cls(organization_id, key_id=int(name) if name.isdigit() else None)

    def may_read(self, resource_type: str) -> bool:
        """Whether this caller may read resources of `resource_type` (`*`: of every type)."""
        return self.scopes is None or smart.allows(self.scopes, resource_type)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(store: Store, organization_id: str, label: str = "") -> tuple[int, str]:
    """A new key for the organization; returns (its id, the key). The key is not stored."""
    key = PREFIX + secrets.token_urlsafe(32)
    with store.session() as session:
        if session.get(Organization, organization_id) is None:
            raise ApiKeyError(f"no organization {organization_id!r}")
        row = ApiKey(organization_id=organization_id, key_sha256=_digest(key), label=label)
        session.add(row)
        session.flush()
        return row.id, key


def revoke_key(store: Store, key_id: int) -> None:
    """Refuse the key from now on (kept, revoked, for the record)."""
    with store.session() as session:
        row = session.get(ApiKey, key_id)
        if row is None:
            raise ApiKeyError(f"no API key {key_id}")
        row.revoked_at = row.revoked_at or utcnow()


def list_keys(store: Store) -> list[tuple[int, str, str, datetime, datetime | None]]:
    """(id, organization, label, created, revoked) of every key; never the key."""
    with store.session() as session:
        rows = session.scalars(select(ApiKey).order_by(ApiKey.id))
        return [(k.id, k.organization_id, k.label, k.created_at, k.revoked_at) for k in rows]


def authenticate(store: Store, key: str | None) -> Caller | None:
    """The caller a presented API key or SMART access token stands for, or None: missing,
    unknown, expired and revoked alike."""
    if key and key.startswith(smart.TOKEN_PREFIX):
        holder = smart.authenticate_token(store, key)
        if holder is None:
            return None
        return Caller(holder.organization_id, client_id=holder.client_id, scopes=holder.scopes)
    if not key or not key.startswith(PREFIX):
        return None
    with store.session() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_sha256 == _digest(key)))
        if row is None or row.revoked_at is not None:
            return None
        return Caller(row.organization_id, key_id=row.id)
