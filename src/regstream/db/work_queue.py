"""The shared work queue: claimed runs wait in the database until an instance takes them.

A run is *queued* when ``in_progress`` and no instance holds it (``instance_id`` NULL): a bulk
validation's runs, a click on an instance with no free pipeline slot, a run an instance gave
back at shutdown. Every instance takes queued runs with ``take`` (one prebuilt statement on
PostgreSQL: ``UPDATE … FROM (SELECT … ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED) RETURNING``
the rows and their previous holder; instances taking at the same time skip each other's rows
instead of waiting) and becomes their holder under a new run id. ``take`` also takes over runs whose holder is
dead (heartbeat older than the timeout, or stopped), and, as a backstop, runs whose lease
expired (a live instance that lost track of a run). A new run id on every take means a
previous holder can write nothing more (``registrations.RunLost``).

SQLite has no row locks (and ignores ``FOR UPDATE``): its transactions start with ``BEGIN
IMMEDIATE`` and so take turns, which gives the same result. Its ``RETURNING`` cannot name a
``FROM``'s columns, so there the take is two prebuilt statements (the candidates, then the
update of those).

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

from sqlalchemy import (
    BigInteger,
    Integer,
    Row,
    String,
    Table,
    and_,
    bindparam,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from regstream.db.tables import Instance, RegistrationRequest

CHANNEL = "regstream_work"

_REGISTRATIONS: Table = RegistrationRequest.__table__  # type: ignore[assignment]
_reg = _REGISTRATIONS.c
_INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
_inst = _INSTANCES.c


@dataclass(frozen=True, slots=True)
class Taken:
    """Runs ``take`` gave this instance, all under ``run_id``; ``taken_over``: how many of them
    another instance held (dead, stopped, or its lease expired)."""

    run_id: str
    rows: list[Row[Any]]
    taken_over: int


# One prebuilt statement per take (building the SELECT and the UPDATE per take was ~15 % of the
# group commit's CPU in a bulk, py-spy). The candidates: in progress (``= true`` is indexable,
# ``IS true`` is not) and queued, or held by a dead or stopped instance (never ours: a late
# heartbeat of ours must not take our running runs back), or with an expired lease; oldest
# first; rows another taker locked are skipped (PostgreSQL).
_alive = select(_inst.id).where(
    _inst.heartbeat_ms >= bindparam("take_dead_before", type_=BigInteger()),
    _inst.stopped_ms.is_(None),
)
_taker = bindparam("take_instance", type_=String())
_CANDIDATES = (
    select(_reg.id, _reg.instance_id.label("previous"))
    .where(
        _reg.in_progress,
        or_(
            _reg.instance_id.is_(None),
            _reg.lease_expires_ms < bindparam("take_now", type_=BigInteger()),
            and_(_reg.instance_id != _taker, _reg.instance_id.not_in(_alive)),
        ),
    )
    .order_by(_reg.id)
    .limit(bindparam("take_limit", type_=Integer()))
    .with_for_update(skip_locked=True, of=_REGISTRATIONS)
)
_NEW_HOLDER = {
    "instance_id": _taker,
    "run_id": bindparam("take_run_id", type_=String()),
    "lease_expires_ms": bindparam("take_lease", type_=BigInteger()),
}
#: the taken rows as ``registrations.claim_many`` returns them (not ``result``: a JSON column
#: decoded per row for nothing)
_RETURNED = tuple(column for column in _reg if column.name != "result")
_found = _CANDIDATES.subquery("found")
#: PostgreSQL: ``UPDATE … FROM (SELECT … FOR UPDATE SKIP LOCKED LIMIT n) RETURNING`` the rows
#: and their previous holder, one round trip
_TAKE = (
    update(_REGISTRATIONS)
    .where(_reg.id == _found.c.id)
    .values(_NEW_HOLDER)
    .returning(*_RETURNED, _found.c.previous)
)
#: SQLite: its RETURNING cannot name the FROM's columns (the previous holder), so the
#: candidates, then the update of those found (its transactions take turns: nobody in between)
_TAKE_FOUND = (
    update(_REGISTRATIONS)
    .where(_reg.id.in_(bindparam("take_ids", expanding=True)), _reg.in_progress.is_(True))
    .values(_NEW_HOLDER)
    .returning(*_RETURNED)
)


def take_sync(
    session: Session,
    *,
    instance_id: str,
    limit: int,
    now_ms: int,
    lease_ms: int,
    dead_before_ms: int,
) -> Taken:
    """Take up to ``limit`` runs, oldest registration first: queued ones, those held by an
    instance whose last heartbeat is before ``dead_before_ms`` (or that stopped), and those
    whose lease expired. Returns the rows as ``registrations.claim_many`` does (on PostgreSQL
    with one more column, ``previous``: the holder before). A sync step (``run_sync``)."""
    run_id = uuid.uuid4().hex
    params: dict[str, Any] = {
        "take_instance": instance_id, "take_dead_before": dead_before_ms, "take_now": now_ms,
        "take_limit": limit, "take_run_id": run_id, "take_lease": now_ms + lease_ms,
    }  # fmt: skip
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        rows = list(conn.execute(_TAKE, params))
        taken_over = sum(1 for row in rows if row.previous is not None)
    else:
        previous = {rid: holder for rid, holder in conn.execute(_CANDIDATES, params).all()}
        if not previous:
            return Taken(run_id, [], 0)
        rows = list(conn.execute(_TAKE_FOUND, {**params, "take_ids": list(previous)}))
        taken_over = sum(1 for row in rows if previous.get(row.id) is not None)
    rows.sort(key=lambda row: row.id)
    return Taken(run_id, rows, taken_over)


async def take(session: AsyncSession, **fields: Any) -> Taken:
    """``take_sync`` (its keyword arguments) in an ``AsyncSession``."""
    return await session.run_sync(take_sync, **fields)


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
