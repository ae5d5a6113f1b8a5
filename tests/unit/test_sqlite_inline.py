"""``db/sqlite_inline``: statements on the loop, a busy write lock waited for without blocking it.

Real SQLite files (no database server involved), two engines on one file like two workers."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from regstream.db import engine as db_engine
from regstream.db.sqlite_inline import InlineConnection, connector


async def test_statements_run_on_the_callers_thread(tmp_path: Path) -> None:
    conn = await connector(1.0)(str(tmp_path / "a.db"))
    try:
        assert isinstance(conn, InlineConnection)
        assert not conn._thread.is_alive()  # no worker thread was started
        seen: list[int] = []
        await conn.create_function("tid", 0, lambda: threading.get_ident())
        async with conn.execute("SELECT tid()") as cursor:
            seen.extend(row[0] for row in await cursor.fetchall())
        assert seen == [threading.get_ident()]
    finally:
        await conn.close()
    with pytest.raises(ValueError):
        await conn.execute("SELECT 1")


async def test_a_busy_lock_is_waited_for_without_blocking_the_loop(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"
    first, second = db_engine.create_engine(url), db_engine.create_engine(url)
    try:
        async with first.begin() as conn:
            await conn.execute(text("CREATE TABLE t (n INTEGER)"))
        ticks = 0
        release = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not release.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        async def holder() -> None:  # holds the write lock across awaits, like a slow request
            async with first.begin() as conn:
                await conn.execute(text("INSERT INTO t VALUES (1)"))
                await release.wait()

        async def writer() -> float:
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with second.begin() as conn:  # BEGIN IMMEDIATE is busy until holder commits
                await conn.execute(text("INSERT INTO t VALUES (2)"))
            return loop.time() - started

        tick_task = asyncio.create_task(ticker())
        hold_task = asyncio.create_task(holder())
        await asyncio.sleep(0.05)
        write_task = asyncio.create_task(writer())
        await asyncio.sleep(0.3)
        assert not write_task.done()  # still waiting for the lock ...
        ticks_while_waiting = ticks
        assert ticks_while_waiting >= 20  # ... while the loop kept running (5 ms ticks)
        release.set()
        waited = await asyncio.wait_for(write_task, 5)
        await hold_task
        await tick_task
        assert waited >= 0.3
        async with first.connect() as conn:
            rows = (await conn.execute(text("SELECT n FROM t ORDER BY n"))).scalars().all()
        assert rows == [1, 2]
    finally:
        await first.dispose()
        await second.dispose()


async def test_a_lock_held_past_the_timeout_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_engine, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    path = str(tmp_path / "c.db")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("PRAGMA journal_mode=WAL")
    blocker.execute("CREATE TABLE t (n INTEGER)")
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    engine = db_engine.create_engine(url)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(OperationalError, match="locked"):
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO t VALUES (1)"))
        elapsed = asyncio.get_running_loop().time() - started
        assert 0.15 <= elapsed < 2.0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        await engine.dispose()


async def test_transactions_end_in_their_own_step_not_a_loop_turn_later(tmp_path: Path) -> None:
    """100 concurrent transactions (writes, and reads that autobegin) need a few loop turns, not
    one each: a transaction left open until the next turn holds SQLite's write turn, and then
    every other one queues behind it (the convoy the soak test hit under load)."""
    engine = db_engine.create_engine(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    sessions = db_engine.create_session_factory(engine)
    loop = asyncio.get_running_loop()
    turns = 0
    ticking = True

    def tick() -> None:
        nonlocal turns
        turns += 1
        if ticking:
            loop.call_soon(tick)

    try:
        async with sessions.begin() as session:
            await session.execute(text("CREATE TABLE t (n INTEGER)"))

        async def write(n: int) -> None:
            async with sessions.begin() as session:
                await session.execute(text("INSERT INTO t VALUES (:n)"), {"n": n})

        async def read() -> int:
            async with sessions() as session:
                return int((await session.execute(text("SELECT count(*) FROM t"))).scalar_one())

        loop.call_soon(tick)
        await asyncio.gather(*(write(n) if n % 2 else read() for n in range(100)))
        ticking = False
        async with sessions() as session:
            assert (await session.execute(text("SELECT count(*) FROM t"))).scalar_one() == 50
        assert turns < 20, f"{turns} loop turns for 100 transactions"
    finally:
        ticking = False
        await engine.dispose()
