"""The data layer on SQLite and PostgreSQL: migrations, search, pagination, the run guard,
transactions; SQLite's write lock across engines."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Executable,
    Integer,
    MetaData,
    Table,
    UniqueConstraint,
    bindparam,
    cast,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from regstream.db import compiled, registrations, users, work_queue
from regstream.db import engine as db_engine
from regstream.db.engine import (
    SessionFactory,
    create_engine,
    create_session_factory,
    migrate,
    transaction,
)
from regstream.db.registrations import Bound, RunLost
from regstream.db.tables import Base

FIELDS = dict(
    customer_number="100231", account_number=None, first_name="Maria", last_name="Santos",
    date_of_birth=date(1988, 4, 2), national_id="27841236", id_type="NATIONAL.ID",
    phone="+254712345678", email="maria@example.com", device_id=None,
)  # fmt: skip


async def test_data_layer(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        await migrate(engine)  # idempotent
        sessions = create_session_factory(engine)
        async with sessions.begin() as session:
            ids = []
            for i in range(25):
                row = await registrations.create(
                    session,
                    **{**FIELDS, "customer_number": str(100000 + i), "last_name": f"Santos{i}"},
                )
                ids.append(row.id)
        async with sessions() as session:
            page, total = await registrations.list_page(session, page=2, page_size=10)
            assert total == 25 and len(page) == 10
            assert [r.id for r in page] == sorted(ids, reverse=True)[10:20]
            found, total = await registrations.list_page(session, search="santos1")
            assert total == 11  # Santos1, Santos10..19
            found, total = await registrations.list_page(session, search="100003")
            assert [r.customer_number for r in found] == ["100003"]
            _, total = await registrations.list_page(session, status="APPROVED")
            assert total == 0

        async with sessions.begin() as session:
            claim = await registrations.claim_for_processing(
                session, registration_id=ids[0], now_ms=1_000, lease_ms=100, started_by="op"
            )
            assert claim is not None
            again = await registrations.claim_for_processing(
                session, registration_id=ids[0], now_ms=1_050, lease_ms=100, started_by="op"
            )
            assert again is None  # in progress, lease still valid
        run_id, claimed = claim
        run = claimed.run_count
        assert (claimed.id, claimed.in_progress, claimed.run_id, run) == (ids[0], True, run_id, 1)
        async with sessions.begin() as session:
            logged = await registrations.append_events(
                session, registration_id=ids[0], run_id=run_id, run=run, now_ms=1_060, lease_ms=100,
                events=[("duplicate_check", "started", "PENDING", "started: duplicate_check", None),
                        ("duplicate_check", "completed", "PENDING", "No duplicate found", None)],
            )  # fmt: skip
            assert [e.seq for e in logged] == [1, 2]
        async with sessions.begin() as session:  # its lease expired: the queue takes it over
            taken = await work_queue.take(
                session, instance_id="b" * 32, limit=10, now_ms=10_000, lease_ms=100,
                dead_before_ms=0,
            )  # fmt: skip
            assert [r.id for r in taken.rows] == [ids[0]] and taken.run_id != run_id
        # the old runner lost the run: it can write nothing more
        try:
            async with sessions.begin() as session:
                await registrations.append_events(
                    session, registration_id=ids[0], run_id=run_id, run=run, now_ms=10_001,
                    lease_ms=100, events=[("t24_lookup", "started", "PENDING", "x", None)],
                )  # fmt: skip
            raise AssertionError("a lost run wrote to the log")
        except RunLost:
            pass
        async with sessions() as session:
            log = await registrations.get_log(session, registration_id=ids[0])
            assert [(e.seq, e.stage_status) for e in log] == [(1, "started"), (2, "completed")]
    finally:
        await engine.dispose()


async def test_lease_renewal_skips_rows_a_transaction_holds(postgres_url: str) -> None:
    """PostgreSQL: renewing leases must not wait for (and deadlock with) a group commit that
    holds some of the same rows; those rows are renewed by their own step."""

    async with _migrated(postgres_url) as sessions:
        async with sessions.begin() as session:
            ids = [
                (await registrations.create(session, **{**FIELDS, "customer_number": str(n)})).id
                for n in (300001, 300002)
            ]
            claims = await registrations.claim_many(
                session, registration_ids=ids, now_ms=1_000, lease_ms=100, started_by="op"
            )
        runs = [(row.id, run_id) for run_id, row in claims]
        async with sessions.begin() as holder:
            # a batch in flight: it advanced (and so locked) the first registration's row
            await registrations.append_events(
                holder, registration_id=runs[0][0], run_id=runs[0][1], run=1, now_ms=1_010,
                lease_ms=100, events=[("duplicate_check", "started", "PENDING", "x", None)],
            )  # fmt: skip
            async with sessions.begin() as session:
                renewed = await asyncio.wait_for(
                    registrations.renew_leases(session, runs=runs, lease_until_ms=5_000), 5
                )
            assert renewed == 1  # the free row; the held one renews with its own step
        async with sessions() as session:
            rows = await registrations.get_many(session, registration_ids=ids)
            assert sorted(r.lease_expires_ms or 0 for r in rows) == [1_110, 5_000]


async def test_appending_log_entries_is_part_of_the_transaction(database_url: str) -> None:
    """``append_events`` (Core statements on the tables): as the first statement of a
    transaction and after it it must roll back with it, and what it writes must read back
    through the ORM as the entries, the final status and result, and the lease it was given.
    (PostgreSQL: the second append goes straight to asyncpg, ``db/compiled.py``; the first,
    which SQLAlchemy's adapter must begin the transaction with, through ``exec_driver_sql``.
    Either sent outside the transaction would commit on its own.)"""

    async with _migrated(database_url) as sessions:
        async with sessions.begin() as session:
            rid, run_id = await _claimed(session, "400001")
        events = [
            ("t24_lookup", "completed", "PENDING", "Found 2 accounts", {"accountsFound": 2}),
            ("status_update", "started", "PENDING", "started: status_update", None),
            (None, None, "APPROVED", "Customer validated", {"accountsFound": 2}),
        ]
        final = ("APPROVED", {"message": "Customer validated", "details": {"accountsFound": 2}})

        class Undo(Exception):
            pass

        try:
            async with sessions.begin() as session:  # the append is its first statement
                await registrations.append_events(
                    session, registration_id=rid, run_id=run_id, run=1, events=events[:2],
                    now_ms=1_010, lease_ms=100,
                )  # fmt: skip
                await registrations.append_events(
                    session, registration_id=rid, run_id=run_id, run=1, events=events[2:],
                    now_ms=1_010, lease_ms=100, final=final,
                )  # fmt: skip
                raise Undo
        except Undo:
            pass
        async with sessions() as session:
            row = await registrations.get(session, registration_id=rid)
            assert row is not None
            assert (row.status, row.seq, row.in_progress, row.result) == ("PENDING", 0, True, None)
            assert await registrations.get_log(session, registration_id=rid) == []

        async with sessions.begin() as session:
            logged = await registrations.append_events(
                session, registration_id=rid, run_id=run_id, run=1, events=events[:2],
                now_ms=1_020, lease_ms=100,
            )  # fmt: skip
            assert [e.seq for e in logged] == [1, 2]
            logged += await registrations.append_events(
                session, registration_id=rid, run_id=run_id, run=1, events=events[2:],
                now_ms=1_030, lease_ms=100, final=final,
            )  # fmt: skip
        async with sessions() as session:
            row = await registrations.get(session, registration_id=rid)
            assert row is not None
            assert (row.status, row.seq, row.in_progress) == ("APPROVED", 3, False)
            assert (row.result, row.current_stage, row.lease_expires_ms) == (
                final[1], "status_update", 1_130,
            )  # fmt: skip
            assert row.completed_at is not None
            log = await registrations.get_log(session, registration_id=rid)
            read = [
                (e.seq, e.run, e.stage, e.stage_status, e.status, e.message, e.details,
                 e.timestamp_ms)
                for e in log
            ]  # fmt: skip
            assert read == [
                (1, 1, *events[0], 1_020), (2, 1, *events[1], 1_020), (3, 1, *events[2], 1_030)
            ]  # fmt: skip
            assert [registrations.to_log_event(e) for e in log] == logged
            # stored as SQLAlchemy's JSON type stores them: no details is JSON null, not NULL
            stored = await session.execute(
                text("SELECT CAST(details AS TEXT) FROM process_log WHERE registration_id = :r "
                     "ORDER BY seq"), {"r": rid},
            )  # fmt: skip
            assert [d for (d,) in stored] == [
                '{"accountsFound": 2}',
                "null",
                '{"accountsFound": 2}',
            ]


async def test_a_step_s_query_or_insert_runs_with_its_append(database_url: str) -> None:
    """The duplicate check's query and the enrolment go with the append of a step's log
    entries: a query that finds rows returns them and writes nothing, one that finds none lets
    the append happen; an enrolment commits with the final status, or its unique violation
    fails the append."""

    async with _migrated(database_url) as sessions:
        async with sessions.begin() as session:
            rid, run_id = await _claimed(session, "410001")
            enrolled = await users.create(session, _enrolment("410009", "+254700000009", "e" * 64))
        checked = [
            ("duplicate_check", "started", "PENDING", "started: duplicate_check", None),
            ("duplicate_check", "completed", "PENDING", "No duplicate found", None),
        ]
        run: dict[str, Any] = dict(registration_id=rid, run_id=run_id, run=1, lease_ms=100)

        async with sessions.begin() as session:  # another CIF holds the phone: rows, no append
            same_phone = users.matching(
                customer_number="410001", phone="+254700000009", national_id_hashes=["f" * 64]
            )
            logged, rows = await registrations.append_events_unless(
                session, unless=same_phone, events=checked, now_ms=1_010, **run
            )
            assert logged is None
            assert rows == [(enrolled, "410009", "+254700000009", "e" * 64)]
        async with sessions() as session:
            row = await registrations.get(session, registration_id=rid)
            assert row is not None and (row.seq, row.lease_expires_ms) == (0, 1_100)
            assert await registrations.get_log(session, registration_id=rid) == []

        async with sessions.begin() as session:  # no match: appended, nothing returned
            nobody = users.matching(
                customer_number="410001", phone="+254700000001", national_id_hashes=["a" * 64]
            )
            logged, rows = await registrations.append_events_unless(
                session, unless=nobody, events=checked, now_ms=1_020, **run
            )
            assert rows == [] and logged is not None and [e.seq for e in logged] == [1, 2]

        final_event = (None, None, "APPROVED", "Customer validated", {"accountsFound": 1})
        final = ("APPROVED", {"message": "Customer validated", "details": {"accountsFound": 1}})
        # the CIF is enrolled already: the enrolment's unique violation fails the whole append
        with pytest.raises(IntegrityError):
            async with sessions.begin() as session:
                await registrations.append_events(
                    session, events=[final_event], now_ms=1_030, final=final, **run,
                    also=_enrolment("410009", "+254700000001", "a" * 64),
                )  # fmt: skip
        async with sessions.begin() as session:
            await registrations.append_events(
                session, events=[final_event], now_ms=1_040, final=final, **run,
                also=_enrolment("410001", "+254700000001", "a" * 64, registration_id=rid),
            )  # fmt: skip
        async with sessions() as session:
            row = await registrations.get(session, registration_id=rid)
            assert row is not None and (row.status, row.seq, row.in_progress) == (
                "APPROVED", 3, False,
            )  # fmt: skip
            # the registration's own columns are not the statements' parameters of those names
            assert (row.customer_number, row.phone, row.first_name) == (
                "410001", FIELDS["phone"], FIELDS["first_name"],
            )  # fmt: skip
            user = await users.get_by_customer_number(session, customer_number="410001")
            assert user is not None
            assert (user.registration_id, user.date_of_birth, user.phone, user.email) == (
                rid, date(1988, 4, 2), "+254700000001", None,
            )  # fmt: skip
            assert await users.count(session) == 2
        # the run has ended: an append with an enrolment is refused, and the caller's rollback
        # takes the enrolment with it
        with pytest.raises(RunLost):
            async with sessions.begin() as session:
                await registrations.append_events(
                    session, events=[final_event], now_ms=1_050, final=final, **run,
                    also=_enrolment("410002", "+254700000002", "b" * 64),
                )  # fmt: skip
        async with sessions() as session:
            assert await users.get_by_customer_number(session, customer_number="410002") is None
            assert await users.count(session) == 2


@asynccontextmanager
async def _migrated(url: str) -> AsyncIterator[SessionFactory]:
    """A migrated database's session factory; the engine is disposed of afterwards."""
    engine = create_engine(url)
    try:
        await migrate(engine)
        yield create_session_factory(engine)
    finally:
        await engine.dispose()


async def _claimed(session: AsyncSession, customer_number: str) -> tuple[int, str]:
    """A new registration, claimed at 1 s with a 100 ms lease: (its id, the run id)."""
    rid = (await registrations.create(session, **{**FIELDS, "customer_number": customer_number})).id
    [(run_id, _)] = await registrations.claim_many(
        session, registration_ids=[rid], now_ms=1_000, lease_ms=100, started_by="op"
    )
    return rid, run_id


def _enrolment(
    customer_number: str, phone: str, national_id_hash: str, registration_id: int | None = None
) -> Bound:
    return users.enrolment(
        customer_number=customer_number, first_name="Maria", last_name="Santos", phone=phone,
        email=None, date_of_birth=date(1988, 4, 2), national_id_hash=national_id_hash,
        national_id_last4="1236", device_id=None, registration_id=registration_id,
    )  # fmt: skip


def _numbers(table: str) -> Executable:
    """``INSERT INTO table SELECT generate_series(1, n) RETURNING step, x``: ``n`` rows for a
    parameter set, the first column the set's ``compiled.KEY`` (``compiled.fetch_many``)."""
    probe = Table(table, MetaData(), Column("x", Integer()))
    series = select(func.generate_series(1, cast(bindparam("n"), Integer())))
    return (
        insert(probe)
        .from_select(["x"], series)
        .returning(cast(bindparam(compiled.KEY), Integer()), probe.c.x)
    )


async def test_fetch_many_splits_the_rows_per_set_in_the_transaction(postgres_url: str) -> None:
    """PostgreSQL: ``compiled.fetch_many`` gives each parameter set its own rows (by the
    ``KEY`` column; a set with no rows gets []), the first statement of a fresh transaction
    begins it (what the sets wrote rolls back with it, and commits with it), and one failing
    set raises as SQLAlchemy's adapter would (``IntegrityError``)."""
    numbers, unique = _numbers("probe"), _numbers("probe_unique")
    engine = create_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE probe (x INTEGER)"))
            await conn.execute(text("CREATE TABLE probe_unique (x INTEGER PRIMARY KEY)"))

        async def count(conn: AsyncConnection, table: str = "probe") -> int:
            return int(await conn.scalar(text(f"SELECT count(*) FROM {table}")) or 0)

        async with engine.connect() as conn:  # a fresh transaction: its first set begins it
            got = await conn.run_sync(
                compiled.fetch_many, numbers, [{"n": 0}, {"n": 2}, {"n": 0}, {"n": 3}]
            )
            assert got == [[], [(1, 1), (1, 2)], [], [(3, 1), (3, 2), (3, 3)]]
            # in the transaction begun: every set through asyncpg's fetchmany
            again = await conn.run_sync(compiled.fetch_many, numbers, [{"n": 1}, {"n": 0}])
            assert again == [[(0, 1)], []]
            assert await count(conn) == 6
            await conn.rollback()
        async with engine.connect() as conn:
            assert await count(conn) == 0  # nothing was committed on its own
            got = await conn.run_sync(compiled.fetch_many, numbers, [{"n": 1}, {"n": 1}])
            assert got == [[(0, 1)], [(1, 1)]]
            await conn.commit()
            async with engine.connect() as other:  # committed: seen from elsewhere
                assert await count(other) == 2
            # the second set inserts 1 again: SQLAlchemy's error, and the transaction rolls
            # back whole
            with pytest.raises(IntegrityError):
                await conn.run_sync(compiled.fetch_many, unique, [{"n": 1}, {"n": 2}])
            await conn.rollback()
            assert await count(conn, "probe_unique") == 0
    finally:
        await engine.dispose()


async def test_migrated_indexes_are_the_models_and_none_is_redundant(database_url: str) -> None:
    """The migrations build the indexes the models declare (no drift), and no index is a
    leading prefix of another one on the same table (a redundant index only slows writes)."""
    engine = create_engine(database_url)
    try:
        await migrate(engine)

        def read(connection: Any) -> dict[str, set[tuple[str, ...]]]:
            inspector = inspect(connection)
            found: dict[str, set[tuple[str, ...]]] = {}
            for table in inspector.get_table_names():
                if table == "alembic_version":
                    continue
                columns = {tuple(i["column_names"]) for i in inspector.get_indexes(table)}
                columns |= {
                    tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)
                }
                found[table] = columns
            return found

        async with engine.connect() as connection:
            migrated = await connection.run_sync(read)
    finally:
        await engine.dispose()
    declared: dict[str, set[tuple[str, ...]]] = {}
    for table in Base.metadata.sorted_tables:
        columns = {tuple(c.name for c in i.columns) for i in table.indexes}
        columns |= {
            tuple(c.name for c in u.columns)
            for u in table.constraints
            if isinstance(u, UniqueConstraint)
        }
        columns |= {(c.name,) for c in table.columns if c.unique}
        declared[table.name] = columns
    assert migrated == declared
    assert ("registration_id", "seq") in migrated["process_log"]
    for name, indexes in migrated.items():
        for index in indexes:
            longer = [o for o in indexes if len(o) > len(index) and o[: len(index)] == index]
            assert not longer, f"{name}: index {index} is a prefix of {longer}"


# --- the engine and its transactions (stock aiosqlite / SQLAlchemy sessions) --------------------


async def test_transaction_commits_in_the_callers_own_task(database_url: str) -> None:
    """``engine.transaction`` ends its transaction in the caller's task, not in a task of its
    own one loop turn later as ``async_sessionmaker.begin()`` does (on SQLite that turn held the
    write lock: a convoy under load); an exception rolls it back the same way."""
    engine = create_engine(database_url)
    ended_in: list[tuple[str, asyncio.Task[Any] | None]] = []
    event.listen(engine.sync_engine, "commit", lambda _c: ended_in.append(("commit", _task())))
    event.listen(engine.sync_engine, "rollback", lambda _c: ended_in.append(("rollback", _task())))
    try:
        await migrate(engine)
        sessions = create_session_factory(engine)
        ended_in.clear()
        async with transaction(sessions) as session:
            await registrations.create(session, **FIELDS)
        assert ended_in == [("commit", asyncio.current_task())]

        class Undo(Exception):
            pass

        ended_in.clear()
        with pytest.raises(Undo):
            async with transaction(sessions) as session:
                await registrations.create(session, **{**FIELDS, "customer_number": "100232"})
                raise Undo
        assert ended_in[0] == ("rollback", asyncio.current_task())
        async with sessions() as session:
            _, total = await registrations.list_page(session)
        assert total == 1
    finally:
        await engine.dispose()


def _task() -> asyncio.Task[Any] | None:
    return asyncio.current_task()


async def test_sqlite_waits_for_a_busy_write_lock_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    """Two engines on one SQLite file (like ``serve --workers 2``): a transaction waits for the
    other's write lock on aiosqlite's thread, the event loop keeps running meanwhile, and both
    writes land once the first commits."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"
    first, second = create_engine(url), create_engine(url)
    try:
        async with first.begin() as conn:
            await conn.execute(text("CREATE TABLE t (n INTEGER)"))
        ticks = 0
        release = asyncio.Event()
        holding = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not release.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        async def holder() -> None:  # holds the write lock across awaits, like a slow request
            async with first.begin() as conn:
                await conn.execute(text("INSERT INTO t VALUES (1)"))
                holding.set()
                await release.wait()

        async def writer() -> None:
            async with second.begin() as conn:  # BEGIN IMMEDIATE is busy until holder commits
                await conn.execute(text("INSERT INTO t VALUES (2)"))

        hold_task = asyncio.create_task(holder())
        await asyncio.wait_for(holding.wait(), 10)
        write_task = asyncio.create_task(writer())
        tick_task = asyncio.create_task(ticker())
        for _ in range(20):  # the loop turns over while the writer waits for the lock
            await asyncio.sleep(0.01)
        assert not write_task.done()
        assert ticks > 1  # a blocked loop would have let the ticker run once at most
        release.set()
        await asyncio.wait_for(asyncio.gather(hold_task, write_task, tick_task), 10)
        async with first.connect() as conn:
            rows = (await conn.execute(text("SELECT n FROM t ORDER BY n"))).scalars().all()
        assert rows == [1, 2]
    finally:
        await first.dispose()
        await second.dispose()


async def test_sqlite_lock_held_past_the_busy_timeout_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holding SQLite's write lock longer than ``SQLITE_BUSY_TIMEOUT_S``: the
    transaction fails with "database is locked", which the service reads as the database being
    unavailable (503 for a request, a wait for a run)."""
    monkeypatch.setattr(db_engine, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "c.db"
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("PRAGMA journal_mode=WAL")
    blocker.execute("CREATE TABLE t (n INTEGER)")
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with engine.connect() as conn:  # SQLite's own busy timeout, in ms
            assert await conn.scalar(text("PRAGMA busy_timeout")) == 200
        blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        with pytest.raises(OperationalError, match="database is locked") as raised:
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO t VALUES (1)"))
        assert db_engine.unavailable(raised.value)
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        await engine.dispose()
