"""Data functions for ``instances``: one row per ``regstream serve`` process and its heartbeat.

An instance registers at start, beats every ``REGSTREAM_HEARTBEAT_INTERVAL`` and marks itself
stopped on a clean shutdown. Another instance takes over the runs of one whose heartbeat is
older than ``REGSTREAM_HEARTBEAT_TIMEOUT`` or that stopped (``work_queue.take``). Epoch
milliseconds, like ``lease_expires_ms``: the instances compare them with their own clocks, so
the fleet's clocks must agree to well within the timeout (NTP does).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from regstream.db.tables import Instance

#: rows of instances gone longer than this are deleted when another one starts
KEEP_GONE_MS = 7 * 24 * 3600 * 1000


async def register(
    session: AsyncSession, *, instance_id: str, host: str, pid: int, version: str, now_ms: int
) -> None:
    """Add this instance (alive as of ``now_ms``), and forget those gone for a week."""
    await session.execute(
        delete(Instance).where(
            or_(
                Instance.stopped_ms < now_ms - KEEP_GONE_MS,
                Instance.heartbeat_ms < now_ms - KEEP_GONE_MS,
            )
        )
    )
    session.add(Instance(id=instance_id, host=host[:255], pid=pid, version=version[:32],
                         heartbeat_ms=now_ms))  # fmt: skip
    await session.flush()


async def beat(session: AsyncSession, *, instance_id: str, now_ms: int) -> bool:
    """Record that the instance is alive. False: its row is gone or marked stopped."""
    result = await session.execute(
        update(Instance)
        .where(Instance.id == instance_id, Instance.stopped_ms.is_(None))
        .values(heartbeat_ms=now_ms)
    )
    return int(result.rowcount) == 1  # type: ignore[attr-defined]


async def mark_stopped(session: AsyncSession, *, instance_id: str, now_ms: int) -> None:
    """A clean shutdown: the others may take over whatever it still holds at once."""
    await session.execute(
        update(Instance).where(Instance.id == instance_id).values(stopped_ms=now_ms)
    )


async def list_all(session: AsyncSession) -> Sequence[Instance]:
    """Every known instance, the most recently started first (for operators)."""
    return list(await session.scalars(select(Instance).order_by(Instance.started_at.desc())))
