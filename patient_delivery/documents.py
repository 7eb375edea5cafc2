"""Documents: the two data types we deliver, and the checks a document passes before it is stored.

Validation happens once, at ingest, so that a delivery run never meets a document it cannot
send. Error messages name the problem and where it is (line and column) but never quote the
document: its content is patient data.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from lxml import etree

DataType = Literal["ccda", "fhir"]
DATA_TYPES: tuple[DataType, ...] = ("ccda", "fhir")

CDA_NAMESPACE = "urn:hl7-org:v3"

MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
"""Largest document accepted (64 MiB). Real C-CDA documents are tens to hundreds of KB and a
per-patient FHIR bundle about 1 MB; the limit is there so one upload cannot exhaust memory."""


class InvalidDocument(ValueError):
    """The document was refused; nothing was stored. The message says why, never what it held."""


MAX_JSON_DEPTH = 1024
"""Deepest nesting of arrays and objects in FHIR JSON (orjson's own limit: what the read path
can read, ingest accepts)."""


def parse_json(content: bytes | str, what: str, first_line: int = 1) -> Any:
    """JSON as FHIR JSON allows it, with the parser the read path uses (orjson): no `NaN` or
    `Infinity`, no number beyond a double, no lone surrogate, nesting at most `MAX_JSON_DEPTH`;
    and what every reader reads alike: no key twice in one object (readers differ on which
    wins), no integer that the read path would turn into a float (beyond 64 bits). A refusal
    names the line (counted from `first_line`) and column where the parser can, never the
    text."""
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        line = first_line + exc.lineno - 1
        raise InvalidDocument(
            f"{what} is not valid JSON at line {line}, column {exc.colno}: {exc.msg}"
        ) from None
    _read_alike(content, what if first_line == 1 else f"{what} line {first_line}")
    return parsed


def _read_alike(content: bytes | str, what: str) -> None:
    """Refuse JSON that orjson accepts but that readers would read differently (a second pass
    with the standard library's parser, which reports every object's keys and every integer)."""
    if sys.getrecursionlimit() < MAX_JSON_DEPTH + 500:  # its C scanner counts nesting there
        sys.setrecursionlimit(MAX_JSON_DEPTH + 500)
    try:
        json.loads(content, object_pairs_hook=_no_key_twice, parse_int=_exact_integer)
    except _Ambiguous as exc:
        raise InvalidDocument(f"{what} is not accepted: {exc}") from None


class _Ambiguous(ValueError):
    """JSON that readers would not all read the same way."""


def _no_key_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise _Ambiguous("an object has the same key twice (readers differ on which value wins)")
    return found


def _exact_integer(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise _Ambiguous("an integer beyond 64 bits (it would be read back as a rounded number)")
    return value


@dataclass(frozen=True)
class CheckedDocument:
    """A document that passed validation, with the facts the store keeps about it."""

    data_type: DataType
    content: bytes
    sha256: str
    size: int
    fhir_patient_id: str | None = None


def check_data_type(value: str) -> DataType:
    if value not in DATA_TYPES:
        raise InvalidDocument(f"unknown data type {value!r}; expected one of {list(DATA_TYPES)}")
    return value  # type: ignore[return-value]


def check_document(data_type: str, content: bytes) -> CheckedDocument:
    """Validate `content` as `data_type`, or raise `InvalidDocument` naming the problem."""
    kind = check_data_type(data_type)
    if not isinstance(content, bytes | bytearray):
        raise InvalidDocument("document content must be bytes")
    if len(content) == 0:
        raise InvalidDocument(f"{kind} document is empty")
    if len(content) > MAX_DOCUMENT_BYTES:
        raise InvalidDocument(
            f"{kind} document is {len(content)} bytes; the limit is {MAX_DOCUMENT_BYTES} bytes"
        )
    content = bytes(content)
    fhir_patient_id = None
    if kind == "ccda":
        check_ccda(content)
    else:
        fhir_patient_id = check_fhir_bundle(content)
    return CheckedDocument(
        data_type=kind,
        content=content,
        sha256=hashlib.sha256(content).hexdigest(),
        size=len(content),
        fhir_patient_id=fhir_patient_id,
    )


def _safe_xml_parser() -> etree.XMLParser:
    # No DTD loading, no entity resolution, no network: external entities cannot read files or
    # reach hosts, and entity-expansion bombs are never expanded.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=False,
    )


def check_ccda(content: bytes) -> None:
    """A C-CDA document: well-formed XML, no DOCTYPE, root `ClinicalDocument` in the HL7 v3 ns."""
    try:
        root = etree.fromstring(content, parser=_safe_xml_parser())
    except etree.XMLSyntaxError as exc:
        line, column = exc.position if exc.position else (exc.lineno, 0)
        raise InvalidDocument(
            f"ccda is not well-formed XML at line {line}, column {column}: {_xml_reason(exc)}"
        ) from None
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise InvalidDocument(
            "ccda declares a DOCTYPE; C-CDA documents have none, and DTDs can carry entity "
            "expansion or external entities, so they are refused"
        )
    qname = etree.QName(root)
    if qname.localname == "ClinicalDocument" and not qname.namespace:
        raise InvalidDocument(
            f"ccda root element 'ClinicalDocument' has no namespace; C-CDA needs "
            f'xmlns="{CDA_NAMESPACE}" on it (line {root.sourceline})'
        )
    if qname.localname != "ClinicalDocument" or qname.namespace != CDA_NAMESPACE:
        found = f"{{{qname.namespace}}}{qname.localname}" if qname.namespace else qname.localname
        raise InvalidDocument(
            f"ccda root element is {found!r}; expected 'ClinicalDocument' in namespace "
            f"{CDA_NAMESPACE!r} (line {root.sourceline})"
        )


def _xml_reason(exc: etree.XMLSyntaxError) -> str:
    # libxml2's message names the construct (tag name, entity name), not the text content.
    message = str(exc.msg or "syntax error")
    return message.split(", line ")[0]


def check_fhir_bundle(content: bytes) -> str:
    """A FHIR R4 `Bundle` (JSON) whose resources all belong to one patient; returns its id."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidDocument(f"fhir is not UTF-8 at byte {exc.start}") from None
    bundle = parse_json(text, "fhir")
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InvalidDocument("fhir document is not a FHIR Bundle (resourceType must be 'Bundle')")
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise InvalidDocument("fhir Bundle.entry must be a list")
    patient_ids: list[str] = []
    for index, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise InvalidDocument(f"fhir Bundle.entry[{index}] has no resource with a resourceType")
        if resource["resourceType"] == "Patient":
            patient_ids.append(fhir_id(resource, f"fhir Bundle.entry[{index}]"))
    if len(patient_ids) != 1:
        raise InvalidDocument(
            f"fhir Bundle must hold exactly one Patient resource with an id; found "
            f"{len(patient_ids)}"
        )
    patient_ref = f"Patient/{patient_ids[0]}"
    for index, entry in enumerate(entries):
        if any(ref != patient_ref for ref in patient_references(entry["resource"])):
            raise InvalidDocument(
                f"fhir Bundle.entry[{index}] refers to a different patient than the bundle's "
                "Patient resource; a bundle carries one patient's records only"
            )
    return patient_ids[0]


FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
"""FHIR's `id` datatype: what a resource's id may be."""


def fhir_id(resource: dict[str, Any], where: str) -> str:
    """The resource's `id`, refused (naming `where`, never the value) unless it is a FHIR id."""
    value = resource.get("id")
    if not isinstance(value, str) or not FHIR_ID.fullmatch(value):
        raise InvalidDocument(
            f"{where}: {resource.get('resourceType')}.id must be a FHIR id (1 to 64 letters, "
            "digits, '-' or '.')"
        )
    return value


def patient_references(resource: dict[str, Any]) -> list[str]:
    """Every `Patient/<id>` reference anywhere in a resource (version suffixes removed)."""
    found: list[str] = []
    stack: list[Any] = [resource]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("reference")
            if isinstance(ref, str) and ref.startswith("Patient/"):
                found.append(ref.split("/_history/")[0])
            stack.extend(v for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, dict | list))
    return found
