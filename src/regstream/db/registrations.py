"""Data functions for registration requests and their process log.

A run is guarded by ``run_id`` and a lease (``lease_expires_ms``): every write a runner makes is
conditional on still owning the run, so a runner that lost its lease (a crash, a pause longer than
the lease) can never write a second final status.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Row,
    String,
    Table,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from regstream.db.tables import ProcessLogEntry, RegistrationRequest

_REGISTRATIONS: Table = RegistrationRequest.__table__  # type: ignore[assignment]
_PROCESS_LOG: Table = ProcessLogEntry.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One process-log entry, also the content of one published update."""

    registration_id: int
    seq: int
    run: int
    status: str
    message: str
    timestamp_ms: int
    stage: str | None = None
    stage_status: str | None = None
    details: dict[str, Any] | None = None


class RunLost(Exception):
    """The runner no longer owns the run (its lease expired and someone else took over)."""


async def create(session: AsyncSession, **fields: Any) -> RegistrationRequest:
    row = RegistrationRequest(status="PENDING", seq=0, run_count=0, in_progress=False, **fields)
    session.add(row)
    await session.flush()
    return row


async def get(session: AsyncSession, *, registration_id: int) -> RegistrationRequest | None:
    # populate_existing: a session shared by a group commit's steps may hold an older copy
    return await session.get(RegistrationRequest, registration_id, populate_existing=True)


async def list_page(
    session: AsyncSession,
    *,
    status: str | None = None,
    search: str | None = None,
    page: int = 1,
    page_size: int = 20,
) -> tuple[list[RegistrationRequest], int]:
    query = select(RegistrationRequest)
    if status:
        query = query.where(RegistrationRequest.status == status)
    if search:
        term = search.strip()
        like = f"%{term.lower()}%"
        conditions: list[ColumnElement[bool]] = [
            func.lower(RegistrationRequest.first_name).like(like),
            func.lower(RegistrationRequest.last_name).like(like),
        ]
        if term.isdigit():
            conditions.append(RegistrationRequest.customer_number == term)
            if len(term) <= 18:
                conditions.append(RegistrationRequest.id == int(term))
        query = query.where(or_(*conditions))
    total = await session.scalar(select(func.count()).select_from(query.subquery()))
    rows = await session.scalars(
        query.order_by(RegistrationRequest.id.desc())
        .offset((page - 1) * page_size)
        .limit(page_size)
    )
    return list(rows), int(total or 0)


async def count_by_status(session: AsyncSession, *, since: datetime) -> dict[str, int]:
    """Runs finished since ``since`` per final status, plus ``IN_PROGRESS``: runs going on now."""
    finished = await session.execute(
        select(RegistrationRequest.status, func.count())
        .where(
            RegistrationRequest.in_progress.is_(False),
            RegistrationRequest.completed_at >= since,
        )
        .group_by(RegistrationRequest.status)
    )
    counts = {str(status): int(n) for status, n in finished.all()}
    running = await session.scalar(
        select(func.count())
        .select_from(RegistrationRequest)
        .where(RegistrationRequest.in_progress.is_(True))
    )
    counts["IN_PROGRESS"] = int(running or 0)
    return counts


async def get_log(
    session: AsyncSession, *, registration_id: int, run: int | None = None
) -> list[ProcessLogEntry]:
    query = select(ProcessLogEntry).where(ProcessLogEntry.registration_id == registration_id)
    if run is not None:
        query = query.where(ProcessLogEntry.run == run)
    return list(await session.scalars(query.order_by(ProcessLogEntry.seq)))


async def claim_for_processing(
    session: AsyncSession,
    *,
    registration_id: int,
    now_ms: int,
    lease_ms: int,
    started_by: str | None,
) -> tuple[str, Row[Any]] | None:
    """Take the run if the registration may be validated now; return ``(run_id, row)`` or None.

    Allowed: a PENDING registration nobody runs, a FAILED one (re-validation), or one whose
    runner's lease expired. The single conditional UPDATE is the guard against double clicks.
    """
    claimed = await claim_many(
        session, registration_ids=[registration_id], now_ms=now_ms, lease_ms=lease_ms,
        started_by=started_by,
    )  # fmt: skip
    return claimed[0] if claimed else None


async def claim_many(
    session: AsyncSession,
    *,
    registration_ids: Sequence[int],
    now_ms: int,
    lease_ms: int,
    started_by: str | None,
) -> list[tuple[str, Row[Any]]]:
    """``claim_for_processing`` for many registrations in one statement (bulk validation).

    The claimed runs share one ``run_id``: ownership is always checked as (registration, run id).
    """
    run_id = str(uuid.uuid4())
    result = await session.execute(
        _CLAIM,
        {
            "ids": list(registration_ids), "now": now_ms, "claim_run_id": run_id,
            "claim_lease": now_ms + lease_ms, "claim_started_by": started_by,
        },
    )  # fmt: skip
    return [(run_id, row) for row in result.all()]


async def get_many(
    session: AsyncSession, *, registration_ids: Sequence[int]
) -> list[RegistrationRequest]:
    rows = await session.scalars(
        select(RegistrationRequest)
        .where(RegistrationRequest.id.in_(registration_ids))
        .execution_options(populate_existing=True)  # see ``get``
    )
    return list(rows)


async def renew_leases(
    session: AsyncSession, *, runs: Sequence[tuple[int, str]], lease_until_ms: int
) -> int:
    """Extend the leases of runs ``(registration id, run id)`` still held; returns how many."""
    if not runs:
        return 0
    reg = _REGISTRATIONS.c
    # Rows another transaction has locked are skipped (PostgreSQL; SQLite has no row locks):
    # they belong to steps being committed right now, which renew the lease themselves, and
    # waiting for them, locking the others in a different order, could deadlock with a batch.
    free = (
        select(reg.id)
        .where(
            reg.id.in_([rid for rid, _ in runs]),
            # a registration whose run id is one of ours is held by us (run ids are per claim)
            reg.run_id.in_({run_id for _, run_id in runs}),
            reg.in_progress.is_(True),
        )
        .with_for_update(skip_locked=True)
    )
    result = await session.execute(
        update(_REGISTRATIONS)
        .where(reg.id.in_(free.scalar_subquery()))
        .values(lease_expires_ms=lease_until_ms)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


async def take_over_expired(
    session: AsyncSession, *, registration_id: int, old_run_id: str, now_ms: int, lease_ms: int
) -> str | None:
    """Recovery: move an expired run to a new run id (same run number). None if someone won."""
    new_run_id = str(uuid.uuid4())
    result = await session.execute(
        update(RegistrationRequest)
        .where(
            RegistrationRequest.id == registration_id,
            RegistrationRequest.run_id == old_run_id,
            RegistrationRequest.in_progress.is_(True),
            RegistrationRequest.lease_expires_ms < now_ms,
        )
        .values(run_id=new_run_id, lease_expires_ms=now_ms + lease_ms)
    )
    return new_run_id if result.rowcount == 1 else None  # type: ignore[attr-defined]


async def list_expired_runs(
    session: AsyncSession, *, now_ms: int, limit: int = 500
) -> Sequence[RegistrationRequest]:
    rows = await session.scalars(
        select(RegistrationRequest)
        .where(
            RegistrationRequest.in_progress.is_(True),
            RegistrationRequest.lease_expires_ms < now_ms,
        )
        .order_by(RegistrationRequest.id)
        .limit(limit)
    )
    return list(rows)


async def append_events(
    session: AsyncSession,
    *,
    registration_id: int,
    run_id: str,
    run: int,
    events: Sequence[tuple[str | None, str | None, str, str, dict[str, Any] | None]],
    now_ms: int,
    lease_ms: int,
    final: tuple[str, dict[str, Any]] | None = None,
) -> list[LogEvent]:
    """Append events ``(stage, stage_status, status, message, details)`` to the log, in order.

    Numbers them with the registration's next ``seq`` values and renews the lease. With ``final``
    (``(status, result)``), also ends the run in the same statement. Raises ``RunLost`` when the
    runner no longer owns the run.
    """
    count = len(events)
    params: dict[str, Any] = {
        "rid": registration_id, "owner": run_id, "count": count,
        "lease": now_ms + lease_ms,
        "stage": next((e[0] for e in reversed(events) if e[0] is not None), None),
    }  # fmt: skip
    if final is not None:
        params.update(new_status=final[0], new_result=final[1])
    result = await session.execute(_ADVANCE if final is None else _FINISH, params)
    last_seq = result.scalar_one_or_none()
    if last_seq is None:
        raise RunLost(f"registration {registration_id}: run {run_id} is no longer ours")
    first_seq = int(last_seq) - count + 1
    out = [
        LogEvent(
            registration_id=registration_id,
            seq=first_seq + i,
            run=run,
            stage=stage,
            stage_status=stage_status,
            status=status,
            message=message,
            details=details,
            timestamp_ms=now_ms,
        )
        for i, (stage, stage_status, status, message, details) in enumerate(events)
    ]
    await session.execute(
        _INSERT_LOG,
        [
            {
                "registration_id": e.registration_id, "seq": e.seq, "run": e.run,
                "stage": e.stage, "stage_status": e.stage_status, "status": e.status,
                "message": e.message, "details": e.details, "timestamp_ms": e.timestamp_ms,
            }
            for e in out
        ],
    )  # fmt: skip
    return out


# The run's hot-path statements, built once: Core (no ORM identity-map synchronisation) and
# prebuilt with bind parameters (no statement construction or cache-key work per call; profiled).
_reg = _REGISTRATIONS.c
_OWNED_RUN = (
    _reg.id == bindparam("rid"), _reg.run_id == bindparam("owner"), _reg.in_progress.is_(True)
)  # fmt: skip
_ADVANCE_VALUES = {
    "seq": _reg.seq + bindparam("count", type_=Integer()),
    "lease_expires_ms": bindparam("lease", type_=BigInteger()),
    "current_stage": func.coalesce(bindparam("stage", type_=String()), _reg.current_stage),
}
_ADVANCE = update(_REGISTRATIONS).where(*_OWNED_RUN).values(**_ADVANCE_VALUES).returning(_reg.seq)
_FINISH = (
    update(_REGISTRATIONS)
    .where(*_OWNED_RUN)
    .values(
        **_ADVANCE_VALUES,
        status=bindparam("new_status", type_=String()),
        result=bindparam("new_result", type_=_reg.result.type),
        in_progress=False,
        completed_at=func.now(),
    )
    .returning(_reg.seq)
)
_INSERT_LOG = insert(_PROCESS_LOG)
# every click runs it (single clicks too: building it per call was ~3 % of a click's CPU)
_CLAIM = (
    update(_REGISTRATIONS)
    .where(
        _reg.id.in_(bindparam("ids", expanding=True)),
        _reg.status.in_(("PENDING", "FAILED")),
        or_(_reg.in_progress.is_(False), _reg.lease_expires_ms < bindparam("now", BigInteger())),
    )
    .values(
        in_progress=True,
        status="PENDING",
        run_id=bindparam("claim_run_id", String()),
        run_count=_reg.run_count + 1,
        lease_expires_ms=bindparam("claim_lease", BigInteger()),
        started_by=bindparam("claim_started_by", String()),
        current_stage=None,
        result=None,
        completed_at=None,
    )
    .returning(*_reg)
)


def to_log_event(entry: ProcessLogEntry) -> LogEvent:
    return LogEvent(
        registration_id=entry.registration_id,
        seq=entry.seq,
        run=entry.run,
        stage=entry.stage,
        stage_status=entry.stage_status,
        status=entry.status,
        message=entry.message,
        details=entry.details,
        timestamp_ms=entry.timestamp_ms,
    )


def parse_date(value: str) -> date:
    return date.fromisoformat(value)
