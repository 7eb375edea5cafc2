"""A FHIR Bulk Data export as a Prefect flow: a batch job with progress and run history.

    write -> the export's NDJSON files, patient after patient (`pull.bulk_export`), with a
             progress artifact; the export is then complete and its manifest served

`ExportRunner` starts one flow run per export asked of `serve`, at most
`PATIENT_DELIVERY_EXPORTS_AT_ONCE` at a time, organizations in turn, in the server's process.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from patient_delivery.flows import runtime
from patient_delivery.pull import bulk_export as exports
from patient_delivery.pull.export_queue import ExportQueue
from patient_delivery.settings import get_settings
from patient_delivery.store import open_store

PROGRESS_KEY = "export-progress"


@flow(name="bulk-export", flow_run_name="bulk export {export_id:.8}",
      timeout_seconds=runtime.run_timeout(), validate_parameters=True)  # fmt: skip
def bulk_export(export_id: str) -> str:
    """Write a FHIR bulk export's files.

    Args:
        export_id: The export, as its status URL names it.
    """
    files = write(export_id)
    summary = ", ".join(f"{f.count} {f.type}" for f in files) or "nothing to export"
    get_run_logger().info("export %s: %s", export_id[:8], summary)
    return summary


@task(name="write")
def write(export_id: str) -> list[exports.ExportFile]:
    """The export's NDJSON files, with a progress artifact (patients written of the total)."""
    artifact = runtime.create_progress(0.0, PROGRESS_KEY, "patients exported")

    def progress(done: int, total: int) -> None:
        runtime.update_progress(artifact, 100.0 * done / max(total, 1))

    return exports.write_export(open_store(), export_id, progress)


class ExportRunner:
    """Starts each export's flow run in a thread of this process, a few at a time, the
    organizations in turn (`ExportQueue`)."""

    def __init__(self) -> None:
        self.queue = ExportQueue(open_store(), self._run, get_settings().exports_at_once)

    def start(self, export_id: str) -> None:
        self.queue.start(export_id)

    @staticmethod
    def _run(export_id: str) -> None:
        """The export's flow run; an export it could not finish is marked failed (its status
        URL says so) rather than left waiting."""
        try:
            state = bulk_export(export_id, return_state=True)
            reason = None if state.is_completed() else f"the export's run ended {state.name}"
        except Exception as exc:  # the run could not even start (Prefect unreachable)
            reason = f"the export's run could not start ({type(exc).__name__})"
        if reason is not None:
            exports.give_up(open_store(), export_id, reason)
