"""Group commit on SQLite and PostgreSQL: steps share transactions, and each stays atomic."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, make_url, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

from regstream.db import registrations, users
from regstream.db.engine import SessionFactory, create_engine, create_session_factory, migrate
from regstream.db.group_commit import GroupCommit, Step
from regstream.db.registrations import Bound, LogEvent
from regstream.db.tables import MobileUser, RegistrationRequest
from tests.integration.test_data_layer import FIELDS
from tests.support import LoopbackServer, wait_until


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


# --- run_after: the first statements of a batch's steps (PostgreSQL: sent together) ------------


class _Wire(LoopbackServer):
    """A TCP relay to PostgreSQL (``async with``) that reads the client's side of the protocol:
    how many executions each round trip carried. A round trip is what the client sends up to a
    Sync (the extended protocol: it then waits for the answers; its Execute messages are the
    executions) or one simple Query (BEGIN, COMMIT)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self._target = make_url(url)
        self.trips: list[int] = []  # Execute messages per round trip, in order

    @property
    def url(self) -> str:
        """The URL to connect through the relay (no TLS: the messages are read)."""
        url = self._target.set(host="127.0.0.1", port=self.port, query={"ssl": "disable"})
        return url.render_as_string(hide_password=False)

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        server, to_server = await asyncio.open_connection(
            self._target.host, self._target.port or 5432
        )
        self._writers |= {to_client, to_server}
        with contextlib.suppress(ConnectionError):
            await asyncio.gather(self._read_client(client, to_server), _copy(server, to_client))

    async def _read_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        buffer = bytearray()
        typed = False  # after the startup message: a type byte, then the length
        executes = 0
        try:
            while data := await reader.read(65536):
                writer.write(data)
                buffer += data
                while len(buffer) >= 5:
                    size = 1 + int.from_bytes(buffer[1:5]) if typed else int.from_bytes(buffer[:4])
                    if len(buffer) < size:
                        break
                    message = bytes(buffer[:size])
                    del buffer[:size]
                    if not typed:  # SSLRequest, GSSENCRequest, then the startup message (3.x)
                        typed = int.from_bytes(message[4:8]) >> 16 == 3
                    elif message[:1] == b"E":
                        executes += 1
                    elif message[:1] == b"S":
                        self.trips.append(executes)
                        executes = 0
                    elif message[:1] == b"Q":
                        self.trips.append(1)
                await writer.drain()
        finally:
            writer.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def _run_after_setup(
    url: str,
) -> AsyncIterator[tuple[SessionFactory, GroupCommit, list[int], _Wire | None]]:
    """A migrated database's session factory, a group commit on it, a list that counts the
    COMMITs of every engine (on SQLite the sync steps commit on an engine of their own) and, on
    PostgreSQL, the relay the engine connects through (``_Wire``)."""
    wire = _Wire(url) if url.startswith("postgresql") else None
    async with wire if wire is not None else contextlib.nullcontext():
        async with _group_on(url if wire is None else wire.url) as (factory, group, commits):
            yield factory, group, commits, wire


@contextlib.asynccontextmanager
async def _group_on(url: str) -> AsyncIterator[tuple[SessionFactory, GroupCommit, list[int]]]:
    """A migrated database's session factory, a group commit on it, and the COMMITs of every
    engine (``_run_after_setup``)."""
    engine = create_engine(url)
    commits: list[int] = []

    def committed(_conn: Any) -> None:
        commits.append(1)

    event.listen(Engine, "commit", committed)
    factory = create_session_factory(engine)
    group = GroupCommit(factory)
    try:
        await migrate(engine)
        yield factory, group, commits
    finally:
        event.remove(Engine, "commit", committed)
        group.close()
        await engine.dispose()


async def _claimed_runs(factory: SessionFactory, first: int, n: int) -> tuple[list[int], str]:
    """``n`` new registrations (customer numbers from ``first``), claimed with a long lease:
    their ids and the run id (one claim: they share it)."""
    async with factory.begin() as session:
        ids = [
            (await registrations.create(session, **_registration(first + i))).id for i in range(n)
        ]
        claims = await registrations.claim_many(
            session, registration_ids=ids, now_ms=1_000, lease_ms=600_000, started_by="op"
        )
    assert sorted(row.id for _, row in claims) == ids
    return ids, claims[0][0]


def _events(tag: str, n: int) -> list[registrations.Event]:
    return [("duplicate_check", "completed", "PENDING", f"{tag} {j}", None) for j in range(n)]


def _append(rid: int, run_id: str, tag: str, n: int = 1, **options: Any) -> registrations.Append:
    return registrations.Append(rid, run_id, 1, _events(tag, n), 2_000, 600_000, **options)


async def _in_one_batch(
    group: GroupCommit,
    calls: list[Callable[[], Coroutine[Any, Any, Any]]],
    before_release: Callable[[], None],
) -> list[Any]:
    """Run ``calls`` (each enqueues a step) while the worker is held, so their steps form one
    batch; ``before_release`` runs just before it is let go. Their results or exceptions."""
    blocker = asyncio.Event()
    first = asyncio.create_task(group.run(_held(blocker)))
    await asyncio.sleep(0.05)
    steps = [asyncio.create_task(call()) for call in calls]
    await asyncio.sleep(0.05)
    before_release()
    blocker.set()
    await first
    return await asyncio.wait_for(asyncio.gather(*steps, return_exceptions=True), 30)


def _logged(session: Session, appended: registrations.Appended) -> tuple[list[LogEvent], int]:
    """A ``run_after`` step: the entries its first statement wrote, and the registration's seq
    as the step reads it afterwards in the same transaction."""
    logged, found = appended
    assert logged is not None and found == []
    seq = session.scalar(
        select(RegistrationRequest.seq).where(RegistrationRequest.id == logged[0].registration_id)
    )
    return logged, int(seq or 0)


async def test_run_after_steps_send_their_appends_together(database_url: str) -> None:
    """Appends of many runs as the first statements of one batch's ``run_after`` steps: all
    commit in one transaction, each caller gets its own registration's entries, numbered from
    that registration's seq, and its step sees them written. On PostgreSQL the appends after
    the transaction's first went to the server in one round trip (one Sync for all their
    executions, ``compiled.fetch_many``); on SQLite each runs as its step begins."""
    n = 10
    async with _run_after_setup(database_url) as (factory, group, commits, wire):
        ids, run_id = await _claimed_runs(factory, 900000, n)
        async with factory.begin() as session:  # registration i has i entries already
            for i, rid in enumerate(ids[1:], start=1):
                await registrations.append_events(
                    session, registration_id=rid, run_id=run_id, run=1, now_ms=1_500,
                    lease_ms=600_000, events=_events("before", i),
                )  # fmt: skip
        appends = [_append(rid, run_id, f"r{i}", i % 3 + 1) for i, rid in enumerate(ids)]

        def cleared() -> None:
            commits.clear()
            if wire is not None:
                wire.trips.clear()

        results = await _in_one_batch(
            group, [functools.partial(group.run_after, a, _logged) for a in appends], cleared
        )
        assert len(commits) == 1, f"{len(commits)} commits for one batch"
        for i, (rid, result) in enumerate(zip(ids, results, strict=True)):
            count = i % 3 + 1
            expected = [(rid, 1, i + j + 1, f"r{i} {j}", 2_000) for j in range(count)]
            assert not isinstance(result, BaseException), result
            logged, seq = result
            assert [
                (e.registration_id, e.run, e.seq, e.message, e.timestamp_ms) for e in logged
            ] == (expected)
            assert seq == i + count
        async with factory() as session:
            for i, rid in enumerate(ids):
                log = await registrations.get_log(session, registration_id=rid)
                assert [(e.seq, e.message) for e in log] == [
                    (j + 1, f"before {j}") for j in range(i)
                ] + [(i + j + 1, f"r{i} {j}") for j in range(i % 3 + 1)]
            if wire is not None:
                # the rows were written by one PostgreSQL transaction
                written = await session.scalar(text(
                    "SELECT count(DISTINCT xmin::text) FROM process_log WHERE timestamp_ms = 2000"
                ))  # fmt: skip
                assert written == 1
        if wire is not None:
            # the first append began the transaction (alone); the other n - 1 went in one trip
            assert max(wire.trips) == n - 1, wire.trips


async def test_a_mixed_batch_of_first_statements(postgres_url: str) -> None:
    """PostgreSQL: a batch of ``run_after`` steps whose first statements differ (guarded appends
    whose query finds nobody, or an enrolled user: then ``(None, rows)`` and nothing written;
    plain appends; a final append with its enrolment) and a plain ``run_sync`` step. Without a
    lost run all commit together with their own results; with one (its run id no longer owns
    the registration) that step gets ``RunLost`` and every other step still commits."""
    async with _run_after_setup(postgres_url) as (factory, group, commits, wire):
        assert wire is not None
        async with factory.begin() as session:
            await _user(session, 1, "880099")
            user = await users.get_by_customer_number(session, customer_number="880099")
            assert user is not None
        enrolled = [(user.id, "880099", "+254711000001", f"{1:064d}")]
        created: list[int] = []

        def plain(session: Session) -> int:
            row = RegistrationRequest(
                status="PENDING", seq=0, run_count=0, in_progress=False,
                **_registration(880000 + len(created)),
            )  # fmt: skip
            session.add(row)
            session.flush()
            created.append(row.id)
            return row.id

        def appended(_session: Session, done: registrations.Appended) -> registrations.Appended:
            return done

        def nobody(i: int) -> Bound:
            return users.matching(
                customer_number=f"88{i:04d}", phone=f"+2547990000{i:02d}",
                national_id_hashes=[f"c{i:063d}"],
            )  # fmt: skip

        finals = 0

        def batch(
            ids: list[int], run_id: str, tag: str
        ) -> list[Callable[[], Coroutine[Any, Any, Any]]]:
            """Guarded A, plain C, guarded M (the enrolled CIF matches), plain L, the sync step,
            guarded B, F's final append with its enrolment, plain D."""
            nonlocal finals
            a, b, c, d, m, lost, f = ids
            finals += 1
            final = ("APPROVED", {"message": "Customer validated"})
            enrol = users.enrolment(
                customer_number=f"8801{finals:02d}", first_name="F", last_name="F",
                phone=f"+2547880000{finals:02d}", email=None, date_of_birth=date(1990, 1, 1),
                national_id_hash=f"{finals + 100:064d}", national_id_last4="0000",
                device_id=None, registration_id=f,
            )  # fmt: skip
            firsts = [
                _append(a, run_id, f"{tag} a", 2, member=nobody(1), guard=True),
                _append(c, run_id, f"{tag} c", 1),
                _append(
                    m,
                    run_id,
                    f"{tag} m",
                    2,
                    guard=True,
                    member=users.matching(
                        customer_number="880099",
                        phone="+254799999999",
                        national_id_hashes=["f" * 64],
                    ),
                ),
                _append(lost, run_id, f"{tag} lost", 1),
                None,
                _append(b, run_id, f"{tag} b", 1, member=nobody(2), guard=True),
                _append(f, run_id, f"{tag} f", 1, final=final, member=enrol),
                _append(d, run_id, f"{tag} d", 3),
            ]
            return [
                functools.partial(group.run_sync, plain) if first is None
                else functools.partial(group.run_after, first, appended)
                for first in firsts
            ]  # fmt: skip

        def seqs(results: list[Any]) -> list[Any]:
            return [
                r if isinstance(r, (int, str, BaseException)) or r[0] is None
                else [(e.registration_id, e.seq, e.message) for e in r[0]]
                for r in results
            ]  # fmt: skip

        # no run lost: one transaction, each step its own result
        ids, run_id = await _claimed_runs(factory, 881000, 7)
        a, b, c, d, m, lost, f = ids

        def cleared() -> None:
            commits.clear()
            wire.trips.clear()

        results = await _in_one_batch(group, batch(ids, run_id, "one"), cleared)
        assert len(commits) == 1
        # one round trip per statement text: after A's (the transaction's first), M's and B's
        # guarded appends together, then C's, L's and D's plain ones; F's alone
        assert [t for t in wire.trips if t > 1] == [2, 3], wire.trips
        assert seqs(results) == [
            [(a, 1, "one a 0"), (a, 2, "one a 1")],
            [(c, 1, "one c 0")],
            (None, enrolled),
            [(lost, 1, "one lost 0")],
            created[0],
            [(b, 1, "one b 0")],
            [(f, 1, "one f 0")],
            [(d, 1, "one d 0"), (d, 2, "one d 1"), (d, 3, "one d 2")],
        ]

        # the same batch with the run of ``lost`` taken over, F's run a new one
        ids, run_id = await _claimed_runs(factory, 882000, 7)
        a, b, c, d, m, lost, f = ids
        async with factory.begin() as session:
            await session.execute(
                update(RegistrationRequest)
                .where(RegistrationRequest.id == lost)
                .values(run_id="taken over")
            )
        results = await _in_one_batch(group, batch(ids, run_id, "two"), lambda: None)
        assert isinstance(results[3], registrations.RunLost)
        results[3] = "lost"
        assert seqs(results) == [
            [(a, 1, "two a 0"), (a, 2, "two a 1")],
            [(c, 1, "two c 0")],
            (None, enrolled),
            "lost",
            created[-1],
            [(b, 1, "two b 0")],
            [(f, 1, "two f 0")],
            [(d, 1, "two d 0"), (d, 2, "two d 1"), (d, 3, "two d 2")],
        ]

        async with factory() as session:
            rows = {r.id: r for r in await registrations.get_many(session, registration_ids=ids)}
            assert {rid: rows[rid].seq for rid in ids} == {
                a: 2,
                b: 1,
                c: 1,
                d: 3,
                m: 0,
                lost: 0,
                f: 1,
            }
            assert await registrations.get_log(session, registration_id=m) == []
            assert await registrations.get_log(session, registration_id=lost) == []
            assert (rows[f].status, rows[f].in_progress) == ("APPROVED", False)
            assert (rows[m].status, rows[m].in_progress) == ("PENDING", True)
            enrolled_f = await users.get_by_customer_number(session, customer_number="880102")
            assert enrolled_f is not None and enrolled_f.registration_id == f
            # the plain step's row of each batch (in the second, it comes after the lost run's
            # step, which rolls the batch back first: it runs once, alone)
            made = await registrations.get_many(session, registration_ids=created)
            assert sorted(r.id for r in made) == [created[0], created[-1]]
            assert await _count(factory, RegistrationRequest) == 14 + 2


async def test_a_unique_violation_in_a_pipelined_group_fails_that_step_alone(
    postgres_url: str,
) -> None:
    """PostgreSQL: final appends with their enrolments (``Recorder.finish`` for APPROVED) sent
    together; one enrols a CIF that is enrolled already. That step raises ``IntegrityError``;
    every other step of the batch commits, its registration approved and its user enrolled."""
    n = 6
    async with _run_after_setup(postgres_url) as (factory, group, commits, wire):
        assert wire is not None
        async with factory.begin() as session:
            await _user(session, 50, "883099")
        ids, run_id = await _claimed_runs(factory, 883000, n)
        final = ("APPROVED", {"message": "Customer validated"})

        def enrolment(i: int) -> Bound:
            return users.enrolment(
                customer_number="883099" if i == 3 else f"8830{i:02d}", first_name="E",
                last_name="E", phone=f"+2547830000{i:02d}", email=None,
                date_of_birth=date(1990, 1, 1), national_id_hash=f"{i + 200:064d}",
                national_id_last4="0000", device_id=None, registration_id=ids[i],
            )  # fmt: skip

        appends = [
            _append(rid, run_id, f"final {i}", 2, final=final, member=enrolment(i))
            for i, rid in enumerate(ids)
        ]

        def count_from_here() -> None:
            commits.clear()
            wire.trips.clear()

        results = await _in_one_batch(
            group,
            [functools.partial(group.run_after, a, _last_seq) for a in appends],
            count_from_here,
        )
        assert isinstance(results[3], IntegrityError)
        assert [r for i, r in enumerate(results) if i != 3] == [2] * (n - 1)
        # sent together (the first alone, which begins the transaction; the rest in one trip),
        # then each step alone: the n - 1 that commit
        assert n - 1 in wire.trips, wire.trips
        assert len(commits) == n - 1
        async with factory() as session:
            rows = {r.id: r for r in await registrations.get_many(session, registration_ids=ids)}
            assert [(rows[rid].status, rows[rid].seq) for rid in ids] == [
                ("PENDING", 0) if i == 3 else ("APPROVED", 2) for i in range(n)
            ]
            for i, rid in enumerate(ids):
                user = await users.get_by_customer_number(session, customer_number=f"8830{i:02d}")
                assert (
                    (user is None) if i == 3 else (user is not None and user.registration_id == rid)
                )
            assert await users.count(session) == n  # the one made first and n - 1


async def test_a_first_statement_that_cannot_be_built_fails_its_step_alone(
    postgres_url: str,
) -> None:
    """PostgreSQL: one ``run_after`` step's first statement cannot even be built (its entry's
    details are no JSON: ``json.dumps`` raises in ``Append.statement``). That step fails, as it
    does when it runs alone (``Append.execute``); its batch's other steps commit."""
    async with _run_after_setup(postgres_url) as (factory, group, _, _):
        ids, run_id = await _claimed_runs(factory, 884000, 4)
        bad: list[registrations.Event] = [
            ("duplicate_check", "completed", "PENDING", "bad", {"when": date(2020, 1, 1)})
        ]
        appends = [
            registrations.Append(rid, run_id, 1, bad, 2_000, 600_000)
            if i == 2
            else _append(rid, run_id, f"r{i}")
            for i, rid in enumerate(ids)
        ]
        results = await _in_one_batch(
            group, [functools.partial(group.run_after, a, _last_seq) for a in appends], lambda: None
        )
        assert isinstance(results[2], TypeError)
        assert [r for i, r in enumerate(results) if i != 2] == [1, 1, 1]


def _last_seq(_session: Session, done: registrations.Appended) -> int:
    """A ``run_after`` step: the seq of the last entry its append wrote."""
    assert done[0] is not None
    return done[0][-1].seq


# --- linger: a drained worker's connection parked for the next one (PostgreSQL) ---------------


async def _backend_pid(session: AsyncSession) -> int:
    """A step: the server process (backend) of the connection it runs on."""
    return int(await session.scalar(text("SELECT pg_backend_pid()")))


def _checkouts(engine: AsyncEngine) -> list[object]:
    """A list that gets an entry per pool checkout of ``engine`` (each pre-pings the connection:
    ``create_engine`` sets ``pool_pre_ping``): the checkout's connection proxy, kept so that a
    connection dropped without being given back stays checked out (the garbage collector would
    give it back, with a warning)."""
    checkouts: list[object] = []

    def checked_out(_dbapi_connection: Any, _record: Any, proxy: Any) -> None:
        checkouts.append(proxy)

    event.listen(engine.sync_engine, "checkout", checked_out)
    return checkouts


def _checked_out(engine: AsyncEngine) -> int:
    """How many of ``engine``'s pooled connections are checked out (parked ones included)."""
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedout()


@pytest.mark.parametrize(("linger", "checkouts_expected"), [(5.0, 1), (0.0, 2)])
async def test_a_parked_connection_serves_the_next_worker(
    postgres_url: str, linger: float, checkouts_expected: int
) -> None:
    """PostgreSQL: two steps one after the other (the second queued only once the first's worker
    has finished). With ``linger`` the second runs on the connection the first's worker parked:
    the same server backend, one pool checkout (one pre-ping) for both. Without (0, the
    default) each worker checks a connection out of the pool."""
    engine = create_engine(postgres_url)
    checkouts = _checkouts(engine)
    group = GroupCommit(create_session_factory(engine), linger=linger)
    try:
        first = await group.run(_backend_pid)
        await asyncio.sleep(0.05)
        assert not group._workers, "the first step's worker is still running"
        second = await group.run(_backend_pid)
        assert len(checkouts) == checkouts_expected
        if linger > 0:
            assert second == first  # the very connection (the pool may hand out any)
    finally:
        await group.aclose()
        await engine.dispose()


async def test_a_parked_connection_goes_back_to_the_pool_after_linger(postgres_url: str) -> None:
    """PostgreSQL: a parked connection stays checked out of the pool for ``linger`` seconds,
    then its expiry gives it back (nothing else does: no ``aclose`` here); the next step then
    checks one out again."""
    engine = create_engine(postgres_url)
    checkouts = _checkouts(engine)
    group = GroupCommit(create_session_factory(engine), linger=0.2)
    try:
        await group.run(_backend_pid)
        # the worker parked the connection before this caller resumed: still checked out
        assert _checked_out(engine) == 1
        await asyncio.sleep(0.6)
        await wait_until(
            lambda: _checked_out(engine) == 0,
            timeout=10,
            what="the parked connection to go back to the pool",
        )
        checkouts.clear()
        await group.run(_backend_pid)
        assert len(checkouts) == 1  # the expired connection was not reused
    finally:
        await group.aclose()
        await engine.dispose()


async def test_aclose_gives_a_parked_connection_back_at_once(postgres_url: str) -> None:
    """PostgreSQL: ``aclose`` (``Runner.drain`` ends with it) gives a parked connection back to
    the pool at once, long before its ``linger`` would."""
    engine = create_engine(postgres_url)
    checkouts = _checkouts(engine)
    group = GroupCommit(create_session_factory(engine), linger=30)
    try:
        await group.run(_backend_pid)
        await asyncio.sleep(0.05)
        assert _checked_out(engine) == 1
        await group.aclose()
        assert _checked_out(engine) == 0
        assert len(checkouts) == 1
    finally:
        await group.aclose()
        await engine.dispose()


async def test_after_aclose_a_drained_worker_parks_nothing(postgres_url: str) -> None:
    """PostgreSQL: a step that still runs after ``aclose`` (a late one in a shutdown) gives its
    connection back to the pool when its worker drains, instead of parking it with a timer the
    stopping event loop might never run."""
    engine = create_engine(postgres_url)
    group = GroupCommit(create_session_factory(engine), linger=30)
    try:
        await group.aclose()
        await group.run(_backend_pid)
        await asyncio.sleep(0.05)
        assert _checked_out(engine) == 0
    finally:
        await group.aclose()
        await engine.dispose()


async def test_sqlite_parks_no_connection(tmp_path: Path) -> None:
    """SQLite: no pool pre-ping to save, so a drained worker gives its connection back to the
    pool at once, whatever ``linger`` says."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'linger.db'}")
    group = GroupCommit(create_session_factory(engine), linger=30)
    try:
        assert await group.run(_one) == 1
        await asyncio.sleep(0.05)
        assert _checked_out(engine) == 0
    finally:
        await group.aclose()
        await engine.dispose()


async def _one(session: AsyncSession) -> int:
    """A step that reads on any database."""
    return int(await session.scalar(text("SELECT 1")))


async def test_a_parked_connection_the_server_ended_is_not_used(postgres_url: str) -> None:
    """PostgreSQL: the server ends a parked connection's backend (a restart, an idle timeout).
    A parked connection is not pre-pinged, but asyncpg sees its socket closed while it sits
    idle: the next step does not run on it (which would fail it: nothing runs a lone step
    again) but on a fresh connection from the pool."""
    engine = create_engine(postgres_url)
    admin = create_engine(postgres_url)
    checkouts = _checkouts(engine)
    group = GroupCommit(create_session_factory(engine), linger=30)
    try:
        parked = await group.run(_backend_pid)
        await asyncio.sleep(0.05)
        async with admin.connect() as conn:  # waits (5 s at most) until the backend is gone
            ended = await conn.scalar(
                text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": parked}
            )
        assert ended is True
        await asyncio.sleep(0.2)  # the loop reads the server's goodbye and the socket's end
        assert len(checkouts) == 1

        fresh = await group.run(_backend_pid)
        assert fresh != parked
        assert len(checkouts) == 2
        await group.aclose()
        assert _checked_out(engine) == 0
    finally:
        await group.aclose()
        await engine.dispose()
        await admin.dispose()
