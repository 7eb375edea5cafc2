"""Seeding: fill a project with synthetic patients through the same checks as real ingest."""

from __future__ import annotations

import random
from collections.abc import Callable

from patient_delivery.documents import check_document
from patient_delivery.events import emit_data_updated
from patient_delivery.ingest import create_shared_patient, put_checked
from patient_delivery.store import Store
from patient_delivery.synthetic import make_patient

CHUNK = 200
"""Patients written per transaction: large enough to amortize commits, small enough to stream."""


def seed_project(
    store: Store,
    project_id: str,
    patients: int,
    seed: int = 0,
    size_scale: float = 1.0,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Add `patients` synthetic patients to a project, each with a ccda and a fhir document.

    Returns their healthexPatientIds. The externalId is `EXT-<n>` so that a demo has readable
    ones; deterministic for a given `seed`. Each document is announced (`patient.data.updated`)
    like any other ingest, after its chunk is committed.
    """
    rng = random.Random(f"{project_id}:{seed}")
    created: list[str] = []
    for start in range(0, patients, CHUNK):
        count = min(CHUNK, patients - start)
        made = [make_patient(rng, size_scale) for _ in range(count)]
        documents = [(check_document("ccda", p.ccda), check_document("fhir", p.fhir)) for p in made]
        stored = []
        with store.session() as session:
            for offset, pair in enumerate(documents):
                external_id = f"EXT-{seed}-{start + offset + 1:06d}"
                patient_id = create_shared_patient(session, project_id, external_id)
                stored += [put_checked(session, patient_id, document) for document in pair]
                created.append(patient_id)
        for result in stored:  # new patients share with this project only; off: a no-op
            emit_data_updated(result.patient_id, result.data_type, result.version, [project_id])
        if progress:
            progress(count)
    return created
