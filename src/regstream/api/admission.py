"""Bounded, fair admission of stream start-ups (the history read, or the snapshot, of each stream).

A herd of reconnecting streams (what a neighbour's drain sends: thousands within a second) must
not take Redis connections, database connections or event-loop time from the publisher, the
subscription's probe and readiness. Each start-up reads the history (a resume: up to the whole
history) or the database (a snapshot), so at most ``concurrency`` of them run at once; the others
wait their turn in arrival order (first come, first served), at most ``queue_max`` of them and
for at most ``max_wait`` seconds. A start-up that finds the queue full, or waits too long, is
*deferred*: ``api/stream.py`` answers it with a jittered ``retry:`` hint and ends it, and the
client comes back later with the same ``Last-Event-ID`` (docs/architecture.md, "Resume herds").

``asyncio.Semaphore`` would do the counting, but it has no bound on its waiters and its
documentation promises no order; here the queue's length and order are the decision, so a deque
of futures is the whole mechanism.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from regstream import metrics


class StartGate:
    """``async with gate.admit() as admitted:`` (False: deferred, answer with a retry hint)."""

    def __init__(self, *, concurrency: int, queue_max: int, max_wait: float) -> None:
        if concurrency < 1 or queue_max < 0 or max_wait < 0:
            raise ValueError("concurrency must be >= 1, queue_max and max_wait >= 0")
        self.concurrency = concurrency
        self.queue_max = queue_max
        self.max_wait = max_wait
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[bool]:
        admitted = await self._acquire()
        try:
            yield admitted
        finally:
            if admitted:
                self._release()

    async def _acquire(self) -> bool:
        if self.running < self.concurrency and not self._waiting:
            self.running += 1
            return True
        if len(self._waiting) >= self.queue_max:
            metrics.STREAM_STARTS_DEFERRED.labels("queue full").inc()
            return False
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.max_wait)
        except TimeoutError:
            if turn.done():  # given the turn just as the wait ran out: take it
                return True
            self._waiting.remove(turn)
            metrics.STREAM_STARTS_DEFERRED.labels("waited too long").inc()
            return False
        except asyncio.CancelledError:  # the client went away while waiting
            if turn.done():
                self._release()
            else:
                self._waiting.remove(turn)
            raise
        return True

    def _release(self) -> None:
        # hand the slot straight to the next waiter (so ``running`` never drops and rises again,
        # which would let a newcomer overtake the queue)
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.running -= 1
