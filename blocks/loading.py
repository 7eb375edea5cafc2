"""Loading destination blocks from Prefect: one by reference, or a run's many in a few calls.

Our own block types load through their class: `Block.load` first imports every installed Prefect
collection to find the class (prefect-dask pulls in Dask's `distributed`). A run that delivers
to many destinations reads the blocks it needs by name, `PAGE` to a call, instead of one call
per block, so its start costs the same for ten destinations or a thousand.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from prefect.blocks.core import Block
from prefect.client.orchestration import SyncPrefectClient, get_client

from patient_delivery.blocks.base import Destination
from patient_delivery.blocks.local import LocalDestination
from patient_delivery.blocks.s3 import S3Destination
from patient_delivery.blocks.sftp import SftpDestination

DESTINATION_TYPES: dict[str, type[Destination]] = {
    kind.get_block_type_slug(): kind for kind in (LocalDestination, S3Destination, SftpDestination)
}
"""Our destination block types by slug (`sftp-destination`, ...), to load without a lookup."""

PAGE = 200
"""Block documents read per API call when loading many (the server's most per call)."""


class MissingBlock(LookupError):
    """No destination block is saved under that reference."""


class BlockProblem(ValueError):
    """A destination reference that cannot be used: not `type/name`, an unknown type, no such
    block, or a saved block that breaks its rules. The message is one line and names fields,
    never their values (they may be secrets)."""


def check_destination(reference: str) -> Destination:
    """The destination block saved as `reference`, or `BlockProblem` saying why not."""
    slug, _, name = reference.partition("/")
    if not slug or not name:
        raise BlockProblem(
            f"{reference!r} is not a block reference: write TYPE/NAME, e.g. local-destination/"
            f"{name or slug or 'acme'}"
        )
    if slug not in DESTINATION_TYPES:
        known = ", ".join(DESTINATION_TYPES)
        raise BlockProblem(f"unknown destination type {slug!r} (one of {known})")
    [(_, found)] = load_destinations([reference]).items()
    if isinstance(found, Exception):
        raise BlockProblem(problem(reference, found)) from None
    return found


def problem(reference: str, error: Exception) -> str:
    """Why a destination block could not be loaded, in one line with no field values."""
    if isinstance(error, MissingBlock):
        return f"no destination block {reference} (see `patient-delivery destination list`)"
    errors = getattr(error, "errors", None)
    if callable(errors):  # pydantic's ValidationError: which fields, and what is wrong
        found = [
            f"{'.'.join(map(str, e['loc'])) or 'block'}: {_rule(e['msg'])}"
            for e in errors(include_input=False, include_url=False)
        ]
        return f"block {reference} is invalid: " + "; ".join(found)
    return f"block {reference} cannot be loaded ({type(error).__name__})"


RULE_LENGTH = 160
"""Most characters of one field's reason in a problem: a line to read in a table, not a page."""


def _rule(message: str) -> str:
    """The rule a field broke, short: pydantic's "Value error, " and a template's example
    left out (the block's form and `docs/` have them), then whole clauses (`; `) from the end
    while it is longer than `RULE_LENGTH`: shorter by saying less, never cut mid-word."""
    rule = message.removeprefix("Value error, ").split("; example of a valid template")[0]
    clauses = rule.split("; ")
    while len(clauses) > 1 and len("; ".join(clauses)) > RULE_LENGTH:
        clauses.pop()
    return "; ".join(clauses)


def load_destination(reference: str) -> Destination:
    """The destination block saved as `block-type/name` (see `check_destination` for one that
    says what is wrong in words a person can act on)."""
    slug, _, name = reference.partition("/")
    kind = DESTINATION_TYPES.get(slug)
    # Prefect answers a coroutine to a call made inside an async flow's context, which the
    # delivery flow's worker thread is: ask for the block itself.
    if kind is not None and name:
        destination = kind.load(name, _sync=True)  # type: ignore[call-arg]
    else:
        destination = Block.load(reference, _sync=True)  # type: ignore[call-arg]
    if not isinstance(destination, Destination):
        raise TypeError(f"block {reference!r} is not a destination")
    return destination


def load_destinations(references: Iterable[str]) -> dict[str, Destination | Exception]:
    """Each referenced destination block, or the exception that loading it raised.

    Blocks of our own types are read by name, a page of names per call; any other type is
    loaded one by one. A missing or invalid block fails alone (`MissingBlock`, or its
    validation error), never the others.
    """
    wanted: dict[str, set[str]] = {}
    loaded: dict[str, Destination | Exception] = {}
    for reference in set(references):
        slug, _, name = reference.partition("/")
        if slug in DESTINATION_TYPES and name:
            wanted.setdefault(slug, set()).add(name)
        else:
            loaded[reference] = _load_alone(reference)
    if not wanted:
        return loaded
    with get_client(sync_client=True) as client:
        for slug, names in wanted.items():
            kind, left = DESTINATION_TYPES[slug], sorted(names)
            for start in range(0, len(left), PAGE):
                for name, data in _read_named(client, slug, left[start : start + PAGE]):
                    if name in names:
                        names.discard(name)
                        loaded[f"{slug}/{name}"] = _build(kind, data)
            for name in names:
                loaded[f"{slug}/{name}"] = MissingBlock(f"no block {slug}/{name}")
    return loaded


def _read_named(
    client: SyncPrefectClient, slug: str, names: list[str]
) -> list[tuple[str, dict[str, Any]]]:
    """The named block documents of one type, secrets included, in one call of Prefect's REST
    API (`POST /block_documents/filter`): a run reads only the blocks it needs, however many
    others the server holds."""
    response = client.request(
        "POST",
        "/block_documents/filter",
        json={
            "block_documents": {"name": {"any_": names}, "is_anonymous": {"eq_": False}},
            "block_types": {"slug": {"any_": [slug]}},
            "include_secrets": True,
            "limit": len(names),
        },
    )
    response.raise_for_status()
    return [(document["name"], document["data"]) for document in response.json()]


def saved_since(moment: datetime) -> list[str]:
    """The references of our destination blocks saved (created or updated) at or after
    `moment`, by the Prefect server's clock: what `check-destination` checks for a burst of
    saves. Read without their secrets, a page at a time."""
    found: list[str] = []
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            response = client.request("POST", "/block_documents/filter", json={
                "block_documents": {"is_anonymous": {"eq_": False}},
                "block_types": {"slug": {"any_": sorted(DESTINATION_TYPES)}},
                "include_secrets": False, "offset": offset, "limit": PAGE,
            })  # fmt: skip
            response.raise_for_status()
            page = response.json()
            for document in page:
                updated = datetime.fromisoformat(document["updated"])
                if updated >= moment:
                    found.append(f"{document['block_type']['slug']}/{document['name']}")
            if len(page) < PAGE:
                return sorted(found)
            offset += PAGE


def _build(kind: type[Destination], data: dict[str, object]) -> Destination | Exception:
    try:
        return kind.model_validate(data)
    except ValueError as exc:  # pydantic's ValidationError: saved before a rule it breaks
        return exc


def _load_alone(reference: str) -> Destination | Exception:
    try:
        return load_destination(reference)
    except Exception as exc:
        return exc
