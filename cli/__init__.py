"""`patient-delivery`: the command line over the core, the destination blocks and the flows.

Each command group is a module; commands that need Prefect import it when they run, so the
store-only commands stay fast.
"""

import sys

# Cache the bytecode of what the command imports (Prefect, pandas...) in its environment, also
# where PYTHONDONTWRITEBYTECODE is set: otherwise every command compiles them again from source.
sys.dont_write_bytecode = False

from patient_delivery.cli import alerts, demo, destinations, ingest, ledger, pull, runs  # noqa: E402
from patient_delivery.cli.common import app, fail, warn  # noqa: E402
from patient_delivery.events import sent_together  # noqa: E402

__all__ = ["alerts", "app", "demo", "destinations", "ingest", "ledger", "main", "pull", "runs"]


def main() -> None:
    """The console script's entry point. The command's events have reached Prefect when it
    exits. An unreachable Prefect API is one line, not the traceback of every layer between the
    command and the socket."""
    try:
        with sent_together(on_failure=warn):
            app()
    except Exception as exc:
        reason = _unreachable(exc)
        if reason is None:
            raise
        raise SystemExit(fail(reason).exit_code) from None


def _unreachable(error: BaseException | None) -> str | None:
    """Why the Prefect API could not be reached, if that is what `error` (or what caused it)
    is; None otherwise."""
    import httpx

    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
            from prefect.settings import PREFECT_API_URL

            url = PREFECT_API_URL.value() or "(none set)"
            return f"cannot reach the Prefect API at {url}: {error}"
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None
