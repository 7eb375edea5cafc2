"""The delivery run: gather what is owed, render where it goes, upload it, write the manifests,
record what happened.

    gather    -> claim owed deliveries from the ledger (IDs only), a page at a time; the run
                 goes on for updates that arrived while it sent (up to `FOLLOW_UPS` pages),
                 and, with `linger_seconds`, for those that arrive soon after; first, it
                 resumes the waiting destinations whose blocks were fixed, and those down
                 that a probe reaches (`flows.waiting`)
    render    -> per destination: give each delivery its path, once; a bad value fails only
                 it; a destination whose block cannot be used has its deliveries parked, and
                 no run claims them for a while (`destination_health`)
    upload    -> per destination, a lane per connection (`flows.engine`); each batch writes its
                 outcomes to the ledger as it ends, so a crash loses nothing
    manifests -> last, one per destination and project delivered to (and any an earlier run
                 could not write)
    record    -> the run's summary: a table artifact, an event per failing destination, a red
                 run when anything new failed; a destination failing `down_after_runs` runs in
                 a row is down, skipped by runs until a probe reaches it

Tasks carry delivery IDs, destination names and counts. Document content is read inside the
upload task, one document at a time, and never becomes a parameter, result, log or artifact.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run, task_run
from prefect.states import Completed, Failed, State
from prefect.task_runners import TaskRunner

from patient_delivery import destination_health, ledger
from patient_delivery.blocks import problem
from patient_delivery.documents import DataType
from patient_delivery.flows import engine, lag, reporting, runtime, waiting
from patient_delivery.flows.engine import Lane, Run, RunLimits
from patient_delivery.flows.parameters import NotGiven
from patient_delivery.flows.reporting import BatchReport, Progress, RunSummary, WaveReports
from patient_delivery.ingest import check_scope
from patient_delivery.ledger import RenderResult, WorkFilter
from patient_delivery.store import Store, open_store, release_connections

FOLLOW_UPS = 3
"""Times a run goes on for updates that arrived while it was sending its last page: a burst
goes in the run it started, and a steady stream still lets runs end (and the next start)."""

LINGER_POLL_SECONDS = 1.0
"""How often a lingering run asks the ledger whether something new is owed (one count)."""

LINGER_LIMIT_SECONDS = 600.0
"""A run lingers no longer than this after it started: a steady stream of updates still lets
runs end, and a run that would wait past its timeout does not."""

PAGE_SIZE = 5_000
"""Deliveries claimed per gather by default: the flow holds this many IDs at most, whatever the
backlog. Runs that share a backlog (several workers) take turns a page at a time."""


def _upload_name() -> str:
    """`upload sftp-destination/acme x 4 lanes`, or how many destinations the wave serves."""
    lanes = task_run.parameters.get("lanes") or []
    what = _destinations({ref for ref, _ in lanes})
    return f"upload {what} x {len(lanes)} lane{'s' * (len(lanes) != 1)}"


def _render_name() -> str:
    return f"render {_destinations(task_run.parameters.get('claimed') or {})}"


def _destinations(references: Collection[str]) -> str:
    """The one destination's reference, or how many there are."""
    return next(iter(references)) if len(references) == 1 else f"{len(references)} destinations"


@task(name="gather")
def gather(claimant: str, work: WorkFilter, limit: int) -> dict[str, list[int]]:
    """Claim up to `limit` owed deliveries for this run; IDs by destination."""
    store = open_store()
    _release_finished_runs(store, claimant)
    return ledger.claim(store, claimant, work, limit=limit)


@dataclass
class Rendered:
    """What render hands to upload: the deliveries ready to send, and how many lanes to use."""

    result: RenderResult
    max_connections: int = 1
    parked: tuple[str, int] | None = None
    """Why this destination's block cannot be used, and how many deliveries wait for it."""


@task(name="render", task_run_name=_render_name)
def render(run: Run, claimed: dict[str, list[int]]) -> dict[str, Rendered]:
    """Give each claimed delivery of the page its path (kept across retries), every destination
    in one transaction; the page's blocks are read together. A missing or invalid block, or an
    unsafe value, fails only its own deliveries, with the reason."""
    store = open_store()
    destinations = run.destinations(claimed)
    pages: dict[str, Rendered] = {}
    templates = {}
    for ref, destination in destinations.items():
        if isinstance(destination, Exception):  # parked: no run claims them for a while
            reason = problem(ref, destination)
            destination_health.park(store, ref, reason)  # first, so no other run takes them
            parked = ledger.park_claimed(store, run.id, claimed[ref], reason)
            get_run_logger().error("%s; %d deliveries parked", reason, parked)
            pages[ref] = Rendered(RenderResult(), parked=(reason, parked))
        else:
            templates[ref] = (claimed[ref], destination.render_path)
    for ref, result in ledger.render_many(store, run.id, templates).items():
        for reason, count in result.failed.items():
            get_run_logger().warning("%s: %d deliveries failed: %s", ref, count, reason)
        pages[ref] = Rendered(result, destinations[ref].max_connections)  # type: ignore[union-attr]
    return pages


@task(name="upload", task_run_name=_upload_name)
def upload(run: Run, lanes: list[Lane], batch_size: int) -> list[BatchReport] | State:
    """Send a wave of lanes, to one destination or many. A wave with failed sends ends Failed
    (red in the UI) with one ERROR line per failing destination (counts and reasons, never
    content), its reports still handed to the run."""
    reports = WaveReports(run.send(lanes, batch_size))
    wave = RunSummary(run.id)
    for report in reports:
        wave.add(report)
    failing = [r for r in wave.destinations.values() if r.failed]
    for report in failing:
        get_run_logger().error("%s: %d deliveries failed: %s", report.destination,
                               report.failed, report.reasons_text())  # fmt: skip
    if failing:
        failed = sum(r.failed for r in failing)
        names = ", ".join(r.destination for r in failing)
        return Failed(message=f"{failed} deliveries failed (to {names})", data=reports)
    return reports


@task(name="manifests")
def write_manifests(run: Run) -> dict[str, str]:
    """Write a manifest to each destination the run delivered to, once every upload has
    ended; the destinations whose manifest could not be written."""
    failed = run.write_manifests()
    for destination, why in failed.items():
        get_run_logger().error("%s: manifest not written: %s", destination, why)
    return failed


@task(name="record")
def record(summary: RunSummary) -> None:
    """Publish the run's summary; announce each destination with failures or an unusable block
    (counts only); note which destinations are failing, down or back; publish how far behind
    its destinations are."""
    reporting.publish(summary)
    if summary.failed or summary.parked:
        reporting.announce_failing_destinations(summary)
    reports = summary.destinations.values()
    failing_at = {r.destination: r.reasons_text() for r in reports if r.destination_failing}
    delivered_to = [r.destination for r in reports if r.delivered]
    noted = destination_health.note(open_store(), summary.flow_run_id, delivered_to, failing_at)
    reporting.announce_health(noted)
    for destination in noted.down:  # its reason stands in the wave's ERROR line
        get_run_logger().warning("%s is down: runs skip it until a probe reaches it", destination)
    if noted.back:
        get_run_logger().info("back: %s", ", ".join(noted.back))
    lag.publish([*summary.destinations, *summary.down, *summary.waiting])
    get_run_logger().info(
        "run finished: %d delivered, %d failed, to %d destination(s)%s",
        summary.delivered, summary.failed, len(summary.destinations), summary.parked_note(),
    )  # fmt: skip


def _run_name() -> str:
    return reporting.run_name(_describe_run)


def _describe_run() -> str:
    parameters = flow_run.parameters or {}
    scope = parameters.get("project") or "all-projects"
    if parameters.get("destination"):
        scope += " to " + ",".join(parameters["destination"])
    return f"deliver {scope}"


@flow(name="deliver-updates", flow_run_name=_run_name, task_runner=runtime.task_runner(),
      timeout_seconds=runtime.run_timeout(), validate_parameters=True)  # fmt: skip
async def deliver_updates(
    project: str | NotGiven = None,
    destination: list[str] | NotGiven = None,
    patient: list[str] | NotGiven = None,
    data_type: list[DataType] | NotGiven = None,
    batch_size: int = 100,
    max_documents: int | NotGiven = None,
    page_size: int = PAGE_SIZE,
    max_sessions: int = 32,
    linger_seconds: float = 0.0,
) -> RunSummary | State:
    """Deliver every owed document: new versions, earlier failures, and crashed runs' leftovers.

    Args:
        project: Only this project's deliveries (its projectId); empty for every project.
        destination: Only these destinations, as block references (`sftp-destination/acme`).
        patient: Only these patients (healthexPatientIds).
        data_type: Only these data types: ccda, fhir.
        batch_size: Documents whose outcomes are written to the ledger in one transaction.
        max_documents: Most documents to send in this run; the rest wait for the next run.
        page_size: Deliveries claimed at a time. Smaller pages share a backlog more evenly
            between runs working at once.
        max_sessions: Most destination sessions open at once over every destination (an
            SFTP session is one SSH connection, an S3 session one upload lane); each
            destination's own `max_connections` bounds its share. Local folders open none.
        linger_seconds: After the last page, wait this long for more updates and deliver
            them in this run (again after each). The trigger's deployment sets it: a run asked
            for while this one goes is cancelled, so this run takes its updates.
    """
    work = WorkFilter(
        project_id=project,
        destinations=tuple(destination or ()),
        patient_ids=tuple(patient or ()),
        data_types=tuple(data_type or ()),
    )
    sizes = Sizes(batch_size, page_size, RunLimits(max_sessions), linger_seconds)
    try:
        return await runtime.in_thread_with_one_client(lambda: _deliver(work, sizes, max_documents))
    finally:
        release_connections()  # other runs may be waiting for them


@dataclass(frozen=True)
class Sizes:
    """How a run cuts its work: documents per ledger batch, deliveries claimed per page, and
    what it may do at once."""

    batch: int
    page: int
    limits: RunLimits
    linger: float = 0.0
    """Seconds to wait after the last page for more updates (0: end at once)."""


def _deliver(work: WorkFilter, sizes: Sizes, max_documents: int | None) -> RunSummary | State:
    runtime.freeze_startup_heap()
    check_scope(
        open_store(),
        project_id=work.project_id,
        patient_ids=work.patient_ids,
        destinations=work.destinations,
    )  # refused before anything runs
    claimant = str(flow_run.id or uuid.uuid4())
    failing_before = destination_health.failing(open_store(), claimant)
    still = waiting.resume_what_can_go(open_store(), work)
    summary = RunSummary(flow_run_id=claimant, failing_before=failing_before,
                         waiting=still.unusable, down=still.down)  # fmt: skip
    owed = ledger.count_owed(open_store(), claimant, work)
    progress = Progress(min(owed, max_documents) if max_documents is not None else owed)
    left = max_documents if max_documents is not None else float("inf")
    follow_ups = FOLLOW_UPS
    started = time.monotonic()
    with engine.run(claimant, sizes.limits) as run:
        while left > 0:
            limit = int(min(max(1, sizes.page), left))
            claimed = gather(claimant, work, limit)
            count = sum(len(ids) for ids in claimed.values())
            if count:
                _deliver_page(run, claimed, sizes, summary, progress)
            left -= count
            if count < limit:  # a short page: nothing more was owed when it was claimed
                arrived = ledger.count_owed(open_store(), claimant, work) if count else 0
                if arrived and follow_ups:
                    follow_ups -= 1  # updates that arrived while the page was sent go with it
                else:
                    arrived = _linger(claimant, work, sizes.linger, started)
                    if not arrived:
                        break
                progress.grow(arrived)
        # Last, when every file a manifest lists has landed; also for an earlier run's files
        # whose manifest could not be written.
        if run.manifests_owed(work.project_id, work.destinations):
            summary.manifests_failed = write_manifests(run)
    progress.update(summary.done, final=True)
    record(summary)
    if summary.new_trouble():  # a red run in the UI, and the "run failed" alert
        return Failed(message=summary.headline(), data=summary)
    if summary.failed:  # only destinations failing before this run: their own alert tells
        return Completed(message=summary.still_failing_note(), data=summary)
    if summary.down or summary.waiting:  # the run's message names what it did not claim
        return Completed(message=summary.headline(), data=summary)
    return summary


def _linger(claimant: str, work: WorkFilter, seconds: float, started: float) -> int:
    """Wait up to `seconds` for deliveries to become owed; how many did (0: none came, or the
    run is past `LINGER_LIMIT_SECONDS`)."""
    deadline = min(time.monotonic() + seconds, started + LINGER_LIMIT_SECONDS)
    while time.monotonic() < deadline:
        time.sleep(min(LINGER_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        arrived = ledger.count_owed(open_store(), claimant, work)
        if arrived:
            return arrived
    return 0


def _deliver_page(
    run: Run,
    claimed: dict[str, list[int]],
    sizes: Sizes,
    summary: RunSummary,
    progress: Progress,
) -> None:
    """Render a claimed page, then upload it in waves, each wave's lanes interleaved across
    its destinations."""
    started = time.perf_counter()
    pages = render(run, claimed)
    for ref, page in pages.items():
        unrendered = page.result.failed.total()
        summary.add(BatchReport(ref, failed=unrendered, unrendered=unrendered,
                                reasons=page.result.failed))  # fmt: skip
        if page.parked:
            reason, count = page.parked
            summary.add(BatchReport(ref, parked=count, reasons=Counter({reason: count})))
    ready = {ref: (page.result.ready, page.max_connections) for ref, page in pages.items()}
    uploads = [upload.submit(run, lanes, sizes.batch) for lanes in run.plan(ready, sizes.batch)]
    for future in uploads:
        reports = future.result(raise_on_failure=False)  # a Failed wave still reports
        if isinstance(reports, BaseException):  # the upload itself broke
            raise reports
        for report in reports:
            summary.add(report)
        progress.update(summary.done)
    get_run_logger().info(
        "page of %d deliveries to %d destination(s) in %.2f s: %d delivered, %d failed so far",
        sum(map(len, claimed.values())), len(claimed), time.perf_counter() - started,
        summary.delivered, summary.failed,
    )  # fmt: skip


def _release_finished_runs(store: Store, claimant: str) -> None:
    """Take over at once what crashed or cancelled runs had claimed, instead of waiting out
    their leases: Prefect knows which runs are over."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    others = [c for c in ledger.claimants(store) if c != claimant]
    if not others:
        return
    with get_client(sync_client=True) as client:
        for other in others:
            try:
                state = client.read_flow_run(uuid.UUID(other)).state
            except (ValueError, ObjectNotFound):
                continue  # not a Prefect run of this server: its lease decides
            if state is not None and state.is_final():
                released = ledger.release(store, other)
                get_run_logger().warning(
                    "run %s ended %s holding %d deliveries; taking them over",
                    other, state.type.value, released,
                )  # fmt: skip


def deliver_state(runner: TaskRunner | None = None, **parameters: object) -> State:  # type: ignore[type-arg]
    """Run `deliver_updates` (on `runner`, if given) from synchronous code; its final state."""
    run = deliver_updates if runner is None else deliver_updates.with_options(task_runner=runner)
    return runtime.run_sync(run(**parameters, return_state=True))  # type: ignore[call-overload]


def deliver(runner: TaskRunner | None = None, **parameters: object) -> RunSummary:  # type: ignore[type-arg]
    """Run `deliver_updates` (on `runner`, if given) and return its summary, whether or not
    some deliveries failed."""
    result = deliver_state(runner, **parameters).result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    return result
