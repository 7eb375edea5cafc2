"""SMART Backend Services, as an organization's backend service uses it: register its public
keys, sign a client assertion, get a token, read. The client side is written here from the
specification with joserfc (another JOSE implementation than the server's PyJWT)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwk, jwt
from sqlalchemy import select

from patient_delivery.pull import smart
from patient_delivery.store import Store
from patient_delivery.store.models import Disclosure
from tests.test_cli import run
from tests.test_pull import World, _mcp_call, _text
from tests.test_pull import world as world

pytestmark = pytest.mark.security
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class Service:
    """An organization's backend service: its key pair and client_id, and what it sends."""

    def __init__(self, api_url: str, kind: str = "RSA") -> None:
        self.kid = f"{kind.lower()}-{uuid.uuid4().hex[:8]}"
        if kind == "RSA":
            self.key = jwk.RSAKey.generate_key(2048, parameters={"kid": self.kid})
            self.alg = "RS384"
        else:
            self.key = jwk.ECKey.generate_key("P-384", parameters={"kid": self.kid})
            self.alg = "ES384"
        self.api_url = api_url
        self.client_id = ""
        config = httpx.get(f"{api_url}/fhir/.well-known/smart-configuration").json()
        self.token_url = config["token_endpoint"]

    def jwks(self) -> str:
        return json.dumps({"keys": [self.key.as_dict(private=False)]})

    def assertion(self, **changes: Any) -> str:
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
                  "exp": now + 240, "jti": uuid.uuid4().hex, **changes}  # fmt: skip
        header = {"alg": self.alg, "kid": self.kid, "typ": "JWT"}
        return jwt.encode(header, claims, self.key, algorithms=[self.alg])

    def ask(self, assertion: str | None = None, scope: str = "system/*.rs") -> httpx.Response:
        return httpx.post(self.token_url, data={
            "grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion or self.assertion(), "scope": scope,
        })  # fmt: skip

    def token(self, scope: str = "system/*.rs") -> str:
        answer = self.ask(scope=scope)
        assert answer.status_code == 200, answer.text
        # RFC 6749 5.1: a token answer is never cached, by HTTP/1.1 or 1.0 caches
        cached = (answer.headers["Cache-Control"], answer.headers["Pragma"])
        assert cached == ("no-store", "no-cache")
        return answer.json()["access_token"]


@pytest.fixture
def service(world: World) -> Iterator[Service]:
    registered = Service(world.api.url)
    registered.client_id = smart.add_client(world.store, "acme", registered.jwks(), label="etl")
    yield registered


def read(world: World, path: str, token: str) -> httpx.Response:
    return httpx.get(f"{world.api.url}/fhir/{path}", headers={"Authorization": f"Bearer {token}"})


def test_discovery_says_how_to_ask_for_a_token(world: World) -> None:
    config = httpx.get(f"{world.api.url}/fhir/.well-known/smart-configuration").json()
    assert config["token_endpoint"] == f"{world.api.url}/auth/token"
    assert config["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert set(config["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
    assert config["grant_types_supported"] == ["client_credentials"]
    assert "system/*.rs" in config["scopes_supported"]
    metadata = httpx.get(f"{world.api.url}/fhir/metadata").json()
    [rest] = metadata["rest"]
    assert rest["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"


def test_python_fhirclient_finds_the_token_endpoint_in_the_metadata_and_reads(
    world: World, service: Service
) -> None:
    """Python `fhirclient` as shipped: given its client_id, a signed assertion and a scope, it
    reads /fhir/metadata, finds the token endpoint there (the SMART `oauth-uris` extension),
    gets a token with the assertion and reads the organization's patients with it."""
    from fhirclient import client
    from fhirclient.models.patient import Patient

    reader = client.FHIRClient(settings={
        "app_id": service.client_id, "api_base": f"{world.api.url}/fhir",
        "jwt_token": service.assertion(), "scope": "system/*.rs",
    })  # fmt: skip
    reader.prepare()  # the CapabilityStatement: OAuth 2 with a JWT, not "no auth"
    assert reader.server.auth.auth_type == "oauth2"
    reader.authorize()
    found = next(Patient.where({"_count": "500"}).perform_iter(reader.server))  # the first page
    expected = world.get("Patient", _count="500").json()
    assert found.total == expected["total"] > 0
    assert [e.resource.id for e in found.entry] == [e["resource"]["id"] for e in expected["entry"]]
    patient_id = next(iter(world.patients()))
    assert Patient.read(patient_id, reader.server).id == patient_id


@pytest.mark.parametrize("kind", ["RSA", "EC"])
def test_a_service_gets_a_token_and_reads_what_its_api_key_reads(
    world: World, store: Store, kind: str
) -> None:
    service = Service(world.api.url, kind)
    service.client_id = smart.add_client(store, "acme", service.jwks())
    answer = service.ask()
    assert answer.status_code == 200, answer.text
    grant = answer.json()
    assert (grant["token_type"], grant["expires_in"], grant["scope"]) == (
        "bearer",
        300,
        "system/*.rs",
    )
    assert answer.headers["cache-control"] == "no-store"
    with_token = read(world, "Patient", grant["access_token"]).json()
    with_key = world.get("Patient").json()
    assert with_token["total"] == with_key["total"] > 0
    assert [e["resource"]["id"] for e in with_token["entry"]] == [
        e["resource"]["id"] for e in with_key["entry"]
    ]
    with store.session() as session:
        accessors = set(session.scalars(select(Disclosure.accessor)))
    assert f"smart-client:{service.client_id}" in accessors  # the ledger names the client
    other = read(world, f"Patient/{_stranger(world)}", grant["access_token"])
    assert other.status_code == 404  # another organization's patient: not found, as with keys


def _stranger(world: World) -> str:
    answer = world.get("Patient", key="other").json()
    return answer["entry"][0]["resource"]["id"]


def test_assertions_that_must_be_refused_are(world: World, service: Service) -> None:
    stranger = Service(world.api.url)  # a key the client never registered, under its kid
    stranger.kid, stranger.client_id = service.kid, service.client_id
    now = int(time.time())
    cases = {
        "signed by another key": stranger.assertion(),
        "wrong audience": service.assertion(aud=f"{world.api.url}/other/token"),
        "expired": service.assertion(exp=now - 120),
        "exp ten minutes ahead": service.assertion(exp=now + 600),
        "sub is not the client": service.assertion(sub="someone-else"),
        "unknown client": service.assertion(iss="nobody-1", sub="nobody-1"),
        "no jti": service.assertion(jti=None),
        "not a JWT": "not-a-jwt",
    }
    for case, assertion in cases.items():
        answer = service.ask(assertion)
        assert answer.status_code == 401, (case, answer.text)
        assert answer.json()["error"] == "invalid_client", case
        assert assertion not in answer.text, case  # never echoed
    reused = service.assertion()
    assert service.ask(reused).status_code == 200
    replay = service.ask(reused)
    assert (replay.status_code, replay.json()["error"]) == (401, "invalid_client")
    assert "used" in replay.json()["error_description"]
    wrong_grant = httpx.post(service.token_url, data={"grant_type": "password"})
    assert wrong_grant.json()["error"] == "unsupported_grant_type"
    no_grant = httpx.post(service.token_url, data={"scope": "system/*.rs"})  # RFC 6749 5.2
    assert (no_grant.status_code, no_grant.json()["error"]) == (400, "invalid_request")
    no_such_type = service.ask(scope="system/Foo.rs")
    assert (no_such_type.status_code, no_such_type.json()["error"]) == (400, "invalid_scope")
    assert "does not serve" in no_such_type.json()["error_description"]
    too_wide = service.ask(scope="system/*.cruds")
    assert (too_wide.status_code, too_wide.json()["error"]) == (400, "invalid_scope")
    as_json = httpx.post(service.token_url, json={"grant_type": "client_credentials"})
    assert (as_json.status_code, as_json.json()["error"]) == (400, "invalid_request")


def test_a_revoked_client_loses_its_tokens_at_their_next_request(
    world: World, service: Service
) -> None:
    token = service.token()
    assert read(world, "Patient", token).status_code == 200
    smart.revoke_client(world.store, service.client_id)
    refused = read(world, "Patient", token)
    assert refused.status_code == 401 and refused.json()["resourceType"] == "OperationOutcome"
    # RFC 6750 3.1: a token sent and refused is named invalid; no token at all, only the scheme
    assert refused.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    anonymous = httpx.get(f"{world.api.url}/fhir/Patient")
    assert (anonymous.status_code, anonymous.headers["WWW-Authenticate"]) == (401, "Bearer")
    assert service.ask().status_code == 401  # and it gets no new one


def test_a_token_expires(world: World, service: Service) -> None:
    from datetime import timedelta

    from patient_delivery.store.models import utcnow

    token = service.token()
    assert smart.authenticate_token(world.store, token) is not None
    later = utcnow() + timedelta(seconds=smart.TOKEN_SECONDS + 1)
    assert smart.authenticate_token(world.store, token, now=later) is None


def test_scopes_bound_what_a_token_reads(world: World, store: Store) -> None:
    service = Service(world.api.url)
    scopes = "system/Patient.rs system/Condition.rs"
    service.client_id = smart.add_client(store, "acme", service.jwks(), scopes=scopes)
    assert service.ask(scope="system/*.rs").status_code == 400  # more than it was given
    token = service.token(scope="system/Condition.rs")
    patient_id = next(iter(world.patients()))
    assert read(world, "Patient", token).status_code == 403
    assert read(world, f"Patient/{patient_id}", token).status_code == 403
    assert read(world, f"Condition?patient={patient_id}", token).status_code == 200
    assert read(world, f"Observation?patient={patient_id}", token).status_code == 403
    everything = read(world, f"Patient/{patient_id}/$everything?_count=500", token).json()
    kinds = {entry["resource"]["resourceType"] for entry in everything.get("entry", [])}
    assert kinds <= {"Condition"} and kinds  # only what the scopes cover


def test_the_mcp_server_takes_a_token_too(world: World, service: Service) -> None:
    token = service.token()
    [tools, listed] = _mcp_call(world.api.url, token, ("list_patients", {"limit": 5}))
    assert "list_patients" in tools
    assert json.loads(_text(listed))["total"] == world.get("Patient").json()["total"]


def test_clients_are_registered_listed_and_revoked_from_the_cli(
    world: World, tmp_path: Path
) -> None:
    service = Service(world.api.url, "EC")
    keys = tmp_path / "jwks.json"
    keys.write_text(service.jwks())
    client_id = run("client", "add", "acme", "--jwks", str(keys), "--label", "warehouse").strip()
    assert client_id.startswith("acme-")
    listed = json.loads(run("client", "list", "--json"))["clients"]
    [row] = [c for c in listed if c["client_id"] == client_id]
    assert (row["org_id"], row["scopes"], row["key_ids"]) == ("acme", "system/*.rs",
                                                                        service.kid)  # fmt: skip
    service.client_id = client_id
    assert service.ask().status_code == 200
    assert f"client {client_id} revoked" in run("client", "revoke", client_id)
    assert service.ask().status_code == 401


@pytest.mark.bad_input
@pytest.mark.filterwarnings("ignore:Key size")  # the 1024-bit key made to be refused
def test_a_key_set_that_cannot_be_used_is_one_line_and_exit_2(world: World, tmp_path: Path) -> None:
    rsa = jwk.RSAKey.generate_key(2048, parameters={"kid": "k"})
    small = jwk.RSAKey.generate_key(1024, parameters={"kid": "k"}, private=True)
    p256 = jwk.ECKey.generate_key("P-256", parameters={"kid": "k"})
    without_kid = {k: v for k, v in rsa.as_dict(private=False).items() if k != "kid"}
    cases = {
        "not json": ("{", "not JSON"),
        "no keys": (json.dumps({"keys": []}), "has no keys"),
        "a private key": (json.dumps({"keys": [rsa.as_dict(private=True)]}), "private key"),
        "no kid": (json.dumps({"keys": [without_kid]}), "no kid"),
        "1024-bit RSA": (json.dumps({"keys": [small.as_dict(private=False)]}), "2048 bits"),
        "P-256": (json.dumps({"keys": [p256.as_dict(private=False)]}), "P-384"),
    }
    for case, (text, said) in cases.items():
        path = tmp_path / "jwks.json"
        path.write_text(text)
        output = run("client", "add", "acme", "--jwks", str(path), code=2)
        assert said in output and len(output.strip().splitlines()) == 1, (case, output)
        assert "BEGIN" not in output and '"n"' not in output  # no key material echoed
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"keys": [rsa.as_dict(private=False)]}))
    for args, said in (
        (("client", "add", "nosuch", "--jwks", str(good)), "no organization 'nosuch'"),
        (("client", "add", "acme", "--jwks", str(good), "--scope", "system/*.write"),
         "not a read-only system scope"),
        (("client", "add", "acme", "--jwks", str(tmp_path / "missing.json")), "--jwks"),
        (("client", "revoke", "nosuch-1"), "no client"),
    ):  # fmt: skip
        output = run(*args, code=2)
        assert said in output and len(output.strip().splitlines()) == 1, (args, output)
