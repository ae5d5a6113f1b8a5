"""``FleetMember.wait_for_work`` must let a cancellation through even when a wake-up arrives in
the same event-loop turn (a shutdown's own NOTIFY): on Python 3.11 ``asyncio.wait_for`` returns
the inner result instead, so the work-queue loop went on and ``serve`` never exited on SIGTERM
(found by tests/integration/test_fleet.py: 3 of 5 runs hung after "no validation left running")."""

from __future__ import annotations

import asyncio
from pathlib import Path

from regstream.db.engine import create_engine, create_session_factory
from regstream.pipeline.fleet import FleetMember


async def test_wait_for_work_cancelled_while_woken(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'unused.sqlite3'}")
    member = FleetMember(sessions=create_session_factory(engine), poll_interval=0.5)
    stop = False

    async def take_loop() -> None:  # the shape of Runner._take_loop
        while not stop:
            await member.wait_for_work()

    task = asyncio.create_task(take_loop())
    await asyncio.sleep(0.01)  # waiting for work
    member.work_queued()  # woken and cancelled in the same turn
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=3)
    stop = True
    if not done:
        await asyncio.wait({task}, timeout=3)
    await engine.dispose()
    assert task in done and task.cancelled()
