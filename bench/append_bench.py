"""Append micro-benchmark: client CPU per ``append_events``, SQLAlchemy Core vs the driver.

  taskset -c 0 .venv/bin/python bench/append_bench.py
  taskset -c 0 .venv/bin/python bench/append_bench.py \\
      --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/append_bench

Appending a pipeline step's log entries is the pipeline's most frequent write. Commit 9f66f23
moved it from two SQLAlchemy Core statements through ``session.execute`` (an ``UPDATE ...
RETURNING`` of the run's row, then an insert of the log rows) to hand-written SQL on the database
driver (``regstream.db.driver``: PostgreSQL one data-modifying CTE, SQLite ``UPDATE ...
RETURNING`` then ``executemany``). This measures both in one process:

- ``sqlalchemy``: the pre-9f66f23 ``append_events``, reproduced here (the same prebuilt Core
  statements ``_ADVANCE`` and ``_INSERT_LOG``, ``session.execute(stmt, params)``, then
  ``session.execute(insert, [rows])``);
- ``driver``: ``regstream.db.registrations.append_events`` as it is now;
- ``query+append``: the duplicate check's step before its query rode in the append's statement:
  ``users.matching`` run on its own (a query that matches no one), then ``append_events``;
- ``combined``: the same step now, ``append_events_unless`` with ``users.matching`` as its query
  (on PostgreSQL one statement, one round trip).

Set-up (not timed): the schema by the migrations (``--database-url``, default a SQLite file in a
temp dir), 50 registrations created and claimed with ``claim_many`` (a real ``run_id``,
``in_progress`` true, a lease an hour ahead so no run is ever lost), one unmeasured transaction
per variant to warm caches and prepared statements. Then per rep, the variants interleaved (their
order alternating rep by rep): ``-n / 50`` transactions (``sessions.begin()``), each appending
``--events`` entries to every one of the 50 registrations once, with ``now_ms`` the current time
and a 60 s lease renewal as the runner passes them. ``time.process_time()`` around the rep gives
the CPU of this process (all its threads; on PostgreSQL the server's CPU is not counted) per
append; wall time is reported too (on PostgreSQL it includes the round trips). After each rep
the bench checks that the variant wrote: every registration's ``seq`` moved on by
``n / 50 * events`` and ``process_log`` grew by ``n * events`` rows (it fails otherwise).
Prints per variant the reps and the median µs per append, the ratios driver/sqlalchemy and
combined/query+append (medians of the per-rep ratios; the latter for CPU and for wall time), and
appends one JSON line to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import date
from typing import Any

from sqlalchemy import BigInteger, Integer, String, bindparam, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from regstream.db import driver, registrations, users
from regstream.db.engine import create_engine, create_session_factory, migrate
from regstream.db.registrations import LogEvent, RunLost
from regstream.db.tables import ProcessLogEntry, RegistrationRequest
from regstream.domain.enums import Stage, StageStatus

BENCH = os.path.dirname(os.path.abspath(__file__))
REGISTRATIONS = 50
CLAIM_LEASE_MS = 3_600_000  # the claim's lease: an hour, far beyond a run of the bench
LEASE_MS = 60_000  # each append renews the lease by this much (the runner's default lease)
FIELDS = dict(
    customer_number="100231", account_number=None, first_name="Maria", last_name="Santos",
    date_of_birth=date(1988, 4, 2), national_id="27841236", id_type="NATIONAL.ID",
    phone="+254712345678", email="maria@example.com", device_id=None,
)  # fmt: skip

Event = tuple[str | None, str | None, str, str, dict[str, Any] | None]

# ---- the pre-9f66f23 implementation (git show 9f66f23^:src/regstream/db/registrations.py)
_REGISTRATIONS = RegistrationRequest.__table__
_PROCESS_LOG = ProcessLogEntry.__table__
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
_INSERT_LOG = insert(_PROCESS_LOG)


async def append_events_sqlalchemy(
    session: AsyncSession,
    *,
    registration_id: int,
    run_id: str,
    run: int,
    events: Sequence[Event],
    now_ms: int,
    lease_ms: int,
) -> list[LogEvent]:
    """The old body of ``append_events`` without ``final`` (the bench never ends a run)."""
    count = len(events)
    params: dict[str, Any] = {
        "rid": registration_id, "owner": run_id, "count": count,
        "lease": now_ms + lease_ms,
        "stage": next((e[0] for e in reversed(events) if e[0] is not None), None),
    }  # fmt: skip
    result = await session.execute(_ADVANCE, params)
    last_seq = result.scalar_one_or_none()
    if last_seq is None:
        raise RunLost(f"registration {registration_id}: run {run_id} is no longer ours")
    out = registrations.numbered(
        events, registration_id=registration_id, run=run, last_seq=int(last_seq),
        timestamp_ms=now_ms,
    )  # fmt: skip
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


# The duplicate check's step: its query (no enrolled user matches, the common case), then the
# append, as two statements (before the query rode in the append's statement), or as one.
_NOBODY = {"customer_number": "0", "phone": "+0", "national_id_hashes": ["0" * 64]}


async def query_then_append(session: AsyncSession, **append: Any) -> list[LogEvent]:
    query = users.matching(**_NOBODY)
    if await (await driver.of(session)).fetch_all(query.statement, query.args):
        raise AssertionError("the bench's query matched an enrolled user")
    return await registrations.append_events(session, **append)


async def append_unless_query(session: AsyncSession, **append: Any) -> list[LogEvent]:
    logged, rows = await registrations.append_events_unless(
        session, unless=users.matching(**_NOBODY), **append
    )
    if logged is None:
        raise AssertionError(f"the bench's query matched {len(rows)} enrolled users")
    return logged


VARIANTS: dict[str, Callable[..., Awaitable[list[LogEvent]]]] = {
    "sqlalchemy": append_events_sqlalchemy,
    "driver": registrations.append_events,
    "query+append": query_then_append,
    "combined": append_unless_query,
}


def step_events(k: int) -> list[Event]:
    """``k`` entries like a pipeline step's: a stage completed, the next started, with details."""
    pattern: list[Event] = [
        (Stage.DUPLICATE_CHECK.value, StageStatus.COMPLETED.value, "PENDING",
         "No duplicate found", None),
        (Stage.T24_LOOKUP.value, StageStatus.STARTED.value, "PENDING",
         "Looking up the customer in T24", None),
        (Stage.T24_LOOKUP.value, StageStatus.COMPLETED.value, "PENDING",
         "Customer found in T24", {"accountsFound": 2}),
    ]  # fmt: skip
    return [pattern[i % len(pattern)] for i in range(k)]


async def written(sessions: Any, ids: list[int]) -> tuple[dict[int, int], int]:
    """Every registration's ``seq`` and the number of their log rows."""
    async with sessions() as session:
        seqs = dict(
            (await session.execute(select(_reg.id, _reg.seq).where(_reg.id.in_(ids)))).all()
        )
        rows = await session.scalar(
            select(func.count())
            .select_from(_PROCESS_LOG)
            .where(_PROCESS_LOG.c.registration_id.in_(ids))
        )
    return {int(k): int(v) for k, v in seqs.items()}, int(rows or 0)


async def bench(args: argparse.Namespace, url: str) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        await migrate(engine)
        sessions = create_session_factory(engine)
        async with sessions.begin() as session:
            ids = [(await registrations.create(session, **FIELDS)).id for _ in range(REGISTRATIONS)]
        async with sessions.begin() as session:
            claimed = await registrations.claim_many(
                session, registration_ids=ids, now_ms=time.time_ns() // 1_000_000,
                lease_ms=CLAIM_LEASE_MS, started_by="append-bench",
            )  # fmt: skip
        if len(claimed) != REGISTRATIONS:
            raise RuntimeError(f"claimed {len(claimed)} of {REGISTRATIONS} registrations")
        runs = [(int(row.id), run_id, int(row.run_count)) for run_id, row in claimed]
        events = step_events(args.events)

        async def transactions(variant: str, count: int) -> None:
            append = VARIANTS[variant]
            for _ in range(count):
                async with sessions.begin() as session:
                    for rid, run_id, run in runs:
                        await append(
                            session, registration_id=rid, run_id=run_id, run=run,
                            events=events, now_ms=time.time_ns() // 1_000_000,
                            lease_ms=LEASE_MS,
                        )  # fmt: skip

        per_rep = args.n // REGISTRATIONS
        for variant in VARIANTS:  # warm-up, not measured
            await transactions(variant, 1)
        us: dict[str, list[float]] = {v: [] for v in VARIANTS}
        wall_us: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for rep in range(args.reps):
            order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                seq0, rows0 = await written(sessions, ids)
                w0, c0 = time.perf_counter(), time.process_time()
                await transactions(variant, per_rep)
                c1, w1 = time.process_time(), time.perf_counter()
                seq1, rows1 = await written(sessions, ids)
                moved = {rid: seq1[rid] - seq0[rid] for rid in ids}
                if set(moved.values()) != {per_rep * args.events}:
                    raise AssertionError(f"{variant}: seq moved by {sorted(set(moved.values()))}")
                if rows1 - rows0 != args.n * args.events:
                    raise AssertionError(
                        f"{variant}: {rows1 - rows0} log rows, expected {args.n * args.events}"
                    )
                us[variant].append(round(1e6 * (c1 - c0) / args.n, 1))
                wall_us[variant].append(round(1e6 * (w1 - w0) / args.n, 1))
                print(
                    f"rep {rep} {variant:>10}: {us[variant][-1]:7.1f} µs CPU/append "
                    f"({wall_us[variant][-1]:.1f} µs wall)",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        await engine.dispose()
    ratios = [d / s for d, s in zip(us["driver"], us["sqlalchemy"], strict=True)]
    combined = [c / q for c, q in zip(us["combined"], us["query+append"], strict=True)]
    combined_wall = [
        c / q for c, q in zip(wall_us["combined"], wall_us["query+append"], strict=True)
    ]
    return {
        "dialect": url.split(":", 1)[0],
        "cpu_us_per_append": us,
        "wall_us_per_append": wall_us,
        "median_cpu_us_per_append": {v: round(statistics.median(x), 1) for v, x in us.items()},
        "ratio_driver_over_sqlalchemy": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "median_wall_us_per_append": {
            v: round(statistics.median(x), 1) for v, x in wall_us.items()
        },
        "ratio_combined_over_query_append": round(statistics.median(combined), 3),
        "ratio_combined_over_query_append_wall": round(statistics.median(combined_wall), 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--database-url",
        help="sqlite+aiosqlite:///FILE or postgresql+asyncpg://USER@HOST:PORT/DB (an existing, "
        "disposable database: the bench migrates it and leaves its rows there); default a SQLite "
        "file in a temp dir, removed afterwards",
    )
    ap.add_argument("-n", type=int, default=1500, help="appends per rep and variant (÷ 50)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--events", type=int, default=3, help="log entries per append")
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "append_bench.jsonl"))
    args = ap.parse_args(argv)
    if not (
        REGISTRATIONS <= args.n <= 100_000
        and args.n % REGISTRATIONS == 0
        and 1 <= args.reps <= 20
        and 1 <= args.events <= 50
    ):
        ap.error(f"bounds: n a multiple of {REGISTRATIONS} up to 100000, reps<=20, events<=50")
    tmp = None
    url = args.database_url
    if not url:
        tmp = tempfile.mkdtemp(prefix="append-bench-")
        url = f"sqlite+aiosqlite:///{os.path.join(tmp, 'bench.sqlite3')}"
    rec: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        rec.update(asyncio.run(bench(args, url)))
    except Exception as e:  # noqa: BLE001 - reported, recorded, non-zero exit
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    rec["args"] = {**vars(args), "database_url": url if not tmp else "sqlite (temp dir)"}
    rec["affinity"] = sorted(os.sched_getaffinity(0))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    if "error" in rec:
        print(f"error: {rec['error']}", file=sys.stderr)
        return 1
    for variant, reps in rec["cpu_us_per_append"].items():
        median = rec["median_cpu_us_per_append"][variant]
        print(f"{variant:>10}: reps {reps} µs CPU/append, median {median}")
    print(
        f"driver/sqlalchemy: {rec['ratio_driver_over_sqlalchemy']} "
        f"(median of per-rep ratios {rec['ratios']})"
    )
    print(
        f"combined/query+append: CPU {rec['ratio_combined_over_query_append']}, wall "
        f"{rec['ratio_combined_over_query_append_wall']} (medians of per-rep ratios; wall "
        f"µs/append {rec['median_wall_us_per_append']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
