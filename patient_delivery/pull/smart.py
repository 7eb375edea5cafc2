"""SMART Backend Services: an organization's backend service gets short-lived bearer tokens.

An organization registers a client with its public key set (JWKS); we give it a client_id.
To get a token, the service signs a JWT (the client assertion: `iss` and `sub` its client_id,
`aud` our token endpoint, `exp` at most five minutes ahead, a `jti` never used before) with
one of those keys (RS384 or ES384) and posts it to the token endpoint with
`grant_type=client_credentials` and the scopes it wants (`system/*.rs`). The token it gets is
random, good for `TOKEN_SECONDS`, and read-only within the scopes granted; we keep only its
SHA-256. Revoking the client ends its tokens at their next request.

(HL7 SMART App Launch, "SMART Backend Services"; OAuth 2.0 client credentials with
`private_key_jwt`, RFC 7523.)
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from patient_delivery.pull.resource_types import SERVED_TYPES
from patient_delivery.store import Store
from patient_delivery.store.models import (
    AccessToken,
    Organization,
    SmartAssertion,
    SmartClient,
    utcnow,
)

TOKEN_PREFIX = "pdt_"  # noqa: S105 (how our tokens begin, not a token)
TOKEN_SECONDS = 300
"""How long an access token is good for (the service asks again with a new assertion)."""

ASSERTION_MAX_SECONDS = 300
"""The furthest ahead an assertion's `exp` may be (the specification's five minutes)."""

LEEWAY_SECONDS = 30
"""Clock difference tolerated between the client and us."""

ALGORITHMS = ("RS384", "ES384")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DEFAULT_SCOPES = "system/*.rs"

PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
"""JWK members that hold private key material (RFC 7518, 6.2.2, 6.3.2 and 6.4): any one of
them (an RSA `q` alone rebuilds the private key from the modulus) refuses the key set."""

TIMES = ("exp", "iat", "nbf")
LATEST_SECONDS = 253402300799
"""The last second a stored time can hold (9999-12-31T23:59:59Z)."""

_SCOPE = re.compile(r"system/(\*|[A-Z][A-Za-z]{0,63})\.(read|rs|r|s)")


class ClientError(Exception):
    """A client registration that cannot be done (unknown organization or client, bad keys)."""


class TokenRefused(Exception):
    """A token request refused, with its OAuth 2.0 error code (RFC 6749, 5.2). The message
    says what was wrong, never the assertion or a key."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


@dataclass(frozen=True)
class Grant:
    """An access token as issued: what the token endpoint answers."""

    token: str
    scopes: str
    expires_in: int = TOKEN_SECONDS


@dataclass(frozen=True)
class TokenHolder:
    """Who a valid access token stands for."""

    client_id: str
    organization_id: str
    scopes: frozenset[str]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_scopes(text: str) -> frozenset[str]:
    """Space-separated SMART system scopes (`system/*.rs`, `system/Patient.read`), or
    `ClientError` naming the first that is not one (read-only: `r`, `s`, `rs` or `read`)."""
    scopes = frozenset(text.split())
    for scope in sorted(scopes):
        match = _SCOPE.fullmatch(scope)
        if not match:
            raise ClientError(
                f"scope {scope[:80]!r} is not a read-only system scope (e.g. system/*.rs)"
            )
        if match.group(1) != "*" and match.group(1) not in SERVED_TYPES:
            raise ClientError(f"scope {scope[:80]!r} names a resource type the API does not serve")
    if not scopes:
        raise ClientError("no scopes given (e.g. system/*.rs)")
    return scopes


def allows(scopes: frozenset[str], resource_type: str) -> bool:
    """Whether `scopes` let the holder read `resource_type`."""
    for scope in scopes:
        match = _SCOPE.fullmatch(scope)
        if match and match.group(1) in ("*", resource_type):
            return True
    return False


def check_jwks(text: str) -> dict[str, Any]:
    """A JWKS document of public keys a client may sign with, or `ClientError` saying why not:
    JSON with `keys`, each an RSA key of at least 2048 bits or an EC P-384 key, with a `kid`,
    and no private part."""
    try:
        document = json.loads(text)
    except ValueError:
        raise ClientError('the key set is not JSON (a JWKS document: {"keys": [...]})') from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ClientError('the key set has no keys (a JWKS document: {"keys": [...]})')
    for number, key in enumerate(keys, 1):
        _check_key(key, number)
    return {"keys": keys}


def _check_key(key: object, number: int) -> None:
    where = f"key {number}"
    if not isinstance(key, dict):
        raise ClientError(f"{where} is not a JSON object")
    if PRIVATE_MEMBERS & key.keys():
        raise ClientError(f"{where} holds a private key: register the public keys only")
    if not isinstance(key.get("kid"), str) or not key["kid"]:
        raise ClientError(f"{where} has no kid (the assertion's header names its key by kid)")
    kind, curve = key.get("kty"), key.get("crv")
    if kind == "EC" and curve != "P-384":
        raise ClientError(f"{where}: an EC key must be on P-384 (for ES384)")
    if kind not in ("RSA", "EC"):
        raise ClientError(f"{where}: kty must be RSA (RS384) or EC (ES384)")
    try:
        parsed = jwt.PyJWK(key, "RS384" if kind == "RSA" else "ES384")
    except jwt.PyJWTError as exc:
        raise ClientError(f"{where} cannot be read: {type(exc).__name__}") from None
    if kind == "RSA" and parsed.key.key_size < 2048:
        raise ClientError(f"{where}: an RSA key must have at least 2048 bits")


def add_client(
    store: Store, organization_id: str, jwks: str, scopes: str = DEFAULT_SCOPES, label: str = ""
) -> str:
    """Register a backend service of the organization; returns its client_id."""
    keys = check_jwks(jwks)
    granted = " ".join(sorted(check_scopes(scopes)))
    with store.session() as session:
        if session.get(Organization, organization_id) is None:
            raise ClientError(f"no organization {organization_id!r}")
        client_id = f"{organization_id[:40]}-{secrets.token_hex(8)}"
        session.add(SmartClient(id=client_id, organization_id=organization_id,
                                jwks=json.dumps(keys), scopes=granted, label=label))  # fmt: skip
    return client_id


def revoke_client(store: Store, client_id: str) -> None:
    """Refuse the client's assertions and every token it holds from now on."""
    with store.session() as session:
        client = session.get(SmartClient, client_id)
        if client is None:
            raise ClientError(f"no client {client_id!r}")
        client.revoked_at = client.revoked_at or utcnow()


def list_clients(store: Store) -> list[dict[str, Any]]:
    """Every registered client: id, organization, scopes, label, key IDs, created, revoked."""
    with store.session() as session:
        rows = session.scalars(select(SmartClient).order_by(SmartClient.created_at))
        return [
            {
                "client_id": c.id,
                "org_id": c.organization_id,
                "scopes": c.scopes,
                "label": c.label,
                "key_ids": ",".join(k["kid"] for k in json.loads(c.jwks)["keys"]),
                "created_at": c.created_at,
                "revoked_at": c.revoked_at,
            }
            for c in rows
        ]


def issue_token(
    store: Store, token_url: str, form: dict[str, str], now: datetime | None = None
) -> Grant:
    """Answer a token request (the form's fields), or raise `TokenRefused`."""
    now = now or utcnow()
    if not form.get("grant_type"):  # RFC 6749 5.2: a required parameter is missing
        raise TokenRefused("invalid_request", "grant_type is required (client_credentials)")
    if form["grant_type"] != "client_credentials":
        raise TokenRefused("unsupported_grant_type", "grant_type must be client_credentials")
    if form.get("client_assertion_type") != ASSERTION_TYPE:
        raise TokenRefused("invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}")
    assertion = form.get("client_assertion") or ""
    client_id, key, allowed = _client_key(store, assertion, form.get("client_id"))
    claims = _verified(assertion, key, client_id, token_url, now)
    granted = _granted(allowed, form.get("scope", ""))
    with store.session() as session:
        session.execute(delete(SmartAssertion).where(SmartAssertion.expires_at < now))
        # Kept until the assertion can no longer be accepted: its exp plus the leeway.
        accepted_until = _instant(claims["exp"]) + timedelta(seconds=LEEWAY_SECONDS)
        session.add(SmartAssertion(client_id=client_id, jti=claims["jti"],
                                   expires_at=accepted_until))  # fmt: skip
        try:
            session.flush()
        except IntegrityError:
            raise TokenRefused(
                "invalid_client", "this assertion (its jti) was used before"
            ) from None
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        session.add(AccessToken(token_sha256=_digest(token), client_id=client_id,
                                scopes=" ".join(sorted(granted)), issued_at=now,
                                expires_at=now + timedelta(seconds=TOKEN_SECONDS)))  # fmt: skip
    return Grant(token=token, scopes=" ".join(sorted(granted)))


def _client_key(
    store: Store, assertion: str, client_id: str | None
) -> tuple[str, Any, frozenset[str]]:
    """The client the assertion says it comes from, the key its header names, and the scopes
    the client may be granted."""
    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise TokenRefused("invalid_client", "client_assertion is not a signed JWT") from None
    for name in TIMES:
        value = unverified.get(name)
        if name in unverified and not _seconds(value):
            raise TokenRefused("invalid_client", f"{name} must be a number of seconds since 1970")
    issuer = unverified.get("iss")
    if not isinstance(issuer, str) or (client_id and client_id != issuer):
        raise TokenRefused("invalid_client", "iss must be the client_id")
    if header.get("alg") not in ALGORITHMS:
        raise TokenRefused("invalid_client", f"alg must be one of {', '.join(ALGORITHMS)}")
    with store.session() as session:
        client = session.get(SmartClient, issuer)
        if client is None or client.revoked_at is not None:
            raise TokenRefused("invalid_client", "unknown or revoked client")
        keys = json.loads(client.jwks)["keys"]
        allowed = frozenset(client.scopes.split())
    kid = header.get("kid")
    wanted = "RSA" if header["alg"].startswith("RS") else "EC"
    for key in keys:
        if key["kid"] == kid and key["kty"] == wanted:
            return issuer, jwt.PyJWK(key, header["alg"]), allowed
    raise TokenRefused("invalid_client", "no registered key of the client has that kid and alg")


def _verified(
    assertion: str, key: Any, client_id: str, token_url: str, now: datetime
) -> dict[str, Any]:
    """The assertion's claims once its signature, audience, subject and times hold."""
    try:
        claims = jwt.decode(
            assertion, key, algorithms=list(ALGORITHMS), audience=token_url, issuer=client_id,
            subject=client_id, leeway=LEEWAY_SECONDS,
            options={"require": ["iss", "sub", "aud", "exp", "jti"]},
        )  # fmt: skip
    except jwt.InvalidAudienceError:
        raise TokenRefused("invalid_client", "aud must be this token endpoint's URL") from None
    except jwt.ExpiredSignatureError:
        raise TokenRefused("invalid_client", "the assertion has expired") from None
    except jwt.InvalidSignatureError:
        raise TokenRefused("invalid_client", "the signature does not verify") from None
    except jwt.PyJWTError as exc:
        raise TokenRefused("invalid_client", f"the assertion is not valid ({exc})") from None
    if claims["exp"] - now.timestamp() > ASSERTION_MAX_SECONDS + LEEWAY_SECONDS:
        raise TokenRefused("invalid_client", "exp is more than five minutes ahead")
    if not isinstance(claims["jti"], str) or not 0 < len(claims["jti"]) <= 255:
        raise TokenRefused("invalid_client", "jti must be a string of 1 to 255 characters")
    return claims


def _granted(allowed: frozenset[str], requested: str) -> frozenset[str]:
    """The scopes to grant: each requested one the client may have (a `system/*` scope of
    the client's covers every type's). Launch and identity scopes, which mean nothing without
    a user (Python fhirclient asks for `launch/patient` by default), are left out, as RFC 6749
    3.3 allows; the answer's `scope` says what was granted."""
    system = " ".join(s for s in requested.split() if not _launch_context(s))
    try:
        wanted = check_scopes(system)
    except ClientError as exc:
        raise TokenRefused("invalid_scope", str(exc)) from None
    granted = frozenset(s for s in wanted if s in allowed or _covered(s, allowed))
    if not granted:
        raise TokenRefused("invalid_scope", "none of the requested scopes is granted to the client")
    return granted


LAUNCH_CONTEXT = frozenset({"launch", "openid", "fhirUser", "profile", "offline_access",
                            "online_access"})  # fmt: skip
"""SMART's scopes for an app launched by a user, besides the `launch/...` ones."""


def _launch_context(scope: str) -> bool:
    return scope in LAUNCH_CONTEXT or scope.startswith("launch/")


def _covered(scope: str, allowed: frozenset[str]) -> bool:
    match = _SCOPE.fullmatch(scope)
    return bool(match) and any(
        (m := _SCOPE.fullmatch(a)) is not None and m.group(1) == "*" and _reads(m) >= _reads(match)
        for a in allowed
    )


def _reads(match: re.Match[str]) -> frozenset[str]:
    """What a scope's permissions allow: read, search or both (`read` is both)."""
    permissions = match.group(2)
    return frozenset("rs") if permissions == "read" else frozenset(permissions)


def _seconds(value: object) -> bool:
    """Whether a JWT time claim is a NumericDate we can hold: a number (not a string or a
    boolean), finite, from 1970 to the year 9999."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and 0 <= value <= LATEST_SECONDS  # NaN compares false
    )


def _instant(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def authenticate_token(store: Store, token: str, now: datetime | None = None) -> TokenHolder | None:
    """Who a presented access token stands for, or None: unknown, expired, or its client
    revoked."""
    now = now or utcnow()
    with store.session() as session:
        row = session.execute(
            select(AccessToken.scopes, AccessToken.expires_at, SmartClient.id,
                   SmartClient.organization_id, SmartClient.revoked_at)
            .join(SmartClient, SmartClient.id == AccessToken.client_id)
            .where(AccessToken.token_sha256 == _digest(token))
        ).first()  # fmt: skip
    if row is None or row.revoked_at is not None or row.expires_at <= now:
        return None
    return TokenHolder(row.id, row.organization_id, frozenset(row.scopes.split()))
