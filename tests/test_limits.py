"""What a process and a run may do at once: one setting per bound, read when first needed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from patient_delivery.flows.engine import limits
from patient_delivery.settings import Settings
from patient_delivery.store.schema import create_store_engine
from tests.test_cli import run

# Imports everything a delivery run uses, then sets the process's sessions: nothing was read
# at import, so the limits and the budget follow the setting of the moment they are needed.
SET_AFTER_IMPORT = """
import os
import patient_delivery.flows.deliver
from patient_delivery.flows.engine import limits, runs
from patient_delivery.settings import get_settings
get_settings.cache_clear()
os.environ["PATIENT_DELIVERY_MAX_SESSIONS"] = "3"
get_settings.cache_clear()
print(limits.process().sessions, runs.process_budget().limit)
"""


def test_the_process_limits_are_read_when_first_needed_not_at_import() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATIENT_DELIVERY_MAX")}
    out = subprocess.run([sys.executable, "-c", SET_AFTER_IMPORT], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    assert out.split() == ["3", "3"]


def test_max_sessions_is_also_read_from_its_earlier_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATIENT_DELIVERY_MAX_SESSIONS", raising=False)
    monkeypatch.setenv("PATIENT_DELIVERY_CONNECTION_BUDGET", "7")
    assert Settings().max_sessions == 7
    monkeypatch.setenv("PATIENT_DELIVERY_MAX_SESSIONS", "9")
    assert Settings().max_sessions == 9


def test_the_store_pool_has_its_own_setting(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PATIENT_DELIVERY_MAX_SESSIONS", "32")
    assert Settings().store_pool() == (5, 37)  # a lane each, and room to start and record
    monkeypatch.setenv("PATIENT_DELIVERY_STORE_CONNECTIONS", "3")
    assert Settings().store_pool() == (3, 0)
    monkeypatch.setenv("PATIENT_DELIVERY_STORE_CONNECTIONS", "1")
    with pytest.raises(ValueError, match="store_connections"):
        Settings()

    from patient_delivery.settings import get_settings

    monkeypatch.setenv("PATIENT_DELIVERY_STORE_CONNECTIONS", "4")
    get_settings.cache_clear()
    try:
        engine = create_store_engine(f"sqlite:///{tmp_path / 'store.db'}")
        assert engine.pool.size() == 4  # type: ignore[attr-defined]
        engine.dispose()
    finally:
        get_settings.cache_clear()


def test_a_run_has_one_number_and_the_rest_follows_from_it() -> None:
    run = limits.RunLimits(sessions=64)
    assert run.lanes() == 64 and run.warm_ups == 64
    assert run.lanes(on_this_machine=True) == limits.process().disk_writers < 64
    assert limits.RunLimits(sessions=2).lanes(on_this_machine=True) == 2
    with pytest.raises(ValueError, match="max_sessions"):
        limits.RunLimits(sessions=0)


@pytest.mark.bad_input
def test_deliver_refuses_max_sessions_below_one() -> None:
    out = run("deliver", "--max-sessions", "0", code=2)
    assert "--max-sessions" in out
