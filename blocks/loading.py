"""Loading destination blocks from Prefect: one by reference, or a run's many in a few calls.

Our own block types load through their class: `Block.load` first imports every installed Prefect
collection to find the class (prefect-dask pulls in Dask's `distributed`). A run that delivers
to many destinations reads each block type's documents in pages of `PAGE` instead of one call
per block, so its start costs the same for ten destinations or a thousand.
"""

from __future__ import annotations

from collections.abc import Iterable

from prefect.blocks.core import Block
from prefect.client.orchestration import get_client

from blocks.base import Destination
from blocks.local import LocalDestination
from blocks.s3 import S3Destination
from blocks.sftp import SftpDestination

DESTINATION_TYPES: dict[str, type[Destination]] = {
    kind.get_block_type_slug(): kind for kind in (LocalDestination, S3Destination, SftpDestination)
}
"""Our destination block types by slug (`sftp-destination`, ...), to load without a lookup."""

PAGE = 200
"""Block documents read per API call when loading many."""


class MissingBlock(LookupError):
    """No destination block is saved under that reference."""


def load_destination(reference: str) -> Destination:
    """The destination block saved as `block-type/name`."""
    slug, _, name = reference.partition("/")
    kind = DESTINATION_TYPES.get(slug)
    destination = kind.load(name) if kind is not None and name else Block.load(reference)
    if not isinstance(destination, Destination):
        raise TypeError(f"block {reference!r} is not a destination")
    return destination


def load_destinations(references: Iterable[str]) -> dict[str, Destination | Exception]:
    """Each referenced destination block, or the exception that loading it raised.

    Blocks of our own types are read a page of documents at a time per type; any other type
    is loaded one by one. A missing or invalid block fails alone (`MissingBlock`, or its
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
            kind, left, offset = DESTINATION_TYPES[slug], set(names), 0
            while left:
                documents = client.read_block_documents_by_type(
                    slug, offset=offset, limit=PAGE, include_secrets=True
                )
                for document in documents:
                    if document.name in left and not document.is_anonymous:
                        left.discard(document.name)
                        loaded[f"{slug}/{document.name}"] = _build(kind, document.data)
                if len(documents) < PAGE:
                    break
                offset += PAGE
            for name in left:
                loaded[f"{slug}/{name}"] = MissingBlock(f"no block {slug}/{name}")
    return loaded


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
