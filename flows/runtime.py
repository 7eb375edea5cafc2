"""How the delivery run sits on Prefect's run time: where its tasks run, the sync/async bridge,
the heap freeze, and every use of Prefect's internals.

- **Task runner**: threads in the flow's process by default, or a Dask cluster.
- **Async shell**: the flow is async only for how Prefect ends it (the sync engine joins its
  heartbeat thread, which sleeps in 1 s steps; the async engine lets it stop on its own). The
  work runs in a thread, as a sync flow would, with one sync API client its tasks share (else
  each task run opens its own). Prefect's helpers that would turn into coroutines inside an
  async flow (artifacts) are called with `_sync=True`.
- **Heap freeze**: a process's first run moves what startup allocated out of the garbage
  collector's way, so a full collection during the run does not walk Prefect's and botocore's
  objects.

`missing()` names whatever of Prefect's internals an upgrade took away; a test calls it.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
from collections.abc import Callable
from typing import Any, TypeVar
from uuid import UUID

from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, SyncClientContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.asyncutils import run_coro_as_sync

from patient_delivery.settings import get_settings

T = TypeVar("T")

THREADS = 32
"""Task runs at once on the flow's own thread pool."""

LOCAL_CLUSTER: dict[str, Any] = {
    "processes": True, "threads_per_worker": 8, "host": "127.0.0.1", "dashboard_address": None,
    "protocol": "tls", "security": True,
}  # fmt: skip
"""`--dask local`: worker processes on loopback; `security=True` is Dask's
`Security.temporary()`, a certificate made per cluster that client, scheduler and workers must
all present."""

REQUIRED = ("SyncClientContext.get_or_create", "asyncutils.run_coro_as_sync", "_sync=True")
"""Prefect's internals this module relies on, as `missing()` reports them."""


def task_runner(dask_address: str | None = None) -> TaskRunner:  # type: ignore[type-arg]
    """Where upload tasks run: threads in the flow's process, or a Dask cluster.

    `dask_address` (default: the `PATIENT_DELIVERY_DASK_ADDRESS` setting) is a scheduler
    address, or `local` for a cluster of worker processes on this machine, on loopback. A local
    cluster speaks TLS with a certificate made for it, kept in memory and required of every
    client and worker, so no other local user can connect to it and run code as ours. A cluster
    given by address is the operator's to protect (the README says how). Tasks carry delivery
    IDs and a destination's block name only: each Dask worker loads the block and opens its own
    sessions, nothing is pickled from the flow.
    """
    address = dask_address or get_settings().dask_address
    if not address:
        return ThreadPoolTaskRunner(max_workers=THREADS)
    check_dask_address(address)
    from prefect_dask import DaskTaskRunner

    if address == "local":
        return DaskTaskRunner(cluster_kwargs=LOCAL_CLUSTER)
    return DaskTaskRunner(address=address)


DASK_TLS_SETTINGS = {
    "ca-file": "DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
    "client.cert": "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT",
}
"""What a client needs to reach a `tls://` scheduler: the CA that signed the cluster's
certificates, and a certificate of its own (its key beside it, or in
`DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY`)."""


def check_dask_address(address: str) -> None:
    """Refuse, before a run claims anything, a Dask address this process cannot use: `local`,
    `tcp://host:port`, or `tls://host:port` with Dask's TLS configuration in place (its files
    readable). A ValueError names the setting, never a file's content."""
    import dask.config

    if address == "local":
        return
    scheme, found, rest = address.partition("://")
    if not found or scheme not in ("tcp", "tls") or not rest:
        raise ValueError("dask: give `local`, tcp://host:port or tls://host:port")
    if scheme != "tls":
        return
    for key, variable in DASK_TLS_SETTINGS.items():
        path = dask.config.get(f"distributed.comm.tls.{key}", None)
        if not path:
            raise ValueError(f"dask: tls:// needs Dask's TLS configuration: set {variable}")
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"dask: {variable} cannot be read ({exc.strerror})") from None


def send_pending_events(seconds: float = 10.0) -> None:
    """Wait, at most `seconds`, until Prefect has sent the events that runs in this process
    queued (their states): a command that ran a flow then ends without Prefect's "Still
    processing items" notice. What is left by then is still sent as the process exits."""
    import threading

    from prefect.events.worker import EventsWorker

    waiting = threading.Thread(target=EventsWorker.instance().wait_until_empty, daemon=True)
    waiting.start()
    waiting.join(seconds)


def run_timeout() -> float:
    """Seconds a run may take before Prefect ends it TimedOut (`run_timeout_minutes`)."""
    return get_settings().run_timeout_minutes * 60.0


def uploads_run_here() -> bool:
    """Whether the running flow's tasks run in this process (its threads), not on Dask workers."""
    context = FlowRunContext.get()
    return context is None or isinstance(context.task_runner, ThreadPoolTaskRunner)


async def in_thread_with_one_client(work: Callable[[], T]) -> T:
    """Run `work` in a thread, its tasks sharing one sync API client (the async flow's body)."""

    def run() -> T:
        with SyncClientContext.get_or_create():
            return work()

    return await asyncio.to_thread(run)


def run_sync(coroutine: Any) -> Any:
    """Run a flow's coroutine (an async flow called from sync code) to its end."""
    return run_coro_as_sync(coroutine)


@functools.cache
def freeze_startup_heap() -> None:
    """Once per process, at its first run: move what startup allocated (modules, Prefect's
    engine, the store's metadata) out of the garbage collector's way (`gc.freeze`). What later
    runs allocate is collected as usual."""
    gc.freeze()


def create_progress(progress: float, key: str, description: str) -> UUID:
    return create_progress_artifact(progress, key=key, description=description, _sync=True)  # type: ignore[call-arg]


def update_progress(artifact_id: UUID, progress: float, description: str | None = None) -> None:
    update_progress_artifact(artifact_id, progress, description, _sync=True)  # type: ignore[call-arg]


def create_table(rows: list[dict[str, object]], key: str, description: str) -> None:
    create_table_artifact(table=rows, key=key, description=description, _sync=True)  # type: ignore[call-arg]


def missing() -> list[str]:
    """The internals of `REQUIRED` this Prefect no longer has (empty when all are there)."""
    gone = []
    if not callable(getattr(SyncClientContext, "get_or_create", None)):
        gone.append("SyncClientContext.get_or_create")
    if not callable(run_coro_as_sync):
        gone.append("asyncutils.run_coro_as_sync")
    try:
        from prefect._internal.compatibility import async_dispatch

        dispatches = '"_sync"' in inspect.getsource(async_dispatch.async_dispatch)
    except (ImportError, AttributeError):
        dispatches = False
    if not dispatches:
        gone.append("_sync=True")
    return gone
