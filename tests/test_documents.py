"""Validation: every real document is accepted; malformed or hostile ones are refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patient_delivery.documents import InvalidDocument, check_document
from patient_delivery.importers import fhir_bundle

CCDA_MINIMAL = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>t</title></ClinicalDocument>'


def _bundle(patient_id: str = "p1", *extra: dict) -> bytes:
    return fhir_bundle({"resourceType": "Patient", "id": patient_id}, extra)


def test_all_real_ccda_documents_are_accepted(fixtures_dir: Path) -> None:
    files = sorted((fixtures_dir / "ccda").glob("*.xml"))
    assert len(files) == 12
    for path in files:
        checked = check_document("ccda", path.read_bytes())
        assert checked.size == path.stat().st_size


def test_checked_document_carries_sha256_and_size() -> None:
    import hashlib

    checked = check_document("ccda", CCDA_MINIMAL)
    assert checked.sha256 == hashlib.sha256(CCDA_MINIMAL).hexdigest()
    assert checked.size == len(CCDA_MINIMAL)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"<ClinicalDocument xmlns='urn:hl7-org:v3'><title></ClinicalDocument>", "line 1, column"),
        (b"not xml at all", "not well-formed XML at line 1"),
        (
            b"<ClinicalDocument><title/></ClinicalDocument>",
            "'ClinicalDocument' has no namespace; C-CDA needs xmlns=\"urn:hl7-org:v3\"",
        ),
        (
            b"<ClinicalDocument xmlns='urn:other'><title/></ClinicalDocument>",
            "expected 'ClinicalDocument' in namespace",
        ),
        (b"<Other xmlns='urn:hl7-org:v3'/>", "root element is '{urn:hl7-org:v3}Other'"),
        (b"", "empty"),
    ],
)
def test_malformed_ccda_is_refused_with_position(content: bytes, expected: str) -> None:
    with pytest.raises(InvalidDocument, match="ccda") as error:
        check_document("ccda", content)
    assert expected in str(error.value)


@pytest.mark.bad_input
def test_error_message_does_not_quote_document_text() -> None:
    secret = b"Jane Canary-Doe has HIV"
    content = (
        b"<ClinicalDocument xmlns='urn:hl7-org:v3'><name>" + secret + b"</nme></ClinicalDocument>"
    )
    with pytest.raises(InvalidDocument) as error:
        check_document("ccda", content)
    assert "Canary" not in str(error.value)


@pytest.mark.bad_input
def test_entity_expansion_bomb_is_refused_without_expanding() -> None:
    bomb = b"""<?xml version="1.0"?>
<!DOCTYPE ClinicalDocument [
 <!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">
 <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
 <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
 <!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
 <!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;">
 <!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">
]>
<ClinicalDocument xmlns="urn:hl7-org:v3"><title>&f;</title></ClinicalDocument>"""
    # libxml2 stops at the amplification limit, or the DOCTYPE check refuses it; either way
    # nothing is expanded and the message says why.
    with pytest.raises(InvalidDocument, match=r"DOCTYPE|entity amplification"):
        check_document("ccda", bomb)


@pytest.mark.bad_input
def test_external_entity_is_refused_and_never_read(tmp_path: Path) -> None:
    target = tmp_path / "secret.txt"
    target.write_text("should never be read")
    xxe = (
        f'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file://{target}">]>'
        '<ClinicalDocument xmlns="urn:hl7-org:v3"><title>&x;</title></ClinicalDocument>'
    ).encode()
    before = target.stat().st_atime_ns
    with pytest.raises(InvalidDocument, match="DOCTYPE") as error:
        check_document("ccda", xxe)
    assert "should never be read" not in str(error.value)
    assert target.stat().st_atime_ns == before


def test_fhir_bundle_of_one_patient_is_accepted_and_returns_its_id() -> None:
    condition = {"resourceType": "Condition", "subject": {"reference": "Patient/p1"}}
    assert check_document("fhir", _bundle("p1", condition)).fhir_patient_id == "p1"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"resourceType": "Bundle", "entry": [', "not valid JSON at line 1, column"),
        (b'{"resourceType": "Patient", "id": "p1"}', "not a FHIR Bundle"),
        (b"[1, 2]", "not a FHIR Bundle"),
        (b'{"resourceType": "Bundle", "entry": []}', "exactly one Patient"),
        (b'{"resourceType": "Bundle", "entry": [{"resource": {"id": "x"}}]}', "no resource"),
        (b'{"resourceType": "Bundle", "entry": {}}', "must be a list"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_malformed_fhir_is_refused(content: bytes, expected: str) -> None:
    with pytest.raises(InvalidDocument) as error:
        check_document("fhir", content)
    assert expected in str(error.value)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("value", "past"),
    [
        (b"NaN", 0),
        (b"Infinity", 0),
        (b"-Infinity", 1),  # named after the sign
        (b"1e400", 0),
        (b'"\\ud800"', 1),  # a lone surrogate, escaped: named at the string's first character
    ],
)
def test_json_the_read_path_cannot_read_is_refused_at_ingest(value: bytes, past: int) -> None:
    """Ingest and the read path (orjson) agree: what one refuses, the other never stores."""
    import orjson

    content = _bundle("p1").replace(b'"id":"p1"', b'"id":"p1","x":' + value, 1)
    column = content.index(b'"x":') + len(b'"x":') + 1 + past
    with pytest.raises(InvalidDocument) as error:
        check_document("fhir", content)
    assert f"not valid JSON at line 1, column {column}:" in str(error.value)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(content)


@pytest.mark.bad_input
@pytest.mark.security
@pytest.mark.parametrize(
    ("change", "named"),
    [
        (b'"id":"p1","id":"p2"', "the same key twice"),  # first-wins readers see another patient
        (b'"id":"p1","x":{"a":1,"a":2}', "the same key twice"),
        (b'"id":"p1","x":18446744073709551616', "an integer beyond 64 bits"),
        (b'"id":"p1","x":-9223372036854775809', "an integer beyond 64 bits"),
    ],
)
def test_json_that_readers_would_read_differently_is_refused_at_ingest(
    change: bytes, named: str
) -> None:
    content = _bundle("p1").replace(b'"id":"p1"', change, 1)
    with pytest.raises(InvalidDocument, match=named) as error:
        check_document("fhir", content)
    assert "p2" not in str(error.value)  # never the document's text


def test_integers_up_to_64_bits_are_kept_exactly() -> None:
    import orjson

    for value in (2**53 + 1, 2**63 - 1, 2**64 - 1, -(2**63)):
        content = _bundle("p1").replace(b'"id":"p1"', b'"id":"p1","x":%d' % value, 1)
        check_document("fhir", content)
        assert orjson.loads(content)["entry"][0]["resource"]["x"] == value  # as the read path


@pytest.mark.bad_input
@pytest.mark.parametrize("patient_id", [b'{"a":"hx_other"}', b"42", b'""', b'"a/b"', b"null"])
def test_a_patient_id_that_is_not_a_fhir_id_is_refused(patient_id: bytes) -> None:
    content = _bundle("p1").replace(b'"id":"p1"', b'"id":' + patient_id, 1)
    with pytest.raises(InvalidDocument, match=r"Patient\.id must be a FHIR id"):
        check_document("fhir", content)


@pytest.mark.bad_input
def test_json_nested_deeper_than_the_stated_limit_is_refused_without_a_crash() -> None:
    from patient_delivery.documents import MAX_JSON_DEPTH

    deep = b'{"resourceType":"Bundle","entry":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(InvalidDocument, match=r"not valid JSON at line 1, column .*depth"):
        check_document("fhir", deep)
    nested = b"[" * (MAX_JSON_DEPTH - 10) + b"]" * (MAX_JSON_DEPTH - 10)
    with pytest.raises(InvalidDocument, match="not a FHIR Bundle"):  # parsed: within the limit
        check_document("fhir", nested)


@pytest.mark.bad_input
def test_fhir_bundle_with_another_patients_resource_is_refused() -> None:
    foreign = {"resourceType": "Condition", "subject": {"reference": "Patient/someone-else"}}
    with pytest.raises(InvalidDocument, match=r"entry\[1\] refers to a different patient"):
        check_document("fhir", _bundle("p1", foreign))


@pytest.mark.bad_input
def test_two_patients_in_one_bundle_is_refused() -> None:
    content = json.dumps(
        {
            "resourceType": "Bundle",
            "entry": [{"resource": {"resourceType": "Patient", "id": i}} for i in ("a", "b")],
        }
    ).encode()
    with pytest.raises(InvalidDocument, match="exactly one Patient"):
        check_document("fhir", content)


@pytest.mark.bad_input
def test_unknown_data_type_and_oversized_documents_are_refused() -> None:
    with pytest.raises(InvalidDocument, match="unknown data type"):
        check_document("pdf", b"%PDF")
    from patient_delivery import documents

    too_big = b" " * (documents.MAX_DOCUMENT_BYTES + 1)
    with pytest.raises(InvalidDocument, match="limit"):
        check_document("ccda", too_big)
