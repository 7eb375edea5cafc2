"""Connections to a PostgreSQL store: wait for one when the server has none to spare, and say
at start when this process could ask for more than it has.

PostgreSQL refuses a connection past its `max_connections` (less the slots it reserves) at
once, with "sorry, too many clients already". Every delivery process, `serve` and `listen`
opens its own pool, so a deployment can ask for more than the server allows; a checkout the
server refuses then waits (`WaitingPool`) for a connection to free up instead of failing the
run. This module is the one that uses SQLAlchemy's pool internals (`missing()`).
docs/operations.md ("Connections") sizes a deployment.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool

log = logging.getLogger("patient_delivery.store")

REFUSED_FOR_ROOM = (
    "too many clients already",  # max_connections
    "remaining connection slots are reserved",  # superuser_reserved / reserved_connections
    "too many connections for",  # a role's or a database's CONNECTION LIMIT
)
"""PostgreSQL's messages (SQLSTATE 53300, which psycopg does not carry on a failed connect)."""

FIRST_PAUSE = 0.05
LONGEST_PAUSE = 0.5
"""Between tries: short, because a connection this process gives back meanwhile ends the wait."""

REQUIRED = ("QueuePool._do_get", "QueuePool._timeout")
"""SQLAlchemy's pool internals this module relies on, as `missing()` reports them: `_do_get`
is the hook a pool subclass overrides to hand out a connection."""


def refused_for_room(exc: BaseException) -> bool:
    """Whether PostgreSQL refused a connection because it has no slot to spare."""
    text = str(exc)
    return any(reason in text for reason in REFUSED_FOR_ROOM)


class WaitingPool(QueuePool):
    """SQLAlchemy's queue pool, but a new connection PostgreSQL refuses for want of room is not
    an error: the checkout tries again, with jittered backoff, for up to the pool's timeout
    (`store_wait_seconds`). Each try first takes a connection this process gave back
    meanwhile, so threads waiting here never sit beside idle connections of their own pool.
    The first wait of each pool is logged once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._warned = threading.Event()

    def _do_get(self) -> Any:
        deadline = time.monotonic() + self._timeout
        pause = FIRST_PAUSE
        while True:
            try:
                return super()._do_get()
            except Exception as exc:
                left = deadline - time.monotonic()
                if not refused_for_room(exc) or left <= 0:
                    raise
                self._say_waiting()
            time.sleep(min(left, pause * random.uniform(0.5, 1.5)))
            pause = min(pause * 2, LONGEST_PAUSE)

    def _say_waiting(self) -> None:
        if not self._warned.is_set():
            self._warned.set()
            log.warning(
                "PostgreSQL has no connection to spare (max_connections, or the role's "
                "CONNECTION LIMIT): waiting up to %d s for one; docs/operations.md "
                "('Connections') sizes a deployment",
                self._timeout,
            )


def missing() -> list[str]:
    """The names of `REQUIRED` this SQLAlchemy no longer has (empty when all are there)."""
    gone = [] if callable(vars(QueuePool).get("_do_get")) else ["QueuePool._do_get"]
    if not hasattr(QueuePool(lambda: None, timeout=1), "_timeout"):  # type: ignore[arg-type, return-value]
        gone.append("QueuePool._timeout")
    return gone


@dataclass(frozen=True)
class Room:
    """PostgreSQL's connection slots as an ordinary (not superuser) role sees them, and the
    store's role's own CONNECTION LIMIT, if it has one."""

    most: int
    reserved: int
    in_use: int
    role_most: int | None = None
    role_in_use: int = 0

    @property
    def spare(self) -> int:
        server = self.most - self.reserved - self.in_use
        if self.role_most is not None:
            server = min(server, self.role_most - self.role_in_use)
        return max(0, server)


def room(engine: Engine) -> Room | None:
    """The server's connection slots, not counting the one this asks over; None on other
    databases."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as connection:
        most, superuser, reserved, in_use, role_most, role_in_use = connection.exec_driver_sql(
            "SELECT current_setting('max_connections')::int,"
            " current_setting('superuser_reserved_connections')::int,"
            " coalesce(current_setting('reserved_connections', true), '0')::int,"
            " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),"
            " (SELECT CASE WHEN rolsuper OR rolconnlimit < 0 THEN NULL ELSE rolconnlimit END"
            "  FROM pg_roles WHERE rolname = current_user),"
            " (SELECT count(*) FROM pg_stat_activity WHERE usename = current_user)"
        ).one()
    return Room(most=most, reserved=superuser + reserved, in_use=in_use - 1,
                role_most=role_most, role_in_use=role_in_use - 1)  # fmt: skip


def warn_if_short(engine: Engine, pool_most: int) -> bool:
    """Log one line when this process's pool may open more connections than PostgreSQL has to
    spare (work then waits for them); whether it did."""
    slots = room(engine)
    if slots is None or pool_most <= slots.spare:
        return False
    limit = "" if slots.role_most is None else f", the role's limit {slots.role_most}"
    log.warning(
        "the store's pool may open %d connections in this process; PostgreSQL has %d to spare "
        "(max_connections %d, %d in use, %d reserved%s), so work may wait for one: set "
        "PATIENT_DELIVERY_STORE_CONNECTIONS or max_connections as docs/operations.md "
        "('Connections') says",
        pool_most, slots.spare, slots.most, slots.in_use, slots.reserved, limit,
    )  # fmt: skip
    return True
