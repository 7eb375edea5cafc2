"""Connections to a PostgreSQL store: wait for one when the server has none to spare, and say
at start when this process could ask for more than it has.

PostgreSQL refuses a connection past its `max_connections` (less the slots it reserves) at
once, with "sorry, too many clients already". Every delivery process, `serve` and `listen`
opens its own pool, so a deployment can ask for more than the server allows; a refused
connection then waits, with backoff, for one to free up instead of failing the run.
docs/operations.md ("Connections") sizes a deployment.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event

log = logging.getLogger("patient_delivery.store")

REFUSED_FOR_ROOM = (
    "too many clients already",  # max_connections
    "remaining connection slots are reserved",  # superuser_reserved / reserved_connections
    "too many connections for",  # a role's or a database's CONNECTION LIMIT
)
"""PostgreSQL's messages (SQLSTATE 53300, which psycopg does not carry on a failed connect)."""

FIRST_PAUSE = 0.05
LONGEST_PAUSE = 2.0


def refused_for_room(exc: BaseException) -> bool:
    """Whether PostgreSQL refused a connection because it has no slot to spare."""
    text = str(exc)
    return any(reason in text for reason in REFUSED_FOR_ROOM)


def wait_for_room(engine: Engine, seconds: float) -> None:
    """Make `engine` retry a connection PostgreSQL refused for want of room, with jittered
    backoff, for up to `seconds`; the first wait in the process is logged once."""
    warned = threading.Event()

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        deadline = time.monotonic() + seconds
        pause = FIRST_PAUSE
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except Exception as exc:
                left = deadline - time.monotonic()
                if not refused_for_room(exc) or left <= 0:
                    raise
                if not warned.is_set():
                    warned.set()
                    log.warning(
                        "PostgreSQL has no connection to spare (max_connections): waiting up "
                        "to %d s for one; docs/operations.md ('Connections') sizes a deployment",
                        seconds,
                    )
            time.sleep(min(left, pause * random.uniform(0.5, 1.5)))
            pause = min(pause * 2, LONGEST_PAUSE)


@dataclass(frozen=True)
class Room:
    """PostgreSQL's connection slots as an ordinary (not superuser) role sees them."""

    most: int
    reserved: int
    in_use: int

    @property
    def spare(self) -> int:
        return max(0, self.most - self.reserved - self.in_use)


def room(engine: Engine) -> Room | None:
    """The server's connection slots, counting the one this asks over; None on other databases."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as connection:
        most, superuser, reserved, in_use = connection.exec_driver_sql(
            "SELECT current_setting('max_connections')::int,"
            " current_setting('superuser_reserved_connections')::int,"
            " coalesce(current_setting('reserved_connections', true), '0')::int,"
            " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
        ).one()
    return Room(most=most, reserved=superuser + reserved, in_use=in_use - 1)


def warn_if_short(engine: Engine, pool_most: int) -> bool:
    """Log one line when this process's pool may open more connections than PostgreSQL has to
    spare (work then waits for them); whether it did."""
    slots = room(engine)
    if slots is None or pool_most <= slots.spare:
        return False
    log.warning(
        "the store's pool may open %d connections in this process; PostgreSQL has %d of %d to "
        "spare (%d in use, %d reserved), so work may wait for one: set "
        "PATIENT_DELIVERY_STORE_CONNECTIONS or max_connections as docs/operations.md "
        "('Connections') says",
        pool_most, slots.spare, slots.most, slots.in_use, slots.reserved,
    )  # fmt: skip
    return True
