"""Group commit: many short transactions committed as one.

A validation's steps are small transactions (a claim, a duplicate check with its log rows, an
outcome with its log rows). Under load dozens of runs reach a step at once, and each transaction's
fixed cost (a session, a pooled connection, ``BEGIN``, ``COMMIT``; on SQLite the write turn) was
most of the step's CPU (bench/RESULTS.md, run 9). ``GroupCommit.run(step)`` queues the step; one
task runs the queued steps one after another in a single transaction and commits once. Steps that
arrive meanwhile form the next batch: a lone step waits for nothing, and batches grow only with
load (no timer, so no added latency). ``max_open`` transactions may be open at once: one on
SQLite, where writers take turns anyway; a few on PostgreSQL, whose statements are network round
trips that one transaction at a time would leave the server waiting on.

Every step stays atomic. When a step raises, the batch is rolled back and each of its steps runs
again alone, in a transaction of its own, so the failing step fails alone (a lost lease, a unique
violation, which on PostgreSQL aborts the whole transaction) and the others commit. So a step
must be safe to run again after a rollback: it reads and writes only through the session it is
given and keeps its results to itself until it returns. Exceptions listed in ``decided`` are
outcomes a step reaches before it writes anything (a validation failure found by reading): they
go to that step's caller and the batch goes on.

A step whose caller was cancelled before the batch started is dropped; once its batch runs, it
commits or rolls back with the batch (as a transaction cancelled mid-commit may still commit).
What must follow a commit (publishing what was written, starting a run) goes in ``then``: the
worker calls it right after the commit, in commit order, whether or not the caller still waits.

A step is async (``run``: it gets the ``AsyncSession``) or sync (``run_sync``: it gets the
session's sync ``Session``, as ``AsyncSession.run_sync`` does). A sync step may declare its first
statement (``run_after``, a ``First``: a run's log append, which most steps begin with): on
PostgreSQL the first statements of a batch's consecutive sync steps are sent together before
those steps go on, one round trip per statement text (``compiled.fetch_many``), where a round trip
per step cost ~150 us of CPU each (bench/RESULTS.md run 19). The hot steps are sync: the
steps of a batch that follow one another run in one ``run_sync``, one hop into SQLAlchemy's
greenlet for all of them. On SQLite, sync steps run whole in a thread (``threaded_sessions``: a
stock ``pysqlite`` engine on the same file), one thread hand-off per batch where aiosqlite's
connection hands every statement to its thread 3-4 times; a batch of both kinds then commits
as consecutive transactions, one per kind (a transaction cannot span two connections), in
order. A thread cannot be cancelled: a worker cancelled while its thread commits waits for it
and settles that batch (the steps' ``then`` callbacks run) before it stops. The async path
(PostgreSQL) does the same once its ``COMMIT`` is sent: the transaction runs in a task of its
own, shielded from the worker's cancellation, which stops the steps while they run (the batch
rolls back) but waits for a ``COMMIT`` under way, then settles the batch. Both waits are
bounded (``settle_timeout``, 30 s: the server's statement timeout ends a lock wait long
before; a connection that died silently would not): past it the worker stops (and, on the async
path, cancels the transaction's task), and the catch-up republishes whatever did commit.

A worker keeps its connection from batch to batch while steps keep coming; when its queue runs
dry it ends, and on PostgreSQL with ``linger`` (the pipeline's: 0.25 s, shorter than the work
queue's 1 s poll, so an idle instance gives it back) leaves the connection for the next worker
for that long instead of giving it back to the pool. At a core's 50 ms latency the
queue runs dry between most batches, and each pool checkout's pre-ping was three round trips on
asyncpg: with the parked connection 0.07 pre-pings per validation instead of 0.63
(bench/RESULTS.md run 20). A parked connection is not pinged; one whose socket the server closed
meanwhile (a restart ends it) is seen closed by asyncpg and skipped. One that died without a
word fails the batch that uses it next, like the connection a busy worker keeps (its steps run
again alone on a fresh connection; a lone step fails, and the pipeline's outage handling runs
it again). ``aclose`` gives parked connections back at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import Executable
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from regstream.db import compiled
from regstream.db.engine import threaded_sessions, transaction

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
Step = Callable[[AsyncSession], Awaitable[T]]
SyncStep = Callable[[Session], T]
_Outcomes = list[tuple[bool, Any]]  # (raised, result or exception) per step


class First(Protocol[R_co]):
    """A sync step's first statement, known before the step runs (``run_after``)."""

    def execute(self, session: Session) -> R_co:
        """Run it in ``session`` (any database) and say what it did."""
        ...

    def statement(self) -> tuple[Executable, dict[str, Any]]:
        """The statement and its parameters on PostgreSQL; it returns the parameter
        ``compiled.KEY`` as its first column (``compiled.fetch_many``). Statements are grouped
        by identity: the same statement object for the same SQL (built once)."""
        ...

    def result(self, rows: list[tuple[Any, ...]]) -> R_co:
        """What ``statement``'s rows say (as ``execute`` returns it)."""
        ...


@dataclass(slots=True)
class _Entry(Generic[T]):
    step: Callable[..., Any]  # Step[T] (an AsyncSession) or, with ``sync``, SyncStep[T]
    then: Callable[[T], object] | None
    future: asyncio.Future[T]
    sync: bool
    first: First[Any] | None = None  # with ``sync``: ``step`` takes the session and its result


@dataclass(slots=True)
class _Held:
    """A worker's connection, kept from batch to batch while steps keep coming: one pool
    checkout (on PostgreSQL one pre-ping: with asyncpg BEGIN, a ping and ROLLBACK, three round
    trips) per busy spell instead of per batch."""

    connection: AsyncConnection | None = None


@dataclass(slots=True)
class _Parked:
    """A connection a worker left for the next one (``GroupCommit(linger=…)``), until
    ``expiry`` gives it back to the pool."""

    connection: AsyncConnection
    expiry: asyncio.TimerHandle


@dataclass(slots=True)
class _Committing:
    """Set once a batch's steps are done and its transaction commits (the async path)."""

    started: bool = False


class _StepRaised(Exception):
    """A step of a batch raised: roll the batch back and run its steps alone."""


class GroupCommit:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        max_batch: int = 64,
        max_open: int = 1,
        decided: tuple[type[Exception], ...] = (),
        settle_timeout: float = 30.0,
        linger: float = 0.0,
    ) -> None:
        self._sessions = sessions
        self._threaded = threaded_sessions(sessions)  # SQLite only
        bind = sessions.kw.get("bind")
        self._engine = bind if isinstance(bind, AsyncEngine) else None
        # PostgreSQL: the first statements of a batch's ``run_after`` steps go together
        self._pipelined = self._engine is not None and self._engine.dialect.name == "postgresql"
        self._max_batch = max_batch
        self._max_open = max_open
        self._settle_timeout = settle_timeout
        self._decided = decided
        self._queue: deque[_Entry[Any]] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        # PostgreSQL only: SQLite's engines have no pre-ping to save
        self._linger = linger if self._pipelined else 0.0
        self._parked: list[_Parked] = []
        self._expiring: set[asyncio.Future[None]] = set()  # parked connections being given back
        self._closed = False  # ``aclose`` ran: nothing is parked any more

    async def run(self, step: Step[T], then: Callable[[T], object] | None = None) -> T:
        """Run ``step`` in a transaction (shared with other steps) and return what it returned
        once that transaction committed; ``then(result)`` is called first, right after the
        commit, even if this caller was cancelled meanwhile (it must not block)."""
        return await self._enqueue(_Entry(step, then, self._future(), False))

    async def run_sync(self, step: SyncStep[T], then: Callable[[T], object] | None = None) -> T:
        """``run`` for a sync step, given a sync ``Session`` (on SQLite, in a thread)."""
        return await self._enqueue(_Entry(step, then, self._future(), True))

    async def run_after(
        self,
        first: First[R],
        step: Callable[[Session, R], T],
        then: Callable[[T], object] | None = None,
    ) -> T:
        """``run_sync`` for a step that begins with ``first``: ``step(session, what first
        did)``. On PostgreSQL the first statements of the batch's consecutive sync steps are
        sent together, one round trip per statement text (``compiled.fetch_many``; a step alone
        sends its own), before those steps run in order; on SQLite ``first.execute`` runs as
        the step begins. So a first statement may run before the batch's earlier sync steps:
        ``first`` and ``step`` must write only their own run's rows and not depend on what the
        batch's other steps write (a run's log append: its registration's row and log rows,
        and an enrolment whose unique violation fails only this step). A ``decided`` exception
        from ``step`` is an outcome only when ``first`` wrote nothing (the append's guard query
        found rows): it ends the step without ``then`` while the batch commits."""
        return await self._enqueue(_Entry(step, then, self._future(), True, first))

    async def idle(self, *, timeout: float) -> None:
        """Wait (bounded) until the batches being committed, if any, are done."""
        if self._workers:
            await asyncio.wait(set(self._workers), timeout=timeout)

    async def aclose(self) -> None:
        """Give the connections workers left for the next (``linger``) back to the pool, then
        ``close``. A worker that drains after this gives its connection back."""
        self._closed = True
        while self._parked:  # one at a time: cancelled midway, the rest stay on their timers
            parked = self._parked.pop()
            parked.expiry.cancel()
            await _release(_Held(parked.connection))
        if self._expiring:  # given back by their expiry just before: let them close
            await asyncio.wait(set(self._expiring), timeout=5)
        self.close()

    def close(self) -> None:
        """Close the connections of the sync steps' engine (SQLite), if any."""
        if self._threaded is not None:
            bind = self._threaded.kw["bind"]
            bind.dispose()

    @staticmethod
    def _future() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _enqueue(self, entry: _Entry[T]) -> T:
        self._queue.append(entry)
        if len(self._workers) < self._max_open:
            self._workers.add(asyncio.create_task(self._work(), name="group-commit"))
        return await entry.future

    async def _work(self) -> None:
        batch: list[_Entry[Any]] = []
        held = _Held()
        drained = False
        try:
            while self._queue:
                batch = []
                while self._queue and len(batch) < self._max_batch:
                    entry = self._queue.popleft()
                    if not entry.future.done():  # done: its caller was cancelled
                        batch.append(entry)
                if not batch:
                    continue
                if self._threaded is None:
                    await self._commit(batch, held, threaded=False)
                    continue
                for sync, group in itertools.groupby(batch, key=lambda e: e.sync):
                    part = [entry for entry in group if not entry.future.done()]
                    if part:
                        await self._commit(part, held, threaded=sync)
            drained = True
        except BaseException:  # this worker was cancelled (shutdown): settle what it holds
            for entry in batch:
                entry.future.cancel()
            if not self._workers - {asyncio.current_task()}:  # and nobody is left for the rest
                for entry in self._queue:
                    entry.future.cancel()
                self._queue.clear()
            raise
        finally:  # at once, not in a done callback: a step queued meanwhile needs a worker
            self._workers.discard(asyncio.current_task())
            if drained and self._linger > 0 and not self._closed:
                self._park(held)
            else:
                await _release(held)

    def _park(self, held: _Held) -> None:
        """Leave a drained worker's connection for the next worker, for ``linger`` seconds: when
        steps pause for a moment (the queue ran dry between batches), the next batch needs no
        pool checkout, whose pre-ping is three round trips on PostgreSQL's asyncpg (BEGIN, a
        ping, ROLLBACK; at a core's 50 ms latency 0.63 of them per validation, ~40 % of the
        database round trips, bench/RESULTS.md run 20). A parked connection is as fresh as one
        a busy worker keeps between batches (``_Held``): at most ``linger`` seconds idle; the
        next worker checks it is still usable (``_unpark``)."""
        connection, held.connection = held.connection, None
        if connection is None:
            return
        expiry = asyncio.get_running_loop().call_later(self._linger, self._expire, connection)
        self._parked.append(_Parked(connection, expiry))

    async def _unpark(self) -> AsyncConnection | None:
        """The connection parked last that is still usable, if any."""
        while self._parked:
            parked = self._parked.pop()
            parked.expiry.cancel()
            connection = parked.connection
            if _usable(connection):
                return connection
            await _release(_Held(connection))
        return None

    def _expire(self, connection: AsyncConnection) -> None:
        for i, parked in enumerate(self._parked):
            if parked.connection is connection:
                del self._parked[i]
                _close_later(connection, self._expiring)
                return

    async def _transaction(
        self, batch: list[_Entry[Any]], held: _Held, *, threaded: bool
    ) -> _Outcomes:
        """Run ``batch`` in one transaction and commit; raises ``_StepRaised`` (rolled back)."""
        if threaded:
            return await self._in_thread(batch)
        if held.connection is None and self._engine is not None:
            held.connection = await self._unpark() or await self._engine.connect()
        committing = _Committing()
        task = asyncio.ensure_future(self._in_session(batch, held.connection, committing))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # Cancelled while the steps run: they stop and the batch rolls back. Cancelled
            # during COMMIT: the server may commit whatever the client does (cancelling the
            # wait would not undo it), so let it finish and publish what it committed, then
            # stop, however often we are cancelled meanwhile (as ``_in_thread``).
            if not committing.started:
                task.cancel()
            if not await self._settle(batch, task, committing):
                # no answer to the COMMIT: stop; the catch-up republishes what it committed.
                # The task still unwinds on the connection: it closes it when done, not _work.
                connection, held.connection = held.connection, None
                task.add_done_callback(functools.partial(_discard, connection))
                task.cancel()
            raise

    async def _settle(
        self, batch: list[_Entry[Any]], task: asyncio.Future[_Outcomes], committing: _Committing
    ) -> bool:
        """The worker was cancelled while ``task`` ran ``batch``: wait for it (however often we
        are cancelled meanwhile: a shutdown cancels twice), at most ``settle_timeout``, then
        settle what it committed (``committing.started``: its steps were done). False: it was
        still running; gave up."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._settle_timeout
        while not task.done() and loop.time() < give_up_at:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=give_up_at - loop.time())
        if not task.done():
            log.warning("gave up waiting for a COMMIT after %.0f s", self._settle_timeout)
            return False
        if committing.started and not task.cancelled() and task.exception() is None:
            for entry, (failed, value) in zip(batch, task.result(), strict=True):
                _committed(entry, failed, value)
        return True

    async def _in_session(
        self, batch: list[_Entry[Any]], bind: AsyncConnection | None, committing: _Committing
    ) -> _Outcomes:
        """The steps in one transaction on ``bind``, then its commit (``committing``)."""
        async with transaction(self._sessions, bind=bind) as session:
            outcomes: _Outcomes = []
            for sync, group in itertools.groupby(batch, key=lambda e: e.sync):
                entries = list(group)
                if sync:  # one hop into the greenlet for the consecutive sync steps
                    outcomes += await session.run_sync(self._steps, entries)
                    continue
                for entry in entries:
                    try:
                        outcomes.append((False, await entry.step(session)))
                    except self._decided as exc:
                        outcomes.append((True, exc))
                    except (Exception, asyncio.CancelledError) as exc:
                        _reraise_if_cancelled(exc)
                        raise _StepRaised from exc
            committing.started = True  # the block's end commits
            return outcomes

    def _steps(self, session: Session, entries: list[_Entry[Any]]) -> _Outcomes:
        firsts = self._send_firsts(session, entries) if self._pipelined else None
        outcomes: _Outcomes = []
        for i, entry in enumerate(entries):
            try:
                if entry.first is None:
                    value = entry.step(session)
                elif firsts is not None:
                    value = entry.step(session, entry.first.result(firsts[i]))
                else:
                    value = entry.step(session, entry.first.execute(session))
                outcomes.append((False, value))
            except self._decided as exc:
                outcomes.append((True, exc))
            except Exception as exc:
                raise _StepRaised from exc
        return outcomes

    @staticmethod
    def _send_firsts(session: Session, entries: list[_Entry[Any]]) -> list[list[tuple[Any, ...]]]:
        """The rows of the entries' first statements, by entry (``[]`` for an entry without
        one), sent together per statement text; any failing fails the batch (its steps then
        run alone)."""
        rows: list[list[tuple[Any, ...]]] = [[] for _ in entries]
        by_statement: dict[Executable, list[tuple[int, dict[str, Any]]]] = {}
        try:  # a statement that cannot be built (or sent) fails the batch: its steps run alone
            for i, entry in enumerate(entries):
                if entry.first is not None:
                    statement, params = entry.first.statement()
                    by_statement.setdefault(statement, []).append((i, params))
            if not by_statement:
                return rows
            conn = session.connection()
            for statement, group in by_statement.items():
                if len(group) == 1:
                    i, params = group[0]
                    rows[i] = compiled.fetch(conn, statement, params)
                    continue
                sent = compiled.fetch_many(conn, statement, [params for _, params in group])
                for (i, _), got in zip(group, sent, strict=True):
                    rows[i] = got
        except Exception as exc:
            raise _StepRaised from exc
        return rows

    def _threaded_transaction(self, entries: list[_Entry[Any]]) -> _Outcomes:
        assert self._threaded is not None
        with self._threaded() as session, session.begin():
            return self._steps(session, entries)

    async def _in_thread(self, batch: list[_Entry[Any]]) -> _Outcomes:
        task = asyncio.ensure_future(asyncio.to_thread(self._threaded_transaction, batch))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # the thread goes on and may commit (SQLite's busy timeout bounds it): publish what
            # it committed, then stop
            await self._settle(batch, task, _Committing(started=True))
            raise

    async def _commit(self, batch: list[_Entry[Any]], held: _Held, *, threaded: bool) -> None:
        try:
            outcomes = await self._transaction(batch, held, threaded=threaded)
        except _StepRaised as raised:
            if len(batch) == 1:  # it ran alone already
                _answer(batch[0].future, True, raised.__cause__)
                return
            for entry in batch:
                if not entry.future.done():  # done: its caller was cancelled meanwhile
                    await self._alone(entry, held, threaded=threaded)
            return
        except Exception as exc:  # the transaction itself failed (BEGIN, COMMIT, connection)
            await _release(held)  # the next batch starts on a connection checked by the pool
            for entry in batch:
                _answer(entry.future, True, exc)
            return
        for entry, (failed, value) in zip(batch, outcomes, strict=True):
            _committed(entry, failed, value)

    async def _alone(self, entry: _Entry[Any], held: _Held, *, threaded: bool) -> None:
        try:
            ((failed, value),) = await self._transaction([entry], held, threaded=threaded)
        except _StepRaised as raised:
            _answer(entry.future, True, raised.__cause__)
        except (Exception, asyncio.CancelledError) as exc:
            _reraise_if_cancelled(exc)
            await _release(held)
            _answer(entry.future, True, exc)
        else:
            _committed(entry, failed, value)


#: closings of connections given up on (``_discard``), referenced until done
_closing: set[asyncio.Future[None]] = set()


def _discard(connection: AsyncConnection | None, task: asyncio.Future[Any]) -> None:
    """A given-up transaction's task is done: retrieve its outcome (unknown to its callers
    either way) and close its connection."""
    if not task.cancelled():
        task.exception()
    if connection is not None:
        _close_later(connection)


def _close_later(
    connection: AsyncConnection, also: set[asyncio.Future[None]] | None = None
) -> None:
    """Give ``connection`` back to the pool (closing it) in a task of its own, kept in
    ``_closing`` (and ``also``) until done."""
    with contextlib.suppress(RuntimeError):  # the loop is closing: nothing left to close on
        closing = asyncio.ensure_future(_release(_Held(connection)))
        for tasks in (_closing, also):
            if tasks is not None:
                tasks.add(closing)
                closing.add_done_callback(tasks.discard)


def _usable(connection: AsyncConnection) -> bool:
    """Whether a parked connection may serve the next batch: not closed or invalidated, and its
    driver has not seen the server close it (asyncpg notices while the connection sits idle, so
    one a restart ended is skipped without a round trip)."""
    if connection.closed or connection.invalidated:
        return False
    driver = (
        connection.sync_connection.connection.driver_connection
        if connection.sync_connection
        else None
    )
    is_closed = getattr(driver, "is_closed", None)
    return not (callable(is_closed) and is_closed())


async def _release(held: _Held) -> None:
    """Give the held connection back to the pool (closing it: a broken one is discarded)."""
    connection, held.connection = held.connection, None
    if connection is not None:
        with contextlib.suppress(Exception):
            await connection.close()


def _committed(entry: _Entry[Any], raised: bool, value: Any) -> None:
    """After the commit: the step's follow-up, then its caller's answer."""
    if not raised and entry.then is not None:
        try:
            entry.then(value)
        except Exception as exc:  # a bug in the follow-up: its caller hears of it
            log.error("after-commit work failed: %s", type(exc).__name__)
            raised, value = True, exc
    _answer(entry.future, raised, value)


def _reraise_if_cancelled(exc: BaseException) -> None:
    """A ``CancelledError`` is the worker's own cancellation only when the worker is being
    cancelled; one raised inside a step (it awaited something that was cancelled) is that
    step's failure, not a reason to stop every step queued behind it."""
    task = asyncio.current_task()
    if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
        raise exc


def _answer(future: asyncio.Future[Any], raised: bool, value: Any) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if raised:
        future.set_exception(value)
    else:
        future.set_result(value)
