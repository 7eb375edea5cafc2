"""The run's one retry policy: how often, how long between rounds, when a destination is down."""

from __future__ import annotations

import pytest

from patient_delivery.flows.engine import retries


def test_a_document_is_sent_at_most_attempts_times_in_a_run() -> None:
    assert [retries.retry_again(n) for n in range(1, retries.ATTEMPTS + 2)] == [True] * (
        retries.ATTEMPTS - 1
    ) + [False, False]


@pytest.mark.parametrize("attempt", range(1, 8))
def test_waits_double_with_jitter_up_to_the_longest(attempt: int) -> None:
    base = min(retries.LONGEST_WAIT, retries.FIRST_WAIT * 2**attempt)
    waits = [retries.wait_before(attempt) for _ in range(200)]
    assert all(0.5 * base <= wait <= 1.5 * base for wait in waits)
    assert max(waits) - min(waits) > 0.2 * base  # jittered: lanes do not retry in step
