"""The one retry policy of a delivery run: how often a document is sent, how long to wait
between rounds, and when a destination counts as down. The S3 and STS clients retry nothing
themselves (`blocks.s3.clients.PUT_ATTEMPTS`), and paramiko does not retry, so these numbers
are the whole story of what a failing destination costs."""

from __future__ import annotations

import random

ATTEMPTS = 4
"""Most sends of one document in one run: a first try and three retries. The next run tries
again from the start."""

DOWN_AFTER = 2
"""Documents in a row that used up their attempts before the destination counts as down for
the rest of the run (its other documents fail at once and wait for the next run)."""

FIRST_WAIT = 0.25
"""Seconds before the first retry, doubled for each later one, up to `LONGEST_WAIT`."""

LONGEST_WAIT = 8.0


def wait_before(attempt: int) -> float:
    """Seconds to wait before try `attempt + 1`: exponential backoff with jitter (0.5x to
    1.5x), so lanes that failed together do not retry together."""
    return min(LONGEST_WAIT, FIRST_WAIT * 2**attempt) * random.uniform(0.5, 1.5)


def retry_again(attempts: int, most: int | None = None) -> bool:
    """Whether a document that failed temporarily after `attempts` sends is sent again in this
    run (`most`: fewer sends, where its failure allows fewer)."""
    return attempts < min(ATTEMPTS, most or ATTEMPTS)
