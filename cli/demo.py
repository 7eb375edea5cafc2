"""The demo: the whole job on the embedded default (SQLite store, local folder, local Prefect)."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from sqlalchemy import select

from patient_delivery import ingest
from patient_delivery.cli.common import app, console, ready, start_prefect
from patient_delivery.cli.runs import print_summary
from patient_delivery.ledger import read_content
from patient_delivery.seed import seed_project
from patient_delivery.settings import get_settings
from patient_delivery.store import Store, open_store
from patient_delivery.store.models import DocumentVersion, Organization, Share

if TYPE_CHECKING:
    from patient_delivery.prefect_setup import LocalApi

ORG = "demo-org"
PROJECTS = ("cardiology-study", "diabetes-registry")
DESTINATION_NAME = "demo-folder"
DESTINATION = f"local-destination/{DESTINATION_NAME}"


@app.command()
def demo(
    patients: Annotated[int, typer.Option(min=1, help="Patients per project on first run")] = 20,
    update: Annotated[
        int, typer.Option(min=0, help="Change this many patients' FHIR bundles before delivering")
    ] = 0,
) -> None:
    """The main job on the embedded default: seed a store, deliver to a local folder, summarize.

    Run again, it delivers nothing new; with --update N, only the N changed documents.
    """
    api = start_prefect()
    run_demo(get_settings().home, patients, update, api)


def run_demo(home: Path, patients: int, update: int, api: LocalApi | None = None) -> None:
    """Seed the demo organization on first use, deliver what is owed, print the summary; the
    temporary Prefect API (if any) starts meanwhile and is waited for before its first use."""
    from patient_delivery.blocks.local import LocalDestination
    from patient_delivery.flows.deliver import deliver
    from patient_delivery.flows.runtime import send_pending_events

    started = time.perf_counter()
    store = open_store()
    folder = (home / "deliveries").resolve()
    with store.session() as session:
        first_run = session.get(Organization, ORG) is None
    if first_run:
        console.print(f"seeding {patients} synthetic patients into each of {', '.join(PROJECTS)}")
        ingest.add_organization(store, "Demo Health Research", ORG)
        for project in PROJECTS:
            ingest.add_project(store, ORG, project.replace("-", " ").title(), project)
            seed_project(store, project, patients)
    ready(api)
    # The block lives in Prefect; (re)save it so the demo also works after Prefect's home is reset.
    LocalDestination(root=folder).save(DESTINATION_NAME, overwrite=True)
    if first_run:
        for project in PROJECTS:
            ingest.subscribe(store, project, DESTINATION)
    if update:
        changed = _update_fhir_bundles(store, PROJECTS[0], update)
        console.print(f"changed the FHIR bundle of {changed} patient(s) in {PROJECTS[0]}")
    summary = deliver()
    send_pending_events()
    print_summary(summary)
    found = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    manifests = sum(1 for p in found if "_manifests" in p.parts)
    console.print(
        f"delivered {summary.delivered} document(s) this run; in {folder}: "
        f"{len(found) - manifests} document(s) and {manifests} manifest(s) "
        f"({time.perf_counter() - started:.1f} s)"
    )
    if summary.delivered == 0:
        console.print(
            "nothing was owed: every newest document had already been delivered. "
            "Try `patient-delivery demo --update 1`."
        )
    console.print("the ledger: `patient-delivery deliveries`")


def _update_fhir_bundles(store: Store, project_id: str, count: int) -> int:
    """Add a fresh observation to the newest FHIR bundle of `count` patients of a project."""
    with store.session() as session:
        patient_ids = session.scalars(
            select(Share.patient_id)
            .where(Share.project_id == project_id)
            .order_by(Share.external_id)
            .limit(count)
        ).all()
    for patient_id in patient_ids:
        with store.session() as session:
            newest = session.scalars(
                select(DocumentVersion.id)
                .where(
                    DocumentVersion.patient_id == patient_id, DocumentVersion.data_type == "fhir"
                )
                .order_by(DocumentVersion.version.desc())
                .limit(1)
            ).one()
        bundle = json.loads(read_content(store, newest))
        patient = bundle["entry"][0]["resource"]
        bundle["entry"].append(
            {
                "resource": {
                    "resourceType": "Observation",
                    "id": str(uuid.uuid4()),
                    "status": "final",
                    "code": {"text": "Heart rate", "coding": [{"code": "8867-4"}]},
                    "subject": {"reference": f"Patient/{patient['id']}"},
                    "effectiveDateTime": datetime.now(UTC).isoformat(),
                    "valueQuantity": {"value": 72, "unit": "/min"},
                }
            }
        )
        ingest.put_document(store, patient_id, "fhir", json.dumps(bundle).encode())
    return len(patient_ids)
