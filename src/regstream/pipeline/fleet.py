"""This instance as a member of the fleet: its heartbeat, and the wake-up when work is queued.

Every ``regstream serve`` process (each ``--workers`` child too) has a row in ``instances``
(``db/instances.py``): registered at start under a new id, its ``heartbeat_ms`` updated every
``REGSTREAM_HEARTBEAT_INTERVAL``, marked stopped at a clean shutdown. The runs an instance
holds are taken over by the others once its heartbeat is older than
``REGSTREAM_HEARTBEAT_TIMEOUT`` (``work_queue.take``). The heartbeat is a loop of its own, one
small statement per interval whatever the number of runs, independent of the runs' lease
(``REGSTREAM_LEASE_SECONDS``), which stays as a backstop.

Wake-up: on PostgreSQL a dedicated connection LISTENs for ``work_queue.announce``; whether or
not a notification arrives (the listener may be reconnecting), ``wait_for_work`` returns after
the poll interval, so queued work and dead instances' runs are found within it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from regstream import __version__
from regstream.db import instances, work_queue

log = logging.getLogger(__name__)


class FleetMember:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        engine: AsyncEngine | None = None,
        heartbeat_interval: float = 2.0,
        heartbeat_timeout: float = 10.0,
        poll_interval: float = 1.0,
    ) -> None:
        if heartbeat_timeout < 2 * heartbeat_interval:
            raise ValueError("heartbeat_timeout must be at least twice heartbeat_interval")
        self.instance_id = uuid.uuid4().hex
        self._sessions = sessions
        self._engine = engine
        self._interval = heartbeat_interval
        self.timeout_ms = int(heartbeat_timeout * 1000)
        self._poll = poll_interval
        self._work = asyncio.Event()
        self._stopped = False
        #: the row exists (so the runs this instance holds are not taken for a dead one's)
        self.registered = asyncio.Event()

    def work_queued(self) -> None:
        """Wake ``wait_for_work`` (a notification, or this instance queued runs itself)."""
        self._work.set()

    async def wait_for_work(self) -> bool:
        """Wait for a wake-up, at most the poll interval. True: woken (not just the poll)."""
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that arrives in the same turn as the wake-up (a shutdown's own NOTIFY), and the
            # take loop then never ended (serve hung on SIGTERM; tests/unit/test_fleet_member.py)
            async with asyncio.timeout(self._poll):
                await self._work.wait()
            woken = True
        except TimeoutError:
            woken = False
        self._work.clear()
        return woken

    async def run(self) -> None:
        """Register, then beat (and listen, on PostgreSQL) until cancelled or stopped."""
        await self._register()
        listening = self._engine is not None and self._engine.dialect.name == "postgresql"
        async with asyncio.TaskGroup() as group:
            group.create_task(self._beat(), name="heartbeat")
            if listening:
                group.create_task(self._listen(), name="work-queue-listener")

    async def stop(self) -> None:
        """A clean shutdown: stop beating, mark the row stopped (the others take over what is
        left at once instead of after the timeout) and wake them."""
        self._stopped = True
        if not self.registered.is_set():
            return
        try:
            async with self._sessions.begin() as session:
                await instances.mark_stopped(
                    session, instance_id=self.instance_id, now_ms=_now_ms()
                )
                await work_queue.announce(session)
        except Exception as exc:  # noqa: BLE001 - the heartbeat timeout covers it
            log.warning("could not mark this instance stopped: %s", type(exc).__name__)

    async def _register(self) -> None:
        delay = 0.5
        while not self._stopped:
            try:
                async with self._sessions.begin() as session:
                    await instances.register(
                        session, instance_id=self.instance_id, host=socket.gethostname(),
                        pid=os.getpid(), version=__version__, now_ms=_now_ms(),
                    )  # fmt: skip
                self.registered.set()
                log.info("instance %s registered (pid %d)", self.instance_id, os.getpid())
                return
            except Exception as exc:  # noqa: BLE001 - retried: the database may be starting
                log.warning("could not register this instance: %s", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._interval)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self._stopped:
                return
            try:
                async with self._sessions.begin() as session:
                    alive = await instances.beat(
                        session, instance_id=self.instance_id, now_ms=_now_ms()
                    )
                if not alive:
                    # the row was deleted or marked stopped behind our back: come back under
                    # a new id (the runs held under the old one are taken over by the fleet)
                    log.warning("instance %s no longer registered", self.instance_id)
                    self.registered.clear()
                    self.instance_id = uuid.uuid4().hex
                    await self._register()
            except Exception as exc:  # noqa: BLE001 - next beat; past the timeout we lose runs
                log.warning("heartbeat failed: %s", type(exc).__name__)

    async def _listen(self) -> None:
        assert self._engine is not None
        delay = 0.5
        while not self._stopped:
            try:
                async with work_queue.listen(self._engine, self.work_queued) as lost:
                    delay = 0.5
                    self.work_queued()  # anything announced while we were not listening
                    await lost.wait()
                log.warning("work queue listener connection lost; reconnecting")
            except Exception as exc:  # noqa: BLE001 - the poll covers the gap
                log.warning("work queue listener failed: %s", type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
