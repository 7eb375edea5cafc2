"""`patient-delivery`: the command line over the core, the destination blocks and the flows.

Each command group is a module; commands that need Prefect import it when they run, so the
store-only commands stay fast.
"""

from patient_delivery.cli import alerts, demo, destinations, ingest, ledger, pull, runs
from patient_delivery.cli.common import app

__all__ = ["alerts", "app", "demo", "destinations", "ingest", "ledger", "main", "pull", "runs"]


def main() -> None:
    """The console script's entry point."""
    app()
