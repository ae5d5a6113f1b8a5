"""The statements that append a step's log entries (``registrations.append_events``), built once.

Appending is the pipeline's most frequent write (twice per validation). The portable form, for
both databases: the run's row is advanced (``advance``: renew the lease, move ``seq`` on by the
number of entries and return it, matching no row when the run is no longer ours; ``updated_at``
from the column's ``onupdate``), then the entries are inserted (``INSERT_LOG``, one executemany).
The duplicate check's query guards the advance (``guarded``: ``… AND NOT EXISTS (query)``, so the
usual outcome, no one enrolled, costs no statement of its own); the enrolment runs first.

On PostgreSQL each of those is a network round trip and a pass through SQLAlchemy's execution
layer, so there ``postgres`` joins them into one statement built from the same Core statements:
a data-modifying CTE (``member``, the run's ``UPDATE … RETURNING``, an ``INSERT … SELECT`` of the
entries from ``unnest`` of one array per column), so a validation's two database steps are one
statement each (what the portable form costs instead: bench/RESULTS.md, the issue-17 run).
SQLite has no data-modifying CTEs and no round trips to save: it runs the portable form.
"""

from __future__ import annotations

import functools

from sqlalchemy import (
    JSON,
    BigInteger,
    Executable,
    Integer,
    Select,
    String,
    Table,
    Text,
    bindparam,
    cast,
    exists,
    func,
    insert,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.dml import ReturningUpdate

from regstream.db import compiled
from regstream.db.tables import ProcessLogEntry, RegistrationRequest

_REGISTRATIONS: Table = RegistrationRequest.__table__  # type: ignore[assignment]
_LOG: Table = ProcessLogEntry.__table__  # type: ignore[assignment]
_reg = _REGISTRATIONS.c

_ADVANCE = (
    update(_REGISTRATIONS)
    .where(
        _reg.id == bindparam("rid", type_=BigInteger()),
        _reg.run_id == bindparam("owner", type_=String()),
        _reg.in_progress.is_(True),
    )
    .values(
        current_stage=func.coalesce(bindparam("stage", type_=String()), _reg.current_stage),
        seq=_reg.seq + bindparam("count", type_=Integer()),
        lease_expires_ms=bindparam("lease", type_=BigInteger()),
    )
    .returning(_reg.seq)
)
_FINISH = _ADVANCE.values(  # and end the run
    status=bindparam("final_status", type_=String()),
    result=bindparam("final_result", type_=_reg.result.type),
    in_progress=False,
    completed_at=func.now(),
)

#: The entries, one parameter set each (a missing ``details`` is JSON null, as the ORM writes it).
INSERT_LOG = insert(_LOG)

_LOG_COLUMNS = ("stage", "stage_status", "status", "message", "details")


def advance(*, final: bool) -> ReturningUpdate[int]:
    """The run's row moved on (``final``: and the run ended); parameters ``rid``, ``owner``,
    ``count``, ``lease``, ``stage`` (and ``final_status``, ``final_result``)."""
    return _FINISH if final else _ADVANCE


@functools.cache
def guarded(final: bool, member: Executable) -> ReturningUpdate[int]:
    """``advance`` only if the query ``member`` (built once: ``users.matching``) finds no rows:
    the duplicate check's usual outcome logged in the query's statement. No row back means the
    run is no longer ours or the query found someone (run it then to tell which)."""
    return advance(final=final).where(~exists(member))  # type: ignore[arg-type]


@functools.cache
def postgres(final: bool, member: Executable | None, guard: bool) -> Select[object]:
    """``advance`` and the entries' insert as one PostgreSQL statement, with ``member`` (a
    statement built once, ``users.matching`` or ``users.enrolment``) as a member of it. With
    ``guard``, the run's row is advanced (so the entries written) only if ``member`` finds no
    rows; then each result row is ``(step, seq, found, member's columns…)``: ``(step, NULL,
    true, …)`` per row found, or one ``(step, seq or NULL, NULL, …)``. Without it, one row
    ``(step, seq)`` or none. ``step`` is the parameter ``compiled.KEY`` given back: it tells apart
    the rows of several steps' statements sent together (``compiled.fetch_many``). Parameters:
    ``advance``'s, ``member``'s, ``compiled.KEY``, ``run``, ``ts`` and one array per entry column
    (``log_stage``, ``log_stage_status``, ``log_status``, ``log_message``, ``log_details``, the
    last as JSON text)."""
    run_update = advance(final=final)
    extra = None if member is None else member.cte("extra")  # type: ignore[attr-defined]
    if extra is not None and guard:
        run_update = run_update.where(~exists().select_from(extra))
    run = run_update.cte("run")
    entries = (
        func.unnest(*(
            cast(bindparam(f"log_{name}"), ARRAY(Text() if name == "details" else String()))
            for name in _LOG_COLUMNS  # typed in the text: unnest's arguments are polymorphic
        ))
        .table_valued(*_LOG_COLUMNS, with_ordinality="n")
        .render_derived(name="e")
    )  # fmt: skip
    rows = select(
        cast(bindparam("rid"), BigInteger()),
        run.c.seq - bindparam("count") + entries.c.n,
        cast(bindparam("run"), Integer()),
        entries.c.stage, entries.c.stage_status, entries.c.status, entries.c.message,
        cast(entries.c.details, JSON()),
        cast(bindparam("ts"), BigInteger()),
    ).select_from(run).join(entries, true())  # fmt: skip
    log = (
        insert(_LOG)
        .from_select(["registration_id", "seq", "run", *_LOG_COLUMNS, "timestamp_ms"], rows)
        .cte("log")
    )
    step = cast(bindparam(compiled.KEY), Integer()).label(compiled.KEY)
    if extra is not None and guard:
        seq = select(select(run.c.seq).scalar_subquery().label("seq")).subquery("r")
        found = select(true().label("found"), extra).subquery("f")
        joined = seq.outerjoin(found, true())
        return select(step, seq.c.seq, found).select_from(joined).add_cte(log)
    statement = select(step, run.c.seq).add_cte(log)
    return statement if extra is None else statement.add_cte(extra)
