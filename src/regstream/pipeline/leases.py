"""The leases of the runs an instance holds: renewed while it holds them, given back at shutdown.

A run's lease (``REGSTREAM_LEASE_SECONDS``) is renewed at every step (``registrations
.append_events``) and, for every run the instance holds (queued for a pipeline slot or running),
every half lease (``renew``): a backstop that only expires for a run a live instance lost track
of, which another take then resumes (``recovery``). At shutdown the runs still held go back to the
shared queue (``release``), so other instances resume them at once instead of after the heartbeat
timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from regstream import metrics
from regstream.db import registrations, work_queue
from regstream.pipeline.persist import Run, now_ms

log = logging.getLogger(__name__)

#: runs renewed per statement
_CHUNK = 500


async def renew(
    sessions: async_sessionmaker[AsyncSession], runs: Sequence[Run], *, lease_ms: int
) -> int:
    """Renew the lease of ``runs`` by ``lease_ms`` from now; returns how many were renewed (a run
    taken over by another instance is not)."""
    renewed = 0
    for start in range(0, len(runs), _CHUNK):
        chunk = runs[start : start + _CHUNK]
        async with sessions.begin() as session:
            renewed += await registrations.renew_leases(
                session, runs=[(r.registration_id, r.run_id) for r in chunk],
                lease_until_ms=now_ms() + lease_ms,
            )  # fmt: skip
    return renewed


async def release(
    sessions: async_sessionmaker[AsyncSession], runs: Sequence[Run], *, instance_id: str
) -> None:
    """Give ``runs`` back to the shared queue and wake the fleet; on a database error they are
    taken over after the heartbeat timeout instead (logged)."""
    if not runs:
        return
    try:
        async with sessions.begin() as session:
            released = await work_queue.release(
                session, instance_id=instance_id,
                runs=[(r.registration_id, r.run_id) for r in runs],
            )  # fmt: skip
            await work_queue.announce(session)
    except Exception as exc:  # noqa: BLE001 - they are taken over after the timeout
        log.warning("could not give %d runs back to the queue: %s", len(runs), type(exc).__name__)
        return
    metrics.RUNS_RELEASED.inc(released)
    log.info("gave %d runs back to the shared queue", released)
