"""The shared work queue: claimed runs wait in the database until an instance takes them.

A run is *queued* when ``in_progress`` and no instance holds it (``instance_id`` NULL): a bulk
validation's runs, a click on an instance with no free pipeline slot, a run an instance gave
back at shutdown. Every instance takes queued runs with ``take`` (``SELECT … FOR UPDATE SKIP
LOCKED LIMIT n``: instances taking at the same time skip each other's rows instead of waiting)
and becomes their holder under a new run id. ``take`` also takes over runs whose holder is
dead (heartbeat older than the timeout, or stopped), and, as a backstop, runs whose lease
expired (a live instance that lost track of a run). A new run id on every take means a
previous holder can write nothing more (``registrations.RunLost``).

SQLite has no row locks (and ignores ``FOR UPDATE``): its transactions start with ``BEGIN
IMMEDIATE`` and so take turns, which gives the same result.

Waking up: a transaction that queues runs calls ``announce`` (PostgreSQL ``NOTIFY``, delivered
at commit); every instance ``listen``s on a dedicated connection and polls as a fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, Table, and_, or_, select, text, tuple_, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from regstream.db.tables import Instance, RegistrationRequest

CHANNEL = "regstream_work"

_REGISTRATIONS: Table = RegistrationRequest.__table__  # type: ignore[assignment]
_reg = _REGISTRATIONS.c


@dataclass(frozen=True, slots=True)
class Taken:
    """Runs ``take`` gave this instance, all under ``run_id``; ``taken_over``: how many of them
    another instance held (dead, stopped, or its lease expired)."""

    run_id: str
    rows: list[Row[Any]]
    taken_over: int


async def take(
    session: AsyncSession,
    *,
    instance_id: str,
    limit: int,
    now_ms: int,
    lease_ms: int,
    dead_before_ms: int,
) -> Taken:
    """Take up to ``limit`` runs, oldest registration first: queued ones, those held by an
    instance whose last heartbeat is before ``dead_before_ms`` (or that stopped), and those
    whose lease expired. Returns the rows as ``registrations.claim_many`` does."""
    alive = select(Instance.id).where(
        Instance.heartbeat_ms >= dead_before_ms, Instance.stopped_ms.is_(None)
    )
    candidates = await session.execute(
        select(_reg.id, _reg.instance_id)
        .where(
            _reg.in_progress,  # "= true" (indexable; "IS true" is not)
            or_(
                _reg.instance_id.is_(None),
                _reg.lease_expires_ms < now_ms,
                # not our own: a late heartbeat of ours must not take our running runs back
                and_(_reg.instance_id != instance_id, _reg.instance_id.not_in(alive)),
            ),
        )
        .order_by(_reg.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=_REGISTRATIONS)
    )
    previous = {rid: holder for rid, holder in candidates.all()}
    run_id = uuid.uuid4().hex
    if not previous:
        return Taken(run_id, [], 0)
    result = await session.execute(
        update(_REGISTRATIONS)
        .where(_reg.id.in_(list(previous)), _reg.in_progress.is_(True))
        .values(instance_id=instance_id, run_id=run_id, lease_expires_ms=now_ms + lease_ms)
        .returning(*(column for column in _reg if column.name != "result"))
    )
    rows = sorted(result.all(), key=lambda row: row.id)
    taken_over = sum(1 for row in rows if previous.get(row.id) is not None)
    return Taken(run_id, rows, taken_over)


async def release(
    session: AsyncSession, *, instance_id: str, runs: Sequence[tuple[int, str]]
) -> int:
    """Give runs ``(registration id, run id)`` this instance holds back to the queue (a
    shutdown), under a new run id: whoever takes them resumes them from the process log."""
    if not runs:
        return 0
    result = await session.execute(
        update(_REGISTRATIONS)
        .where(
            tuple_(_reg.id, _reg.run_id).in_(list(runs)),
            _reg.instance_id == instance_id,
            _reg.in_progress.is_(True),
        )
        .values(instance_id=None, run_id=uuid.uuid4().hex)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


async def announce(session: AsyncSession) -> None:
    """Tell every listening instance that runs were queued (PostgreSQL: ``NOTIFY``, sent when
    this transaction commits; SQLite: nothing, its instances poll)."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(text(f"NOTIFY {CHANNEL}"))


@contextlib.asynccontextmanager
async def listen(
    engine: AsyncEngine, on_notify: Callable[[], None]
) -> AsyncIterator[asyncio.Event]:
    """Call ``on_notify`` for every ``announce`` while inside (PostgreSQL only). Holds a
    connection of its own (LISTEN works between transactions, so it must run none); yields an
    event set when that connection is lost. The connection is closed, not pooled, on exit."""
    lost = asyncio.Event()
    connection = await engine.connect()
    try:
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None  # checked out
        driver.add_termination_listener(lambda _connection: lost.set())
        await driver.add_listener(CHANNEL, lambda *_args: on_notify())
        yield lost
    finally:
        # never back to the pool: it would keep listening for whoever uses it next
        with contextlib.suppress(Exception):
            await connection.invalidate()
        with contextlib.suppress(Exception):
            await connection.close()
