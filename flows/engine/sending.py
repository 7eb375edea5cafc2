"""The sending engine: a wave of deliveries to one destination, over its connections, in rounds.

    send_wave  -> a lane (thread) per connection; each lane takes the wave's next batch when it
                  has sent its last (`Shares`), so the connections finish together
    a batch    -> renew the claims, read the documents from the store one at a time, send them
                  in rounds (`send_documents`), write every outcome to the ledger in one
                  transaction
    a round    -> send what is owed over one session, several files on their way at once where
                  the destination allows; stop taking more once one fails temporarily; then
                  back off and send the temporary failures again in the next round

**Retries happen here and nowhere else** (no client retries under it), by the policy in
`retries`: a document costs at most `retries.ATTEMPTS` sends in one run, with exponential
backoff and jitter between rounds. Terminal failures (denied, misconfigured, invalid) are not
retried and say so. Once `retries.DOWN_AFTER` documents in a row have used up their attempts,
the destination counts as down for the rest of the run (`sessions.SessionPool.gave_up`): its
other documents fail at once and wait for the next run, instead of each spending the whole
backoff.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from patient_delivery import ledger
from patient_delivery.blocks import DeliveryError, Receipt
from patient_delivery.blocks.contract import DestinationSession, Upload
from patient_delivery.flows.engine import waves
from patient_delivery.flows.engine.retries import retry_again, wait_before
from patient_delivery.flows.engine.sessions import Lease, SessionPool
from patient_delivery.flows.engine.waves import Lane
from patient_delivery.flows.reporting import BatchReport
from patient_delivery.ledger import Outcome, UploadItem
from patient_delivery.store import Store, open_store

if TYPE_CHECKING:
    from patient_delivery.flows.engine.runs import Run

Document = tuple[UploadItem, bytes]


def send_wave(run: Run, lanes: list[Lane], batch_size: int) -> list[BatchReport]:
    """Send a wave of lanes, of one destination or many, on the run's lanes (the process's disk
    writers for folders on this machine), in the order given: the plan interleaves
    destinations, so none waits behind another's backlog. Destinations with few documents share
    ledger batches (`waves.shared_batches`). Each batch's outcomes go to the ledger as it ends.
    A report per destination: counts and reasons, never content."""
    store = open_store()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    at_once = run.limits.lanes(on_this_machine=run.on_this_machine({ref for ref, _ in lanes}))
    by_destination: dict[str, list[int]] = {}
    lane_counts: Counter[str] = Counter()
    for ref, ids in lanes:
        by_destination.setdefault(ref, []).extend(ids)
        lane_counts[ref] += 1
    shares = {ref: Shares(ids, lane_counts[ref], batch_size) for ref, ids in by_destination.items()}
    reports = {ref: BatchReport(ref, worker=worker) for ref in by_destination}

    def send(unit: list[Lane]) -> list[BatchReport]:
        if len(unit) > 1:
            return _send_batch(store, run, unit, worker)
        ref = unit[0][0]
        return [_send_lane(store, run, ref, shares[ref], worker)]

    units = waves.shared_batches(lanes, batch_size, at_once)
    sent = [run.submit([ref for ref, _ in unit], functools.partial(send, unit)) for unit in units]
    for future in sent:
        for report in future.result():
            reports[report.destination].absorb(report)
    return list(reports.values())


class Shares:
    """A wave's deliveries, handed to its lanes a batch at a time, in order.

    Each lane takes the next batch when it has sent its last, so a lane that goes faster sends
    more and the lanes end together. Batches shrink toward the end, to a share of what is left,
    so that no lane starts a long last batch while the others run dry.
    """

    SMALLEST = waves.MIN_LANE
    """Documents in the last batches: enough to keep several files in flight per connection
    (fewer when the wave has fewer per lane, so that every lane gets some)."""

    def __init__(self, delivery_ids: list[int], lanes: int, batch_size: int) -> None:
        self.ids = delivery_ids
        self.taken = 0
        self.lanes = max(1, lanes)
        self.batch_size = max(1, batch_size)
        self.smallest = max(1, min(self.SMALLEST, len(delivery_ids) // self.lanes))
        self.lock = threading.Lock()

    def take(self) -> list[int]:
        """The next batch; empty once every delivery is taken."""
        with self.lock:
            left = len(self.ids) - self.taken
            share = max(self.smallest, math.ceil(left / self.lanes))
            batch = self.ids[self.taken : self.taken + min(self.batch_size, share)]
            self.taken += len(batch)
            return batch

    def batches(self) -> Iterator[list[int]]:
        return iter(self.take, [])


def _send_lane(
    store: Store, run: Run, destination_ref: str, shares: Shares, worker: str
) -> BatchReport:
    """One connection's batches of one destination, one after another."""
    report = BatchReport(destination_ref, worker=worker)
    for batch in shares.batches():
        for part in _send_batch(store, run, [(destination_ref, batch)], worker):
            report.absorb(part)
    return report


def _send_batch(store: Store, run: Run, batch: list[Lane], worker: str) -> list[BatchReport]:
    """Send one ledger batch, of one destination or of several small ones (one after another,
    each over a session of its own), and record every outcome in one transaction (also when
    sending broke off: what was not answered fails with the reason, and the next run sends it)."""
    started = ledger.start_batch(store, run.id, [i for _, ids in batch for i in ids])
    items = {item.delivery_id: item for item in started}
    outcomes: list[Outcome] = []
    reports = []
    with ledger.reading(store) as read:
        consent = Consent(read.withdrawn, list(items))
        for ref, ids in batch:
            report = BatchReport(ref, worker=worker)
            ours = [items[i] for i in ids if i in items]
            report.began = time.time()
            sent = _send_to(run, ref, ours, read.contents(ours), consent) if ours else []
            report.ended = time.time()
            report.skipped = len(ids) - len(sent)
            report.count(sent)
            outcomes += sent
            reports.append(report)
    ledger.record_outcomes(store, run.id, outcomes)
    return reports


class Consent:
    """Whether a batch's deliveries are still shared: a patient may stop sharing while a run
    sends. Every send asks, first tries and retries alike, just before it starts. The answer is
    read from the store at most `EVERY` seconds before (the batch's claim is the first read),
    and afresh for each round of retries, which come after a backoff: so no send starts more
    than `EVERY` seconds after a withdrawal is committed. What is already on its way finishes."""

    EVERY = 0.05

    def __init__(self, ask: Callable[[list[int]], set[int]], delivery_ids: list[int]) -> None:
        self.ask = ask
        self.ids = delivery_ids
        self.withdrawn: set[int] = set()  # the claim took only deliveries still pending
        self.read_at = time.monotonic()

    def shared(self, delivery_id: int, fresh: bool = False) -> bool:
        """Whether the delivery may be sent now; `fresh` reads the store whatever the age of
        the last answer."""
        if fresh or time.monotonic() - self.read_at >= self.EVERY:
            self.withdrawn = self.ask(self.ids)
            self.read_at = time.monotonic()
        return delivery_id not in self.withdrawn


def _send_to(
    run: Run,
    destination_ref: str,
    items: list[UploadItem],
    documents: Iterator[Document],
    consent: Consent,
) -> list[Outcome]:
    """Send items to one destination over one session; an outcome for each sent or failed
    (none for a withdrawn one), whatever breaks."""
    outcomes: list[Outcome] = []
    try:
        pool = run.pool(destination_ref)
        with pool.lease() as lease:
            for outcome in send_documents(lease, pool, documents, consent):
                outcomes.append(outcome)  # one by one: kept if a later document raises
    except Exception as exc:
        reason = str(exc) if isinstance(exc, DeliveryError) else type(exc).__name__
        done = {o.delivery_id for o in outcomes}
        outcomes += [
            Outcome(i.delivery_id, 1, error=reason) for i in items if i.delivery_id not in done
        ]
    return outcomes


@dataclass
class Retry:
    """A document whose last send failed temporarily, and what that cost so far."""

    document: Document
    attempts: int
    error: DeliveryError
    leftovers: list[str] = field(default_factory=list)
    """Temporary files that cut-off sends left, removed over the next session."""

    @property
    def delivery_id(self) -> int:
        return self.document[0].delivery_id


def send_documents(
    lease: Lease,
    pool: SessionPool,
    documents: Iterator[Document],
    consent: Consent | None = None,
) -> Iterator[Outcome]:
    """Each document's outcome, in rounds: send what is owed (the last round's temporary
    failures first, then documents not tried yet), collect this round's temporary failures,
    back off, and send those again, until every document has an outcome. A document whose
    patient stopped sharing (`consent`; None: no check) is not sent, on any try, and has no
    outcome."""
    retries: list[Retry] = []
    untried: Iterator[Document] = documents
    while True:
        if pool.down is not None:  # this or another lane gave up on the destination
            yield from _not_sent(retries, untried, pool.down)
            return
        if retries:
            lease.reset()
            time.sleep(wait_before(max(r.attempts for r in retries)))
        this_round = Round(pool, retries, untried, consent)
        yield from this_round.send(lease)
        retries = []
        for retry in this_round.owed_next:
            if retry_again(retry.attempts, retry.error.most_attempts):
                retries.append(retry)
                continue
            lease.gave_up(str(retry.error))
            why = f"{retry.error} (gave up after {retry.attempts} tries; the next run tries again)"
            yield Outcome(retry.delivery_id, retry.attempts, error=why)
        if not retries and this_round.untried_done:
            return


class Round:
    """One pass over one session. It takes the retries first, then documents not tried yet,
    while none has failed temporarily in this round and the destination is not down; what it
    did not take waits for the next round, with the tries it has used."""

    def __init__(
        self,
        pool: SessionPool,
        retries: list[Retry],
        untried: Iterator[Document],
        consent: Consent | None = None,
    ) -> None:
        self.pool = pool
        self.consent = consent
        self.retries = {retry.delivery_id: retry for retry in retries}
        """Retries this round has not taken yet."""
        self.tried = {retry.delivery_id: retry.attempts for retry in retries}
        self.leftovers = {retry.delivery_id: retry.leftovers for retry in retries}
        self.untried = untried
        self.untried_done = False
        self.stopped = False
        self.owed_next: list[Retry] = []
        """This round's temporary failures, and the retries it did not reach."""

    def send(self, lease: Lease) -> Iterator[Outcome]:
        try:
            session = lease.session()
        except DeliveryError as exc:
            if exc.retryable:  # no connection: a try of every document the round owes
                self.owed_next += [self.failure(document, exc) for document in self.owed()]
            else:  # refused (login, host key, root folder): no try in this run can do better
                for item, _ in self.owed():
                    yield Outcome(item.delivery_id, self.tries(item), error=f"{exc} (not retried)")
                lease.refused(str(exc))
        else:
            self.remove_leftovers(session)
            uploads = ((document, self.upload(session, document)) for document in self.owed())
            for (item, content), result in session.upload_many(uploads):
                tries = self.tries(item)
                if isinstance(result, Receipt):
                    lease.delivered()
                    yield Outcome(
                        item.delivery_id,
                        tries,
                        sha256=result.sha256,
                        size=result.size,
                        landing=result.landing,
                    )
                elif not result.retryable:
                    yield Outcome(item.delivery_id, tries, error=f"{result} (not retried)")
                else:
                    self.stopped = True
                    self.owed_next.append(self.failure((item, content), result))
        self.owed_next += self.retries.values()  # those this round did not reach

    def remove_leftovers(self, session: DestinationSession) -> None:
        """Remove the temporary files the retries' cut-off sends left; keep the names of those
        that could not be removed, for the next try."""
        for delivery_id, names in self.leftovers.items():
            kept = []
            for name in names:
                try:
                    session.remove(name)
                except DeliveryError:
                    kept.append(name)
            self.leftovers[delivery_id] = kept

    def owed(self) -> Iterator[Document]:
        """The documents to send, taken one at a time while the round goes well, each only
        while its patient still shares (asked afresh before the round's first retry: the
        backoff may have outlasted a withdrawal)."""
        fresh = True
        while self.retries and not self.stopped and self.pool.down is None:
            retry = self.retries.pop(next(iter(self.retries)))
            if self.still_shared(retry.delivery_id, fresh):
                yield retry.document
            fresh = False
        while not self.stopped and self.pool.down is None:
            document = next(self.untried, None)
            if document is None:
                self.untried_done = True
                return
            if self.still_shared(document[0].delivery_id):
                yield document

    def still_shared(self, delivery_id: int, fresh: bool = False) -> bool:
        return self.consent is None or self.consent.shared(delivery_id, fresh)

    def upload(self, session: DestinationSession, document: Document) -> Upload:
        item, content = document
        if item.attempts and self.tries(item) == 1:
            with suppress(DeliveryError):  # an earlier run's cut-off send may have left some
                session.discard_leftovers(item.path)
        return Upload(item.path, content, item.sha256)

    def tries(self, item: UploadItem) -> int:
        """Which try of this document in this run the round makes."""
        return self.tried.get(item.delivery_id, 0) + 1

    def failure(self, document: Document, error: DeliveryError) -> Retry:
        item = document[0]
        leftovers = [*self.leftovers.get(item.delivery_id, []), *filter(None, [error.leftover])]
        return Retry(document, self.tries(item), error, leftovers)


def _not_sent(retries: list[Retry], documents: Iterator[Document], down: str) -> Iterator[Outcome]:
    """Outcomes for what is left once the destination is down: nothing more is sent to it."""
    for retry in retries:
        why = f"{retry.error} (not retried in this run: {down})"
        yield Outcome(retry.delivery_id, retry.attempts, error=why)
    for item, _ in documents:
        yield Outcome(item.delivery_id, 0, error=f"not attempted in this run: {down}")
