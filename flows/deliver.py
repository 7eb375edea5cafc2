"""The delivery run: gather what is owed, render where it goes, upload it, record what happened.

    gather  -> claim owed deliveries from the ledger (IDs only), a page at a time
    render  -> per destination: give each delivery its path, once; a bad value fails only it
    upload  -> per destination, a lane per connection, in parallel, a wave at a time (on
               threads, one task carries a wave's lanes, each taking the wave's next batch when
               it is ready for one; on Dask, each lane is a task with an equal share); each
               batch (at most `batch_size` documents) records its outcomes in the ledger in one
               transaction
    summary -> a table artifact per run: per destination, delivered / failed / skipped / bytes

Tasks carry delivery IDs, destination names and counts. Document content is read inside the
upload task, one document at a time, and never becomes a parameter, result, log or artifact.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import math
import os
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import islice
from typing import TypeVar

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, SyncClientContext
from prefect.events import emit_event
from prefect.runtime import flow_run
from prefect.states import Failed, State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.asyncutils import run_coro_as_sync

from blocks import load_destination
from blocks.base import DeliveryError, DestinationSession, Receipt, Upload
from flows import sessions
from flows.sessions import Lease
from patient_delivery import ledger
from patient_delivery.documents import DataType
from patient_delivery.ledger import Outcome, RenderResult, UploadItem, WorkFilter
from patient_delivery.settings import get_settings
from patient_delivery.store import Store, open_store

T = TypeVar("T")

PAGE_SIZE = 5_000
"""Deliveries claimed per gather by default: the flow holds this many IDs at most, whatever the
backlog. Runs that share a backlog (several workers) take turns a page at a time."""

UPLOAD_ATTEMPTS = 3
"""Tries per document within a run for transient errors; a run after this one tries again."""


@dataclass
class BatchReport:
    """What one upload task did: counts and reasons only."""

    destination: str
    worker: str | None = None
    """host:pid of the process that ran the batch (the flow's own, or a Dask worker)."""
    delivered: int = 0
    failed: int = 0
    skipped: int = 0
    bytes: int = 0
    seconds: float = 0.0
    reasons: Counter[str] = field(default_factory=Counter)

    def absorb(self, other: BatchReport) -> None:
        """Add another report's counts to this one (seconds add up as lane-seconds)."""
        self.delivered += other.delivered
        self.failed += other.failed
        self.skipped += other.skipped
        self.bytes += other.bytes
        self.seconds += other.seconds
        self.reasons.update(other.reasons)


@dataclass
class RunSummary:
    """A delivery run's outcome per destination: what the CLI prints and the artifact shows."""

    flow_run_id: str
    destinations: dict[str, BatchReport] = field(default_factory=dict)
    workers: Counter[str] = field(default_factory=Counter)
    """Documents sent per process (host:pid)."""

    def add(self, report: BatchReport) -> None:
        if report.worker:
            self.workers[report.worker] += report.delivered + report.failed
        self.destinations.setdefault(report.destination, BatchReport(report.destination)).absorb(
            report
        )

    def headline(self) -> str:
        """One line for the run's state message: counts, never content."""
        failing = [r.destination for r in self.destinations.values() if r.failed]
        return (
            f"{self.failed} of {self.failed + self.delivered} deliveries failed "
            f"(to {', '.join(failing)}); see `patient-delivery deliveries --status failed`"
        )

    @property
    def delivered(self) -> int:
        return sum(r.delivered for r in self.destinations.values())

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.destinations.values())

    def rows(self) -> list[dict[str, object]]:
        return [
            {
                "destination": r.destination,
                "delivered": r.delivered,
                "failed": r.failed,
                "skipped": r.skipped,
                "bytes": r.bytes,
                "upload seconds": round(r.seconds, 2),
                "failure reasons": "; ".join(f"{n} x {why}" for why, n in r.reasons.most_common()),
            }
            for r in self.destinations.values()
        ]


@task(name="gather")
def gather(claimant: str, work: WorkFilter, limit: int) -> dict[str, list[int]]:
    """Claim up to `limit` owed deliveries for this run; IDs by destination."""
    store = open_store()
    _release_finished_runs(store, claimant)
    return ledger.claim(store, claimant, work, limit=limit)


def _release_finished_runs(store: Store, claimant: str) -> None:
    """Take over at once what crashed or cancelled runs had claimed, instead of waiting out
    their leases: Prefect knows which runs are over."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    others = [c for c in ledger.claimants(store) if c != claimant]
    if not others:
        return
    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        for other in others:
            try:
                state = client.read_flow_run(uuid.UUID(other)).state
            except (ValueError, ObjectNotFound):
                continue  # not a Prefect run of this server: its lease decides
            if state is not None and state.is_final():
                released = ledger.release(store, other)
                logger.warning(
                    "run %s ended %s holding %d deliveries; taking them over",
                    other, state.type.value, released,
                )  # fmt: skip


@dataclass
class Rendered:
    """What render hands to upload: the deliveries ready to send, and how many lanes to use."""

    result: RenderResult
    max_connections: int = 1


@task(name="render")
def render(destination_ref: str, claimant: str, delivery_ids: list[int]) -> Rendered:
    """Render each delivery's path (kept across retries); failures are recorded with a reason."""
    store = open_store()
    logger = get_run_logger()
    try:  # the run's pool loaded the block once for render and upload (in this process)
        destination = sessions.pools.get(claimant, destination_ref, load_destination).destination
    except Exception as exc:  # a missing or invalid block fails its deliveries, nothing else
        reason = f"destination block {destination_ref!r} cannot be loaded ({type(exc).__name__})"
        failed = ledger.fail_claimed(store, claimant, delivery_ids, reason)
        logger.error("%s; %d deliveries failed", reason, failed)
        return Rendered(RenderResult(failed=Counter({reason: failed})))
    result = ledger.render_paths(store, claimant, delivery_ids, destination.render_path)
    for reason, count in result.failed.items():
        logger.warning("%s: %d deliveries failed: %s", destination_ref, count, reason)
    return Rendered(result, destination.max_connections)


@task(name="upload")
def upload(
    destination_ref: str, claimant: str, lanes: list[list[int]], batch_size: int = 100
) -> BatchReport:
    """Send a share of a page to one destination, recording outcomes in the ledger a batch at
    a time (one transaction each, at most `batch_size` documents). One lane: its deliveries in
    order. Several: a thread per lane (connection), each taking the wave's next batch when it
    is ready for one (`Shares`)."""
    store = open_store()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    if len(lanes) == 1:
        batches = _batches(lanes[0], batch_size)
        return _send_lane(store, destination_ref, claimant, batches, worker)
    shares = Shares([i for lane in lanes for i in lane], len(lanes), batch_size)
    report = BatchReport(destination_ref, worker=worker)
    with ThreadPoolExecutor(len(lanes), thread_name_prefix="upload-lane") as pool:
        sent = pool.map(
            lambda _: _send_lane(store, destination_ref, claimant, shares.batches(), worker),
            lanes,
        )
        for lane_report in sent:  # a lane's exception is raised once every lane has ended
            report.absorb(lane_report)
    return report


class Shares:
    """A wave's deliveries, handed to its lanes a batch at a time, in order.

    Each lane takes the next batch when it has sent its last, so a lane that goes faster sends
    more and the lanes end together (fixed equal shares ended up to 0.3 s apart in a 2.3 s
    run, measured, with connections idle meanwhile). Batches shrink toward the end, to a share
    of what is left, so that no lane starts a long last batch while the others run dry.
    """

    SMALLEST = 8
    """Documents in the last batches: enough to keep several files in flight per connection
    (fewer when the wave has fewer per lane, so that every lane gets some)."""

    def __init__(self, delivery_ids: list[int], lanes: int, batch_size: int) -> None:
        self._ids = delivery_ids
        self._taken = 0
        self._lanes = max(1, lanes)
        self._batch_size = max(1, batch_size)
        self._smallest = max(1, min(self.SMALLEST, len(delivery_ids) // self._lanes))
        self._lock = threading.Lock()

    def take(self) -> list[int]:
        """The next batch; empty once every delivery is taken."""
        with self._lock:
            left = len(self._ids) - self._taken
            share = max(self._smallest, math.ceil(left / self._lanes))
            batch = self._ids[self._taken : self._taken + min(self._batch_size, share)]
            self._taken += len(batch)
            return batch

    def batches(self) -> Iterator[list[int]]:
        return iter(self.take, [])


UPLOAD_LANES = 32
"""Lanes sending at once in one process, over every destination and task: the bound the upload
thread pool used to set when each task was one lane."""

_lane_slots = threading.BoundedSemaphore(UPLOAD_LANES)


def _send_lane(
    store: Store, destination_ref: str, claimant: str, batches: Iterator[list[int]], worker: str
) -> BatchReport:
    """One connection's batches, one after another, once one of the process's lane slots is
    free."""
    report = BatchReport(destination_ref, worker=worker)
    with _lane_slots:
        started = time.perf_counter()
        for batch in batches:
            _upload_batch(store, destination_ref, claimant, batch, report)
        report.seconds = time.perf_counter() - started
    return report


def _upload_batch(
    store: Store, destination_ref: str, claimant: str, delivery_ids: list[int], report: BatchReport
) -> None:
    items = ledger.start_batch(store, claimant, delivery_ids)
    report.skipped += len(delivery_ids) - len(items)
    outcomes: list[Outcome] = []
    try:
        pool = sessions.pools.get(claimant, destination_ref, load_destination)
        with pool.lease() as lease:
            documents = ledger.stream_contents(store, items)
            for outcome in _send_documents(lease, pool, documents):
                outcomes.append(outcome)  # one by one: kept if a later document raises
    except Exception as exc:
        reason = str(exc) if isinstance(exc, DeliveryError) else type(exc).__name__
        done = {o.delivery_id for o in outcomes}
        outcomes += [
            Outcome(i.delivery_id, 1, error=reason) for i in items if i.delivery_id not in done
        ]
    ledger.record_outcomes(store, claimant, outcomes)
    for outcome in outcomes:
        if outcome.delivered:
            report.delivered += 1
            report.bytes += outcome.size or 0
        else:
            report.failed += 1
            report.reasons[outcome.error or "unknown"] += 1


Document = tuple[UploadItem, bytes]


def _send_documents(
    lease: Lease, pool: sessions.SessionPool, documents: Iterator[Document]
) -> Iterator[Outcome]:
    """Each document's outcome, in the order they finish.

    First tries go through the session's `upload_many`, several on their way at once where the
    destination can (SFTP, S3 on the CRT). Once one fails temporarily, no more are started:
    those on their way land, the failed ones are retried one at a time by `_send` (after one
    reconnect, and one backoff for them all), and then first tries go on with the rest.
    """
    while True:
        if pool.down is not None:
            # Another upload already gave up on this destination in this run: fail fast
            # instead of spending the whole backoff on every document.
            for item, _ in documents:
                error = f"not attempted in this run: {pool.down}"
                yield Outcome(item.delivery_id, 0, error=error)
            return
        failed: list[tuple[Document, DeliveryError]] = []
        try:
            session = lease.session()
        except DeliveryError as exc:  # connecting is a first try of the next document
            failed = [(document, exc) for document in islice(documents, 1)]
        else:
            firsts = session.upload_many(_first_tries(session, pool, documents, failed))
            for (item, content), result in firsts:
                if isinstance(result, Receipt):
                    lease.delivered()
                    yield Outcome(item.delivery_id, 1, sha256=result.sha256, size=result.size)
                elif not result.retryable:
                    yield Outcome(item.delivery_id, 1, error=f"{result} (not retried)")
                else:
                    failed.append(((item, content), result))
        if not failed:
            if pool.down is None:
                return  # every document was taken, and has landed
            continue  # another lane gave up on the destination: fail the rest fast, above
        lease.reset()
        if any(error.retryable for _, error in failed):
            _back_off(1)
        for (item, content), error in failed:
            if not error.retryable:
                yield Outcome(item.delivery_id, 1, error=f"{error} (not retried)")
            elif pool.down is not None:
                error_text = f"{error} (not retried in this run: {pool.down})"
                yield Outcome(item.delivery_id, 1, error=error_text)
            else:
                yield _send(lease, item, content, failed=error)


def _first_tries(
    session: DestinationSession,
    pool: sessions.SessionPool,
    documents: Iterator[Document],
    failed: list[tuple[Document, DeliveryError]],
) -> Iterator[tuple[Document, Upload]]:
    """The documents to start, while none has failed and the destination is not down; a
    document an earlier run tried first has that run's cut-off temporary files removed."""
    while not failed and pool.down is None:
        document = next(documents, None)
        if document is None:
            return
        item, content = document
        if item.attempts:
            with suppress(DeliveryError):
                session.discard_leftovers(item.path)
        yield document, Upload(item.path, content, item.sha256)


def _back_off(attempt: int) -> None:
    """Exponential backoff with jitter before try `attempt + 1`."""
    time.sleep(min(8.0, 0.25 * 2**attempt) * random.uniform(0.5, 1.5))


def _send(lease: Lease, item: UploadItem, content: bytes, failed: DeliveryError) -> Outcome:
    """Retry one document whose first try `failed` temporarily, with exponential backoff and
    jitter between tries, removing the temporary files cut-off tries left."""
    leftovers = [failed.leftover] if failed.leftover else []
    for attempt in range(2, UPLOAD_ATTEMPTS + 1):
        try:
            session = lease.session()
            receipt = session.upload(item.path, content, item.sha256)
            for leftover in leftovers:  # temporary files of attempts cut off midway
                with suppress(DeliveryError):
                    session.remove(leftover)
            lease.delivered()
            return Outcome(item.delivery_id, attempt, sha256=receipt.sha256, size=receipt.size)
        except DeliveryError as exc:
            if exc.leftover:
                leftovers.append(exc.leftover)
            if not exc.retryable:
                return Outcome(item.delivery_id, attempt, error=f"{exc} (not retried)")
            if attempt == UPLOAD_ATTEMPTS:
                lease.gave_up(str(exc))
                error = f"{exc} (gave up after {attempt} tries; the next run tries again)"
                return Outcome(item.delivery_id, attempt, error=error)
            lease.reset()
            _back_off(attempt)
        except Exception as exc:
            # Unknown failures are recorded by type only: their text may carry what we must not log.
            lease.reset()
            return Outcome(
                item.delivery_id, attempt, error=f"unexpected error: {type(exc).__name__}"
            )
    raise AssertionError("unreachable")


BATCHES_PER_LANE = 5
"""Most ledger batches a lane sends in one wave: progress moves at least this often."""


def lane_size(count: int, connections: int, batch_size: int) -> int:
    """Documents per lane (one connection's share of a wave) for `count` to send over
    `connections`.

    As few as keep every connection busy, all of one size so the connections finish together
    (100-document shares on 8 connections left half of them idle for the last third of a
    2,000-document run), none over `BATCHES_PER_LANE` batches. (On threads, a wave's lanes
    then share its batches out as they go: `Shares`.)
    """
    lanes = max(1, connections)
    waves = math.ceil(count / (lanes * batch_size * BATCHES_PER_LANE))
    return max(1, math.ceil(count / (lanes * max(1, waves))))


def _batches(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def lanes_per_task(runner: TaskRunner | None, connections: int) -> int:  # type: ignore[type-arg]
    """How many lanes one upload task carries: a whole wave's (one per connection) on the
    flow's own thread pool, where each task run would cost Prefect's server about 17 ms of CPU
    and this process about 9 ms (measured) and buy nothing; one on Dask, so lanes spread over
    its workers."""
    return max(1, connections) if isinstance(runner, ThreadPoolTaskRunner) else 1


def _run_name() -> str:
    parameters = flow_run.parameters or {}
    scope = parameters.get("project_id") or "all-projects"
    if parameters.get("destinations"):
        scope += " to " + ",".join(parameters["destinations"])
    return f"deliver {scope}"


def task_runner(dask_address: str | None = None) -> TaskRunner:  # type: ignore[type-arg]
    """Where upload batches run: threads in the flow's process, or a Dask cluster.

    `dask_address` (default: the `PATIENT_DELIVERY_DASK_ADDRESS` setting) is a scheduler
    address, or `local` for a cluster of worker processes on this machine, on loopback. Batches
    carry delivery IDs and a destination's block name only: each Dask worker loads the block
    and opens its own sessions, nothing is pickled from the flow.
    """
    address = dask_address or get_settings().dask_address
    if not address:
        return ThreadPoolTaskRunner(max_workers=32)
    from prefect_dask import DaskTaskRunner

    if address == "local":
        return DaskTaskRunner(
            cluster_kwargs={"processes": True, "threads_per_worker": 8, "host": "127.0.0.1",
                            "dashboard_address": None},
        )  # fmt: skip
    return DaskTaskRunner(address=address)


@flow(
    name="deliver-updates",
    flow_run_name=_run_name,
    task_runner=task_runner(),
    validate_parameters=True,
)
async def deliver_updates(
    project_id: str | None = None,
    destinations: list[str] | None = None,
    patient_ids: list[str] | None = None,
    data_types: list[DataType] | None = None,
    batch_size: int = 100,
    max_documents: int | None = None,
    page_size: int = PAGE_SIZE,
) -> RunSummary | State:
    """Deliver every owed document: new versions, earlier failures, and crashed runs' leftovers.

    Filters narrow the run to a project, destinations (block `type/name`), patients or data
    types; `max_documents` caps how many are sent in this run (the rest wait for the next);
    `page_size` is how many deliveries are claimed at a time (smaller pages share a backlog
    more evenly between runs working at once).
    """

    # The flow is async only for how Prefect ends it: the sync engine joins its heartbeat
    # thread, which sleeps in 1 s steps (1.0-1.1 s added to every run, measured); the async
    # engine lets it stop on its own. The work itself runs in a thread, as a sync flow would,
    # with one sync API client its tasks share (else each task run opens its own). Prefect's
    # helpers that turn into coroutines inside an async flow (artifacts) get `_sync=True`.
    def work() -> RunSummary | State:
        with SyncClientContext.get_or_create():
            return _deliver_updates(project_id, destinations, patient_ids, data_types,
                                    batch_size, max_documents, page_size)  # fmt: skip

    return await asyncio.to_thread(work)


def _deliver_updates(
    project_id: str | None,
    destinations: list[str] | None,
    patient_ids: list[str] | None,
    data_types: list[DataType] | None,
    batch_size: int,
    max_documents: int | None,
    page_size: int,
) -> RunSummary | State:
    _freeze_startup_heap()
    logger = get_run_logger()
    claimant = str(flow_run.id or uuid.uuid4())
    work = WorkFilter(
        project_id=project_id,
        destinations=tuple(destinations or ()),
        patient_ids=tuple(patient_ids or ()),
        data_types=tuple(data_types or ()),
    )
    summary = RunSummary(flow_run_id=claimant)
    owed = ledger.count_owed(open_store(), claimant, work)
    if max_documents is not None:
        owed = min(owed, max_documents)
    progress = Progress(owed)
    try:
        _deliver_pages(claimant, work, batch_size, page_size, max_documents, summary, progress)
    finally:
        sessions.pools.close_run(claimant)
    progress.update(summary.delivered + summary.failed, final=True)
    _publish(summary)
    logger.info(
        "run finished: %d delivered, %d failed, to %d destination(s)",
        summary.delivered,
        summary.failed,
        len(summary.destinations),
    )
    if summary.failed:
        _announce_failing_destinations(summary)
        # A red run in the UI, and the trigger for alerts; the ledger has each reason.
        return Failed(message=summary.headline(), data=summary)
    return summary


@functools.cache
def _freeze_startup_heap() -> None:
    """Once per process, at its first run: move what startup allocated (modules, Prefect's
    engine, the store's metadata) out of the garbage collector's way (`gc.freeze`). Otherwise a
    full collection walks all of it whenever a run allocates in bulk: botocore parsing S3's
    models set one off, 190 ms in the middle of the run's first S3 connection, measured. What
    later runs allocate is collected as usual."""
    gc.freeze()


def deliver_state(runner: TaskRunner | None = None, **parameters: object) -> State:  # type: ignore[type-arg]
    """Run `deliver_updates` (on `runner`, if given) from synchronous code; its final state."""
    run = deliver_updates if runner is None else deliver_updates.with_options(task_runner=runner)
    return run_coro_as_sync(run(**parameters, return_state=True))  # type: ignore[call-overload]


def deliver(runner: TaskRunner | None = None, **parameters: object) -> RunSummary:  # type: ignore[type-arg]
    """Run `deliver_updates` (on `runner`, if given) and return its summary, whether or not
    some deliveries failed."""
    result = deliver_state(runner, **parameters).result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    return result


progress_hooks: list[Callable[[int, int], None]] = []
"""Callables told (done, total) as batches finish, in this process: the CLI's progress bar."""


class Progress:
    """A progress artifact that moves as batches finish (created only for runs with work)."""

    EVERY_SECONDS = 1.0
    """At most one update a second (and the last): each is a call to Prefect's API, and the
    equal-sized upload tasks of a page finish together."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.updated = time.monotonic()
        self.shown = 0.0
        self.artifact_id = (
            create_progress_artifact(
                0.0, description=f"{total} deliveries owed at start", _sync=True
            )
            if total
            else None
        )

    def update(self, done: int, final: bool = False) -> None:
        if not final:
            for hook in progress_hooks:
                hook(done, self.total)
        share = min(100.0, 100.0 * done / max(1, self.total))
        if self.artifact_id is None or share == self.shown:
            return
        if not final and done < self.total and time.monotonic() - self.updated < self.EVERY_SECONDS:
            return
        self.updated, self.shown = time.monotonic(), share
        update_progress_artifact(self.artifact_id, share, _sync=True)


def _deliver_pages(
    claimant: str,
    work: WorkFilter,
    batch_size: int,
    page_size: int,
    max_documents: int | None,
    summary: RunSummary,
    progress: Progress,
) -> None:
    """Gather a page, render it, upload it in batches; repeat until nothing more is owed."""
    logger = get_run_logger()
    context = FlowRunContext.get()
    runner = context.task_runner if context is not None else None
    remaining = max_documents if max_documents is not None else float("inf")
    while remaining > 0:
        started = time.perf_counter()
        limit = int(min(max(1, page_size), remaining))
        claimed = gather(claimant, work, limit)
        count = sum(len(ids) for ids in claimed.values())
        if count == 0:
            break
        remaining -= count
        if count < limit:
            remaining = 0  # a short page: nothing more was owed; what comes later is the next run's
        logger.info(
            "claimed %d deliveries to %d destination(s) in %.2f s",
            count, len(claimed), time.perf_counter() - started,
        )  # fmt: skip
        started = time.perf_counter()
        if isinstance(runner, ThreadPoolTaskRunner):  # uploads run here: their sessions too
            for ref, ids in claimed.items():  # as many as the page's lanes use, within the bound
                sessions.pools.warm(claimant, ref, load_destination, sessions=len(ids))
        rendered = {ref: render.submit(ref, claimant, ids) for ref, ids in claimed.items()}
        uploads = []
        for ref, future in rendered.items():
            rendered_page = future.result()
            result = rendered_page.result
            logger.info(
                "%s: %d paths rendered in %.2f s",
                ref, len(result.ready), time.perf_counter() - started,
            )  # fmt: skip
            summary.add(BatchReport(ref, failed=result.failed.total(), reasons=result.failed))
            connections = rendered_page.max_connections
            size = lane_size(len(result.ready), connections, batch_size)
            lanes = list(_batches(result.ready, size))
            per_task = lanes_per_task(runner, connections)
            uploads += [
                upload.submit(ref, claimant, wave, batch_size) for wave in _batches(lanes, per_task)
            ]
        for future in uploads:
            summary.add(future.result())
            progress.update(summary.delivered + summary.failed)
        logger.info("delivered %d, failed %d so far", summary.delivered, summary.failed)


def _announce_failing_destinations(summary: RunSummary) -> None:
    """One event per destination with failures, for the "keeps failing" alert (counts only)."""
    for report in summary.destinations.values():
        if report.failed:
            reason = report.reasons.most_common(1)[0][0] if report.reasons else "unknown"
            emit_event(
                event="patient-delivery.destination.failed",
                resource={
                    "prefect.resource.id": f"patient-delivery.destination.{report.destination}",
                    "prefect.resource.name": report.destination,
                },
                payload={"failed": report.failed, "delivered": report.delivered, "reason": reason},
            )


def _publish(summary: RunSummary) -> None:
    rows = summary.rows() or [{"destination": "(none)", "delivered": 0, "failed": 0}]
    create_table_artifact(
        table=rows,
        key="delivery-summary",
        description=f"Delivery run: {summary.delivered} delivered, {summary.failed} failed.",
        _sync=True,
    )
