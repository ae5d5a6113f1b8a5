"""The data layer on SQLite and PostgreSQL: migrations, search, pagination, the run guard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date
from typing import Any

import pytest
from sqlalchemy import UniqueConstraint, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from regstream.db import registrations, users, work_queue
from regstream.db.driver import Bound
from regstream.db.engine import SessionFactory, create_engine, create_session_factory, migrate
from regstream.db.registrations import RunLost
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
    """``append_events`` runs on the driver (hand-written SQL): as the first statement of a
    transaction it must still roll back with it, and what it writes must read back through the
    ORM as the entries, the final status and result, and the lease it was given."""

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
                    session, registration_id=rid, run_id=run_id, run=1, events=events,
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
    """The duplicate check's query and the enrolment ride in the statement that appends a step's
    log entries (one round trip on PostgreSQL): a query that finds rows returns them and
    writes nothing, one that finds none lets the append happen; an enrolment commits with the
    final status, or its unique violation fails the append."""

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
            user = await users.get_by_customer_number(session, customer_number="410001")
            assert user is not None
            assert (user.registration_id, user.date_of_birth, user.phone, user.email) == (
                rid, date(1988, 4, 2), "+254700000001", None,
            )  # fmt: skip
            assert await users.count(session) == 2
        # the run has ended: an append with an enrolment is refused, and the caller's rollback
        # takes the enrolment with it (on PostgreSQL the insert ran inside the statement)
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
