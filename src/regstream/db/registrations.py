"""Data functions for registration requests and their process log.

A run is guarded by ``run_id``: every write a runner makes is conditional on still owning the run
(``registrations.run_id``), and whoever takes a run over gives it a new run id
(``work_queue.take``), so a runner that lost its run (its instance was taken for dead, its lease
expired) can never write a second final status.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Executable,
    Row,
    String,
    Table,
    and_,
    bindparam,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from regstream.db import compiled, log_append
from regstream.db.tables import ProcessLogEntry, RegistrationRequest

_REGISTRATIONS: Table = RegistrationRequest.__table__  # type: ignore[assignment]


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


#: A log entry to append: ``(stage, stage_status, status, message, details)``.
Event = tuple[str | None, str | None, str, str, dict[str, Any] | None]


class RunLost(Exception):
    """The runner no longer owns the run (its lease expired and someone else took over)."""


@dataclass(frozen=True, slots=True)
class Bound:
    """A statement built once with this call's parameters, handed to another data function to
    run in its transaction (``users.matching``, ``users.enrolment`` with ``append_events``)."""

    statement: Executable
    params: dict[str, Any]


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
        # the term is text to find, not a pattern: "%" and "_" match themselves
        escaped = term.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        like = f"%{escaped}%"
        conditions: list[ColumnElement[bool]] = [
            func.lower(RegistrationRequest.first_name).like(like, escape="\\"),
            func.lower(RegistrationRequest.last_name).like(like, escape="\\"),
        ]
        if term.isascii() and term.isdigit():
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


async def changed_since(
    session: AsyncSession, *, since: datetime, after_id: int, limit: int
) -> list[tuple[int, int]]:
    """``(id, seq)`` of registrations with log entries whose row changed at or after ``since``
    (an aware UTC time), in id order after ``after_id``: the start-up catch-up's pages."""
    if session.get_bind().dialect.name == "sqlite":  # CURRENT_TIMESTAMP: naive UTC text
        since = since.astimezone(UTC).replace(tzinfo=None)
    rows = await session.execute(
        select(RegistrationRequest.id, RegistrationRequest.seq)
        .where(
            RegistrationRequest.updated_at >= since,
            RegistrationRequest.seq > 0,
            RegistrationRequest.id > after_id,
        )
        .order_by(RegistrationRequest.id)
        .limit(limit)
    )
    return [(int(rid), int(seq)) for rid, seq in rows.all()]


async def log_after(
    session: AsyncSession, *, after: dict[int, int], since_ms: int
) -> list[LogEvent]:
    """The log entries of these registrations above their seq (``after``: id → seq), written at
    or after ``since_ms``, by registration and seq (through ``uq_process_log_seq``)."""
    if not after:
        return []
    rows = await session.scalars(
        select(ProcessLogEntry)
        .where(
            or_(*(
                and_(ProcessLogEntry.registration_id == rid, ProcessLogEntry.seq > seq)
                for rid, seq in after.items()
            )),
            ProcessLogEntry.timestamp_ms >= since_ms,
        )
        .order_by(ProcessLogEntry.registration_id, ProcessLogEntry.seq)
    )  # fmt: skip
    return [to_log_event(entry) for entry in rows]


async def claim_for_processing(
    session: AsyncSession,
    *,
    registration_id: int,
    now_ms: int,
    lease_ms: int,
    started_by: str | None,
    instance_id: str | None = None,
) -> tuple[str, Row[Any]] | None:
    """Take the run if the registration may be validated now; return ``(run_id, row)`` or None.

    Allowed: a PENDING registration nobody runs, or a FAILED one (re-validation); a run in
    progress never (an abandoned one is resumed by ``work_queue.take``). The single conditional
    UPDATE is the guard against double clicks. ``instance_id``: the instance that runs it at
    once; None queues it (``work_queue``).
    """
    claimed = await claim_many(
        session, registration_ids=[registration_id], now_ms=now_ms, lease_ms=lease_ms,
        started_by=started_by, instance_id=instance_id,
    )  # fmt: skip
    return claimed[0] if claimed else None


async def claim_many(
    session: AsyncSession,
    *,
    registration_ids: Sequence[int],
    now_ms: int,
    lease_ms: int,
    started_by: str | None,
    instance_id: str | None = None,
) -> list[tuple[str, Row[Any]]]:
    """``claim_for_processing`` for many registrations in one statement (bulk validation).

    The claimed runs share one ``run_id``: ownership is always checked as (registration, run id).
    """
    run_id = str(uuid.uuid4())
    result = await session.execute(
        _CLAIM,
        {
            "ids": list(registration_ids), "claim_run_id": run_id,
            "claim_lease": now_ms + lease_ms, "claim_started_by": started_by,
            "claim_instance": instance_id,
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
    """Extend the leases of runs ``(registration id, run id)`` still held; returns how many.
    (A backstop since the heartbeat: ``work_queue.take`` takes a run whose lease expired even
    from a live instance, which then lost track of it.)"""
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


async def append_events(
    session: AsyncSession, *, also: Bound | None = None, **fields: Any
) -> list[LogEvent]:
    """Append events ``(stage, stage_status, status, message, details)`` to the log, in order
    (``Append``'s fields by name: ``registration_id``, ``run_id``, ``run``, ``events``,
    ``now_ms``, ``lease_ms``, optionally ``final``).

    Numbers them with the registration's next ``seq`` values and renews the lease. With ``final``
    (``(status, result)``), also ends the run in the same statement. ``also`` is a write that
    belongs with these entries (the enrolment that goes with APPROVED): on PostgreSQL it is part
    of the same statement (``log_append``), one round trip. Raises ``RunLost`` when the runner
    no longer owns the run (the caller's transaction then rolls back, ``also`` with it).
    """
    return await session.run_sync(Append(member=also, **fields).written)


async def append_events_unless(
    session: AsyncSession, *, unless: Bound, **fields: Any
) -> tuple[list[LogEvent] | None, list[tuple[Any, ...]]]:
    """``append_events`` only if the query ``unless`` finds no rows (the duplicate check's common
    case: no enrolled user matches, so log that, in the query's round trip on PostgreSQL).
    Returns ``(entries, [])`` when it appended, ``(None, rows)`` when the query found ``rows``
    and nothing was written."""
    return await session.run_sync(Append(member=unless, guard=True, **fields).execute)


#: what an append gives: the entries written, or None and the guard query's rows
Appended = tuple[list[LogEvent] | None, list[tuple[Any, ...]]]


@dataclass(slots=True)
class Append:
    """One append (``append_events``; with ``guard``, ``append_events_unless``): run in a sync
    session (``execute``), or, on PostgreSQL, one statement (``statement``) that the group
    commit may send together with other steps' (``GroupCommit.run_after``), then its rows read
    (``result``). ``member``: the write that goes with the entries (``also``) or, with
    ``guard``, the query that must find no rows (``unless``). ``now_ms``: the entries' time and
    the lease's start; None: the clock's when it runs (``execute``, ``statement``), not when
    the step was queued (a queue that waited must not write a lease that has run out)."""

    registration_id: int
    run_id: str
    run: int
    events: Sequence[Event]
    now_ms: int | None
    lease_ms: int
    final: tuple[str, dict[str, Any]] | None = None
    member: Bound | None = None
    guard: bool = False
    _at: int = field(default=0, init=False, repr=False)  # the time of this execution

    def __post_init__(self) -> None:
        if not self.events:
            raise ValueError("nothing to append")
        if self.guard and self.member is None:
            raise ValueError("a guarded append needs its query")

    def execute(self, session: Session) -> Appended:
        """The append in ``session``: one hop into SQLAlchemy's greenlet (or one thread,
        ``GroupCommit.run_sync``) for all its statements, not one per statement (~40 us of CPU
        each, measured on PostgreSQL). Core statements go to the session's ``Connection``: the
        ORM's execute path adds nothing to them."""
        conn = session.connection()
        if conn.dialect.name == "postgresql":  # one statement (``log_append.postgres``)
            statement, params = self.statement()
            return self.result(compiled.fetch(conn, statement, params))
        self._stamp()
        params = self._params()
        if self.final is not None:
            params["final_result"] = self.final[1]
        member = self.member
        found: list[tuple[Any, ...]] = []
        if member is not None and self.guard:  # the query guards the advance: one statement
            advance = log_append.guarded(self.final is not None, member.statement)
            seq = conn.execute(advance, {**params, **member.params}).scalar()
            if seq is None:  # the run is lost, or the query found someone: which?
                found = [tuple(row) for row in conn.execute(member.statement, member.params)]
        else:
            if member is not None:
                conn.execute(member.statement, member.params)
            seq = conn.execute(log_append.advance(final=self.final is not None), params).scalar()
        logged, found = self._numbered(seq, found)
        if logged is not None:
            conn.execute(
                log_append.INSERT_LOG,
                [
                    {"registration_id": e.registration_id, "seq": e.seq, "run": e.run,
                     "stage": e.stage, "stage_status": e.stage_status, "status": e.status,
                     "message": e.message, "details": e.details, "timestamp_ms": e.timestamp_ms}
                    for e in logged
                ],
            )  # fmt: skip
        return logged, found

    def statement(self) -> tuple[Executable, dict[str, Any]]:
        """The PostgreSQL statement and its parameters, as the driver takes them
        (``compiled``: JSON as text): the member, the run's row and its log rows in one."""
        self._stamp()
        params = self._params()
        if self.final is not None:
            params["final_result"] = json.dumps(self.final[1])
        member = self.member
        if member is not None:
            params.update(member.params)
        params.update({compiled.KEY: 0, "run": self.run, "ts": self._at})
        events = self.events
        for i, name in enumerate(("stage", "stage_status", "status", "message")):
            params[f"log_{name}"] = [e[i] for e in events]
        params["log_details"] = [json.dumps(e[4]) for e in events]  # JSON text, cast there
        statement = log_append.postgres(
            self.final is not None, None if member is None else member.statement, self.guard
        )
        return statement, params

    def result(self, rows: list[tuple[Any, ...]]) -> Appended:
        """What ``statement``'s rows say (``log_append.postgres``: ``(step, seq, …)``)."""
        found = [row[3:] for row in rows if row[2]] if self.guard else []
        return self._numbered(rows[0][1] if rows else None, found)

    def written(self, session: Session) -> list[LogEvent]:
        """``execute`` an unguarded append: the entries written."""
        if self.guard:
            raise ValueError("a guarded append may write nothing: use execute")
        logged, _ = self.execute(session)
        assert logged is not None  # no guard
        return logged

    def _stamp(self) -> None:
        self._at = self.now_ms if self.now_ms is not None else time.time_ns() // 1_000_000

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "rid": self.registration_id, "owner": self.run_id, "count": len(self.events),
            "lease": self._at + self.lease_ms,
            "stage": next((e[0] for e in reversed(self.events) if e[0] is not None), None),
        }  # fmt: skip
        if self.final is not None:
            params["final_status"] = self.final[0]
        return params

    def _numbered(self, seq: Any, found: list[tuple[Any, ...]]) -> Appended:
        """The entries numbered up to ``seq`` (the run's after the append); ``(None, found)``
        when the guard query found rows; ``RunLost`` when nothing was advanced."""
        if found:
            return None, found
        if seq is None:
            raise RunLost(
                f"registration {self.registration_id}: run {self.run_id} is no longer ours"
            )
        logged = numbered(
            self.events, registration_id=self.registration_id, run=self.run,
            last_seq=int(seq), timestamp_ms=self._at,
        )  # fmt: skip
        return logged, []


def numbered(
    events: Sequence[Event],
    *,
    registration_id: int,
    run: int,
    last_seq: int,
    timestamp_ms: int,
) -> list[LogEvent]:
    """The log entries for ``events``, numbered up to ``last_seq`` (the registration's ``seq``
    after the append)."""
    first_seq = last_seq - len(events) + 1
    return [
        LogEvent(
            registration_id=registration_id,
            seq=first_seq + i,
            run=run,
            stage=stage,
            stage_status=stage_status,
            status=status,
            message=message,
            details=details,
            timestamp_ms=timestamp_ms,
        )
        for i, (stage, stage_status, status, message, details) in enumerate(events)
    ]


_reg = _REGISTRATIONS.c
# every click runs it (single clicks too: building it per call was ~3 % of a click's CPU)
_CLAIM = (
    update(_REGISTRATIONS)
    .where(
        _reg.id.in_(bindparam("ids", expanding=True)),
        _reg.status.in_(("PENDING", "FAILED")),
        _reg.in_progress.is_(False),
    )
    .values(
        in_progress=True,
        status="PENDING",
        run_id=bindparam("claim_run_id", type_=String()),
        run_count=_reg.run_count + 1,
        lease_expires_ms=bindparam("claim_lease", type_=BigInteger()),
        started_by=bindparam("claim_started_by", type_=String()),
        instance_id=bindparam("claim_instance", type_=String()),
        current_stage=None,
        result=None,
        completed_at=None,
    )
    # the claimed row but its result, which the claim just cleared (a JSON column, decoded per
    # row for nothing)
    .returning(*(column for column in _reg if column.name != "result"))
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
