"""Synthetic patients: realistic-looking C-CDA documents and FHIR bundles for demos and benchmarks.

Sizes follow real documents (a C-CDA of tens to hundreds of KB, a FHIR bundle of a few hundred
KB) and content is built from string templates so that 100,000 patients can be made in
minutes. Everything is fictional and deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from xml.sax.saxutils import escape

GIVEN = [
    "Ana",
    "Ben",
    "Chloe",
    "Dmitri",
    "Esther",
    "Farah",
    "Gus",
    "Hana",
    "Ivan",
    "Jun",
    "Kofi",
    "Lena",
    "Mateo",
    "Nia",
    "Omar",
    "Priya",
]
FAMILY = [
    "Okafor",
    "Lindqvist",
    "Moreau",
    "Tanaka",
    "Silva",
    "Novak",
    "Haddad",
    "Kowalski",
    "Nguyen",
    "Fischer",
    "Rossi",
]
CONDITIONS = [
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertensive disorder"),
    ("195967001", "Asthma"),
    ("55822004", "Hyperlipidemia"),
    ("40055000", "Chronic sinusitis"),
    ("235595009", "Gastroesophageal reflux disease"),
    ("35489007", "Depressive disorder"),
    ("69896004", "Rheumatoid arthritis"),
]
MEDICATIONS = [
    ("860975", "metformin hydrochloride 500 MG Oral Tablet"),
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("895994", "fluticasone propionate 0.044 MG/ACTUAT Inhaler"),
    ("259255", "atorvastatin 80 MG Oral Tablet"),
    ("197361", "amlodipine 5 MG Oral Tablet"),
    ("308136", "amlodipine 2.5 MG Oral Tablet"),
]
OBSERVATIONS = [
    ("8302-2", "Body Height", "cm", 150, 195),
    ("29463-7", "Body Weight", "kg", 45, 120),
    ("8867-4", "Heart rate", "/min", 55, 100),
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 100, 160),
    ("2339-0", "Glucose", "mg/dL", 70, 180),
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 140, 260),
]


@dataclass(frozen=True)
class SyntheticPatient:
    fhir_id: str
    given: str
    family: str
    gender: str
    birth_date: date
    ccda: bytes
    fhir: bytes


def _when(rng: random.Random, start: datetime, days: int) -> datetime:
    return start + timedelta(days=rng.randrange(days), minutes=rng.randrange(1440))


def make_patient(rng: random.Random, size_scale: float = 1.0) -> SyntheticPatient:
    """One fictional patient with a C-CDA (~100 KB) and a FHIR bundle (~200 KB) at scale 1."""
    fhir_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    given, family = rng.choice(GIVEN), rng.choice(FAMILY)
    gender = rng.choice(["female", "male"])
    birth = date(1940, 1, 1) + timedelta(days=rng.randrange(80 * 365))
    encounters = max(1, int(rng.randint(28, 48) * size_scale))
    start = datetime(2010, 1, 1, tzinfo=UTC)
    visits = sorted(_when(rng, start, 5000) for _ in range(encounters))
    conditions = rng.sample(CONDITIONS, k=rng.randint(1, 4))
    meds = rng.sample(MEDICATIONS, k=rng.randint(1, 4))
    ccda = _ccda(rng, fhir_id, given, family, gender, birth, visits, conditions, meds)
    fhir = _fhir(rng, fhir_id, given, family, gender, birth, visits, conditions, meds)
    return SyntheticPatient(fhir_id, given, family, gender, birth, ccda, fhir)


def _ccda(rng, fhir_id, given, family, gender, birth, visits, conditions, meds) -> bytes:  # type: ignore[no-untyped-def]
    sex = "F" if gender == "female" else "M"
    rows, entries = [], []
    for visit in visits:
        for code, name, unit, low, high in OBSERVATIONS:
            value = rng.randint(low, high)
            moment = visit.strftime("%Y%m%d%H%M%S")
            rows.append(f"<tr><td>{name}</td><td>{value} {escape(unit)}</td><td>{moment}</td></tr>")
            entries.append(
                '<entry typeCode="DRIV"><observation classCode="OBS" moodCode="EVN">'
                '<templateId root="2.16.840.1.113883.10.20.22.4.2" extension="2015-08-01"/>'
                f'<id root="{uuid.UUID(int=rng.getrandbits(128), version=4)}"/>'
                f'<code code="{code}" codeSystem="2.16.840.1.113883.6.1" displayName="{name}"/>'
                f'<statusCode code="completed"/><effectiveTime value="{moment}"/>'
                f'<value xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="PQ" '
                f'value="{value}" unit="{escape(unit)}"/></observation></entry>'
            )
    problems = "".join(
        '<entry><act classCode="ACT" moodCode="EVN"><entryRelationship typeCode="SUBJ">'
        f'<observation classCode="OBS" moodCode="EVN"><value xmlns:xsi="http://www.w3.org/2001/'
        f'XMLSchema-instance" xsi:type="CD" code="{code}" codeSystem="2.16.840.1.113883.6.96" '
        f'displayName="{name}"/></observation></entryRelationship></act></entry>'
        for code, name in conditions
    )
    medications = "".join(
        '<entry><substanceAdministration classCode="SBADM" moodCode="INT"><consumable>'
        '<manufacturedProduct><manufacturedMaterial><code code="'
        f'{code}" codeSystem="2.16.840.1.113883.6.88" displayName="{name}"/>'
        "</manufacturedMaterial></manufacturedProduct></consumable></substanceAdministration>"
        "</entry>"
        for code, name in meds
    )
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:sdtc="urn:hl7-org:sdtc">'
        '<realmCode code="US"/><typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>'
        '<templateId root="2.16.840.1.113883.10.20.22.1.2" extension="2015-08-01"/>'
        f'<id root="{uuid.UUID(int=rng.getrandbits(128), version=4)}"/>'
        '<code code="34133-9" codeSystem="2.16.840.1.113883.6.1" '
        'displayName="Summarization of Episode Note"/>'
        f'<title>Continuity of Care Document</title><effectiveTime value="{now}"/>'
        '<confidentialityCode code="N" codeSystem="2.16.840.1.113883.5.25"/>'
        f'<recordTarget><patientRole><id root="2.16.840.1.113883.19.5" extension="{fhir_id}"/>'
        f"<patient><name><given>{given}</given><family>{family}</family></name>"
        f'<administrativeGenderCode code="{sex}" codeSystem="2.16.840.1.113883.5.1"/>'
        f'<birthTime value="{birth:%Y%m%d}"/></patient></patientRole></recordTarget>'
        "<component><structuredBody>"
        '<component><section><code code="11450-4" codeSystem="2.16.840.1.113883.6.1"/>'
        f"<title>Problems</title>{problems}</section></component>"
        '<component><section><code code="10160-0" codeSystem="2.16.840.1.113883.6.1"/>'
        f"<title>Medications</title>{medications}</section></component>"
        '<component><section><code code="30954-2" codeSystem="2.16.840.1.113883.6.1"/>'
        "<title>Results</title><text><table><thead><tr><th>Test</th><th>Value</th>"
        f"<th>Date</th></tr></thead><tbody>{''.join(rows)}</tbody></table></text>"
        f"{''.join(entries)}</section></component>"
        "</structuredBody></component></ClinicalDocument>\n"
    ).encode()


def _fhir(rng, fhir_id, given, family, gender, birth, visits, conditions, meds) -> bytes:  # type: ignore[no-untyped-def]
    subject = {"reference": f"Patient/{fhir_id}"}
    resources: list[dict] = [
        {
            "resourceType": "Patient",
            "id": fhir_id,
            "name": [{"use": "official", "family": family, "given": [given]}],
            "gender": gender,
            "birthDate": birth.isoformat(),
        }
    ]
    for code, name in conditions:
        resources.append({
            "resourceType": "Condition", "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},  # noqa: E501
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": name}], "text": name},  # noqa: E501
            "subject": subject,
            "onsetDateTime": visits[0].isoformat(),
        })  # fmt: skip
    for code, name in meds:
        resources.append({
            "resourceType": "MedicationRequest", "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),  # noqa: E501
            "status": "active", "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": code, "display": name}], "text": name},  # noqa: E501
            "subject": subject,
            "authoredOn": visits[-1].isoformat(),
        })  # fmt: skip
    for visit in visits:
        encounter_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        resources.append({
            "resourceType": "Encounter", "id": encounter_id, "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003", "display": "Encounter for check up"}]}],  # noqa: E501
            "subject": subject,
            "period": {"start": visit.isoformat(), "end": (visit + timedelta(minutes=30)).isoformat()},  # noqa: E501
        })  # fmt: skip
        for code, name, unit, low, high in OBSERVATIONS:
            resources.append({
                "resourceType": "Observation", "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),  # noqa: E501
                "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],  # noqa: E501
                "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": name}], "text": name},  # noqa: E501
                "subject": subject, "encounter": {"reference": f"Encounter/{encounter_id}"},
                "effectiveDateTime": visit.isoformat(),
                "valueQuantity": {"value": rng.randint(low, high), "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},  # noqa: E501
            })  # fmt: skip
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in resources],
    }
    return json.dumps(bundle, separators=(",", ":")).encode()
