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
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from regstream.db.engine import transaction

log = logging.getLogger(__name__)

T = TypeVar("T")
Step = Callable[[AsyncSession], Awaitable[T]]


@dataclass(slots=True)
class _Entry(Generic[T]):
    step: Step[T]
    then: Callable[[T], object] | None
    future: asyncio.Future[T]


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
    ) -> None:
        self._sessions = sessions
        self._max_batch = max_batch
        self._max_open = max_open
        self._decided = decided
        self._queue: deque[_Entry[Any]] = deque()
        self._workers: set[asyncio.Task[None]] = set()

    async def run(self, step: Step[T], then: Callable[[T], object] | None = None) -> T:
        """Run ``step`` in a transaction (shared with other steps) and return what it returned
        once that transaction committed; ``then(result)`` is called first, right after the
        commit, even if this caller was cancelled meanwhile (it must not block)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append(_Entry(step, then, future))
        if len(self._workers) < self._max_open:
            self._workers.add(asyncio.create_task(self._work(), name="group-commit"))
        return await future

    async def idle(self, *, timeout: float) -> None:
        """Wait (bounded) until the batches being committed, if any, are done."""
        if self._workers:
            await asyncio.wait(set(self._workers), timeout=timeout)

    async def _work(self) -> None:
        batch: list[_Entry[Any]] = []
        try:
            while self._queue:
                batch = []
                while self._queue and len(batch) < self._max_batch:
                    entry = self._queue.popleft()
                    if not entry.future.done():  # done: its caller was cancelled
                        batch.append(entry)
                if batch:
                    await self._commit(batch)
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

    async def _commit(self, batch: list[_Entry[Any]]) -> None:
        outcomes: list[tuple[bool, Any]] = []  # (raised, result or exception) per step
        try:
            async with transaction(self._sessions) as session:
                for entry in batch:
                    try:
                        outcomes.append((False, await entry.step(session)))
                    except self._decided as exc:
                        outcomes.append((True, exc))
                    except (Exception, asyncio.CancelledError) as exc:
                        _reraise_if_cancelled(exc)
                        raise _StepRaised from exc
        except _StepRaised as raised:
            if len(batch) == 1:  # it ran alone already
                _settle(batch[0].future, True, raised.__cause__)
                return
            for entry in batch:
                if not entry.future.done():  # done: its caller was cancelled meanwhile
                    await self._alone(entry)
            return
        except Exception as exc:  # the transaction itself failed (BEGIN, COMMIT, connection)
            for entry in batch:
                _settle(entry.future, True, exc)
            return
        for entry, (failed, value) in zip(batch, outcomes, strict=True):
            _committed(entry, failed, value)

    async def _alone(self, entry: _Entry[Any]) -> None:
        try:
            async with transaction(self._sessions) as session:
                result = await entry.step(session)
        except (Exception, asyncio.CancelledError) as exc:
            _reraise_if_cancelled(exc)
            _settle(entry.future, True, exc)
        else:
            _committed(entry, False, result)


def _committed(entry: _Entry[Any], raised: bool, value: Any) -> None:
    """After the commit: the step's follow-up, then its caller's answer."""
    if not raised and entry.then is not None:
        try:
            entry.then(value)
        except Exception as exc:  # a bug in the follow-up: its caller hears of it
            log.error("after-commit work failed: %s", type(exc).__name__)
            raised, value = True, exc
    _settle(entry.future, raised, value)


def _reraise_if_cancelled(exc: BaseException) -> None:
    """A ``CancelledError`` is the worker's own cancellation only when the worker is being
    cancelled; one raised inside a step (it awaited something that was cancelled) is that
    step's failure, not a reason to stop every step queued behind it."""
    task = asyncio.current_task()
    if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
        raise exc


def _settle(future: asyncio.Future[Any], raised: bool, value: Any) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if raised:
        future.set_exception(value)
    else:
        future.set_result(value)
