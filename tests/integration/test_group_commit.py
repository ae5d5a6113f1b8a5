"""Group commit on SQLite and PostgreSQL: steps share transactions, and each stays atomic."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from regstream.db import registrations, users
from regstream.db.engine import SessionFactory, create_engine, create_session_factory, migrate
from regstream.db.group_commit import GroupCommit, Step
from regstream.db.tables import MobileUser, RegistrationRequest
from tests.integration.test_data_layer import FIELDS
from tests.support import wait_until


class Decided(Exception):
    """Stands for a validation failure found by reading only."""


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[tuple[SessionFactory, list[int]]]:
    """The session factory and a list that counts commits (one entry per COMMIT)."""
    engine = create_engine(database_url)
    await migrate(engine)
    commits: list[int] = []
    event.listen(engine.sync_engine, "commit", lambda _conn: commits.append(1))
    try:
        yield create_session_factory(engine), commits
    finally:
        await engine.dispose()


def _registration(i: int) -> dict[str, Any]:
    return {**FIELDS, "customer_number": str(500000 + i), "last_name": f"Group{i}"}


async def _user(session: AsyncSession, n: int, customer_number: str) -> None:
    await users.create(
        session,
        users.enrolment(
            customer_number=customer_number, first_name="G", last_name="C",
            phone=f"+2547110000{n:02d}", email=None, date_of_birth=date(1990, 1, 1),
            national_id_hash=f"{n:064d}", national_id_last4="0000", device_id=None,
        ),
    )  # fmt: skip


def _held(event: asyncio.Event) -> Step[None]:
    """A step that keeps its transaction open until ``event`` is set (the steps queued meanwhile
    form the next batch)."""

    async def hold(_session: AsyncSession) -> None:
        await event.wait()

    return hold


def _writes(i: int) -> Step[int]:
    """A step that creates registration ``i`` and returns its id."""

    async def write(session: AsyncSession) -> int:
        return (await registrations.create(session, **_registration(i))).id

    return write


async def _count(factory: SessionFactory, entity: type[Any]) -> int:
    async with factory() as session:
        return int(await session.scalar(select(func.count()).select_from(entity)) or 0)


async def test_concurrent_steps_commit_together(
    sessions: tuple[SessionFactory, list[int]],
) -> None:
    factory, commits = sessions
    group = GroupCommit(factory)

    commits.clear()
    ids = await asyncio.gather(*(group.run(_writes(i)) for i in range(60)))
    assert len(set(ids)) == 60
    assert await _count(factory, RegistrationRequest) == 60
    # the first step commits alone; the 59 that queued meanwhile share one more transaction
    assert len(commits) <= 3, f"{len(commits)} commits for 60 steps"


async def test_a_step_that_raises_fails_alone(sessions: tuple[SessionFactory, list[int]]) -> None:
    """A unique violation (which aborts a PostgreSQL transaction) in one step of a batch: that
    step's writes are all undone, every other step commits once."""
    factory, _ = sessions
    group = GroupCommit(factory)
    async with factory.begin() as session:
        await _user(session, 99, "770000")
    calls: dict[int, int] = {}

    async def step(i: int) -> str:
        async def write(session: AsyncSession) -> str:
            calls[i] = calls.get(i, 0) + 1
            await registrations.create(session, **_registration(i))
            await _user(session, i, "770000" if i == 7 else str(600000 + i))
            return f"ok {i}"

        return await group.run(write)

    blocker = asyncio.Event()
    first = asyncio.create_task(group.run(_held(blocker)))
    await asyncio.sleep(0.05)
    steps = [asyncio.create_task(step(i)) for i in range(20)]
    await asyncio.sleep(0.05)
    blocker.set()
    await first
    results = await asyncio.gather(*steps, return_exceptions=True)
    assert isinstance(results[7], IntegrityError)
    assert [r for i, r in enumerate(results) if i != 7] == [f"ok {i}" for i in range(20) if i != 7]
    assert await _count(factory, RegistrationRequest) == 19  # step 7's registration undone
    assert await _count(factory, MobileUser) == 20  # the one made first, and 19
    assert calls[7] == 2  # in the batch, then alone


async def test_a_decided_outcome_keeps_the_batch(
    sessions: tuple[SessionFactory, list[int]],
) -> None:
    factory, commits = sessions
    group = GroupCommit(factory, decided=(Decided,))
    calls: dict[int, int] = {}
    blocker = asyncio.Event()

    async def step(i: int) -> int:
        async def write(session: AsyncSession) -> int:
            calls[i] = calls.get(i, 0) + 1
            if i % 5 == 0:
                await registrations.get(session, registration_id=1)  # read, decide, write nothing
                raise Decided(i)
            return (await registrations.create(session, **_registration(i))).id

        return await group.run(write)

    first = asyncio.create_task(group.run(_held(blocker)))
    await asyncio.sleep(0.05)
    steps = [asyncio.create_task(step(i)) for i in range(20)]
    await asyncio.sleep(0.05)
    commits.clear()
    blocker.set()
    await first
    results = await asyncio.gather(*steps, return_exceptions=True)
    assert [type(r) for r in results[::5]] == [Decided] * 4
    assert await _count(factory, RegistrationRequest) == 16
    assert set(calls.values()) == {1}, "a decided outcome made the batch run again"
    assert len(commits) == 1  # the 20 steps in one (the held step never used its connection)


async def test_a_cancelled_caller_step_does_not_run(
    sessions: tuple[SessionFactory, list[int]],
) -> None:
    factory, _ = sessions
    group = GroupCommit(factory)
    blocker = asyncio.Event()
    ran: list[str] = []

    async def write(session: AsyncSession) -> None:
        ran.append("write")
        await registrations.create(session, **_registration(1))

    first = asyncio.create_task(group.run(_held(blocker)))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(group.run(write))
    await asyncio.sleep(0.05)
    queued.cancel()
    blocker.set()
    await first
    with pytest.raises(asyncio.CancelledError):
        await queued
    await group.idle(timeout=5)
    assert ran == []
    assert await _count(factory, RegistrationRequest) == 0


async def test_open_transactions_are_bounded_by_max_open(
    sessions: tuple[SessionFactory, list[int]],
) -> None:
    """With ``max_open=2`` a second batch runs while the first is held open; a third step waits
    for one of them."""
    factory, _ = sessions
    group = GroupCommit(factory, max_open=2)
    first_held, second_held = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(group.run(_held(first_held)))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(group.run(_held(second_held)))
    await asyncio.sleep(0.05)
    third = asyncio.create_task(group.run(_writes(1)))
    await asyncio.sleep(0.2)
    assert not third.done(), "a third transaction was opened"
    second_held.set()
    assert isinstance(await asyncio.wait_for(third, 5), int)
    await asyncio.wait_for(second, 5)
    assert not first.done()
    first_held.set()
    await asyncio.wait_for(first, 5)
    await group.idle(timeout=5)


async def test_a_step_cancelled_from_inside_fails_alone(
    sessions: tuple[SessionFactory, list[int]],
) -> None:
    """A step that awaited something cancelled raises CancelledError although nobody cancelled
    the commit: that step fails, the others in its batch and the steps after it still commit."""
    factory, _ = sessions
    group = GroupCommit(factory)
    blocker = asyncio.Event()

    async def interrupted(session: AsyncSession) -> None:
        await registrations.create(session, **_registration(1))
        gone = asyncio.get_running_loop().create_future()
        gone.cancel()
        await gone

    first = asyncio.create_task(group.run(_held(blocker)))
    await asyncio.sleep(0.05)
    steps = [
        asyncio.create_task(group.run(interrupted)),
        asyncio.create_task(group.run(_writes(2))),
    ]
    await asyncio.sleep(0.05)
    blocker.set()
    await first
    results = await asyncio.gather(*steps, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert isinstance(results[1], int)
    assert isinstance(await asyncio.wait_for(group.run(_writes(3)), 5), int)  # a worker runs on
    assert await _count(factory, RegistrationRequest) == 2  # step 1's row rolled back


async def test_what_follows_a_commit_runs_when_the_caller_left(
    sessions: tuple[SessionFactory, list[int]],
) -> None:
    """``then`` runs right after the commit even when the caller was cancelled while its step
    was in the batch (what was committed gets published, a claimed run gets started)."""
    factory, _ = sessions
    group = GroupCommit(factory)
    first_held, second_held = asyncio.Event(), asyncio.Event()
    followed: list[int] = []
    first = asyncio.create_task(group.run(_held(first_held)))
    await asyncio.sleep(0.05)
    caller = asyncio.create_task(group.run(_writes(1), then=followed.append))
    blocker = asyncio.create_task(group.run(_held(second_held)))
    await asyncio.sleep(0.05)
    first_held.set()  # the second batch starts: write, then a step that waits
    await first
    await asyncio.sleep(0.05)
    caller.cancel()  # the caller leaves while its step is in the running batch
    second_held.set()
    await asyncio.wait_for(blocker, 5)
    with pytest.raises(asyncio.CancelledError):
        await caller
    async with factory() as session:
        committed = list(await session.scalars(select(RegistrationRequest.id)))
    assert followed == committed  # the follow-up ran once, with the step's result
    assert len(committed) == 1


async def test_a_connection_lost_mid_batch_fails_no_step(postgres_url: str) -> None:
    """PostgreSQL: the server ends the batch's connection (a restart, a failover, an idle
    timeout) while one of its steps runs a statement. The batch must roll back and every step
    run again alone on a fresh connection; not fail all of them with the error of a rollback on
    the dead connection."""
    engine = create_engine(postgres_url)
    try:
        await migrate(engine)
        factory = create_session_factory(engine)
        group = GroupCommit(factory)
        killed: list[int] = []

        def killing(i: int) -> Step[int]:
            async def step(session: AsyncSession) -> int:
                if i == 3 and not killed:  # once: run alone, the step succeeds
                    pid = await session.scalar(text("SELECT pg_backend_pid()"))
                    killed.append(int(pid))
                    async with engine.connect() as admin:
                        await admin.execute(
                            text("SELECT pg_terminate_backend(:pid)"), {"pid": killed[0]}
                        )
                query = users.matching(
                    customer_number=str(800000 + i), phone="+254700000000",
                    national_id_hashes=["0" * 64],
                )  # fmt: skip
                await session.execute(query.statement, query.params)
                return (await registrations.create(session, **_registration(i))).id

            return step

        blocker = asyncio.Event()
        first = asyncio.create_task(group.run(_held(blocker)))
        await asyncio.sleep(0.05)
        steps = [asyncio.create_task(group.run(killing(i))) for i in range(8)]
        await asyncio.sleep(0.05)
        blocker.set()
        await first
        ids = await asyncio.gather(*steps)
        assert killed, "the connection was never ended"
        assert len(set(ids)) == 8
        assert await _count(factory, RegistrationRequest) == 8
    finally:
        await engine.dispose()


async def test_a_thread_committing_through_a_double_cancel_still_publishes(
    tmp_path: Path,
) -> None:
    """SQLite's sync steps commit in a thread, which cannot be cancelled: a worker cancelled
    while it commits (twice, as a shutdown does) waits for it, then runs ``then`` for what
    committed and answers its caller, before it stops."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'group.db'}")
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE probe (x INTEGER)"))
    group = GroupCommit(create_session_factory(engine))
    entered, gate = threading.Event(), threading.Event()
    published: list[int] = []

    def write(session: Session) -> int:
        entered.set()
        gate.wait(10)
        session.execute(text("INSERT INTO probe (x) VALUES (1)"))
        return 1

    try:
        caller = asyncio.create_task(group.run_sync(write, then=published.append))
        assert await asyncio.to_thread(entered.wait, 10)
        (worker,) = group._workers
        for _ in range(2):
            worker.cancel()
            await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait({worker}, timeout=10)
        assert worker.cancelled()
        assert published == [1]
        assert await caller == 1
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM probe"))).scalar() == 1
    finally:
        gate.set()
        group.close()
        await engine.dispose()


@contextlib.asynccontextmanager
async def _commit_held(engine: AsyncEngine) -> AsyncIterator[tuple[AsyncConnection, Step[int]]]:
    """A step (insert into ``probe``) whose COMMIT waits, in a deferred constraint trigger, for
    an advisory lock held by the connection yielded with it; ``_wait_committing`` waits for a
    COMMIT to be held so. The lock is released on exit."""
    lock = 4242
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE probe (x INTEGER)"))
        await conn.execute(text(
            "CREATE FUNCTION wait_at_commit() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_advisory_xact_lock({lock}); RETURN NULL; END $$"
        ))  # fmt: skip
        await conn.execute(text(
            "CREATE CONSTRAINT TRIGGER probe_commit AFTER INSERT ON probe "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION wait_at_commit()"
        ))  # fmt: skip

    async def write(session: AsyncSession) -> int:
        await session.execute(text("INSERT INTO probe (x) VALUES (1)"))
        return 1

    admin = await engine.connect()
    try:
        await admin.execute(text(f"SELECT pg_advisory_lock({lock})"))
        await admin.commit()
        yield admin, write
    finally:
        await admin.execute(text(f"SELECT pg_advisory_unlock({lock})"))
        await admin.commit()
        await admin.close()


async def _wait_committing(admin: AsyncConnection) -> None:
    async def committing() -> bool:  # a worker's COMMIT waits for our lock
        waiting = await admin.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE 'COMMIT%'"
        ))  # fmt: skip
        await admin.commit()
        return bool(waiting == 1)

    await wait_until(committing, timeout=10, what="the COMMIT to wait for the lock")


async def test_a_worker_cancelled_during_commit_still_publishes(postgres_url: str) -> None:
    """PostgreSQL: a worker cancelled (twice, as a shutdown does) while its COMMIT is under
    way lets the COMMIT finish, runs ``then`` for what committed and answers its caller, before
    it stops. The COMMIT is held (``_commit_held``), so the cancellations land while it is in
    flight."""
    engine = create_engine(postgres_url)
    group = GroupCommit(create_session_factory(engine))
    published: list[int] = []
    try:
        async with _commit_held(engine) as (admin, write):
            caller = asyncio.create_task(group.run(write, then=published.append))
            await _wait_committing(admin)
            (worker,) = group._workers
            for _ in range(2):
                worker.cancel()
                await asyncio.sleep(0.05)
        # the lock released: the COMMIT goes through
        await asyncio.wait({worker}, timeout=10)
        assert worker.cancelled()
        assert published == [1]  # the committed step was published
        assert await caller == 1
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM probe"))).scalar() == 1
    finally:
        await engine.dispose()


async def test_a_worker_gives_up_on_a_commit_that_never_answers(postgres_url: str) -> None:
    """The wait for a COMMIT under way is bounded (``settle_timeout``): a worker cancelled while
    its COMMIT hangs (``_commit_held``, the lock kept) stops after that bound instead of waiting
    forever (a dead connection would), and its caller is not left waiting either."""
    engine = create_engine(postgres_url)
    group = GroupCommit(create_session_factory(engine), settle_timeout=0.5)
    try:
        async with _commit_held(engine) as (admin, write):
            caller = asyncio.create_task(group.run(write))
            await _wait_committing(admin)
            (worker,) = group._workers
            worker.cancel()
            await asyncio.wait({worker, caller}, timeout=15)
            assert worker.done() and caller.done()  # while the COMMIT still hangs on our lock
            assert caller.cancelled()
    finally:
        await engine.dispose()
