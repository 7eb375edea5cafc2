"""The sending engine behind the delivery flow. The flow calls only this interface:

    with engine.run(run_id, limits) as run:       the run's engine in this process; closes
                                                  every session it opened when the run ends
        run.destinations(claimed)                 a page's blocks, read together (an exception
                                                  for one that cannot be used); opens the first
                                                  sessions while the page's paths render
        run.plan(ready, batch)                    the page's upload tasks: lanes, wave by wave
        run.send(lanes, batch)                    -> a report per destination
        run.manifests_owed(project, destinations) whether manifests are owed (an earlier run's
                                                  too)
        run.write_manifests()                     last: the destinations whose manifest was not
                                                  written

A `Run` passed to a task on a Dask worker arrives there as its id: the worker joins the run
with sessions of its own (`runs.joined`), and closes them once unused.

What may happen at once, each bound kept by one mechanism:

    a destination   its `max_connections` sessions, lent to one lane at a time; until one has
                    opened the others wait for it (`sessions.SessionPool`)
    a run           its `max_sessions` sessions open, idle ones included, and as many threads
                    (its lanes) sending and opening sessions ahead (`budget.SessionBudget`,
                    `runs.Run`)
    a process       `PATIENT_DELIVERY_MAX_SESSIONS` sessions open over every run; an idle one
                    is closed when another needs its place (`runs.process_budget`)
    this machine    its disk writers: the process's threads that send to local folders
                    (`limits.ProcessLimits`)

The rest stays inside: how a page becomes lanes and waves (`waves`), how a lane sends in
batches and rounds (`sending`), retries (`retries`) and manifests (`manifests`).
"""

from __future__ import annotations

from patient_delivery.flows.engine.limits import RunLimits
from patient_delivery.flows.engine.runs import Run, run
from patient_delivery.flows.engine.waves import Lane

__all__ = ["Lane", "Run", "RunLimits", "run"]
