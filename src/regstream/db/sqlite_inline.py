"""aiosqlite without its thread: SQLite statements run on the event loop, busy waits do not.

Why by hand: aiosqlite runs every call (cursor, execute, fetch, close, commit) on a worker thread
and hands the result back through the loop. On our machines one hand-off costs ~100 µs of CPU
while the SQLite work of a pipeline statement costs 2-20 µs, so the hand-offs were most of the
pipeline's database time (bench/RESULTS.md, "Pipeline"). Local SQLite calls are short enough to
run inline, as long as nothing ever *waits* inline.

The only waiting SQLite does is for another connection's write lock (``SQLITE_BUSY``). Inside
one process, transactions (all of ours start with ``BEGIN``) queue on a first-come-first-served
``asyncio.Lock`` per database file, held from ``BEGIN`` until the connection is no longer in a
transaction: no writer can be starved by a stream of others, and SQLite itself never sees
contention from this process. Between processes (``serve --workers N``), connections run with
``busy_timeout = 0`` and a busy call is retried after an ``asyncio.sleep`` (1 ms doubling to
50 ms), which lets the holder finish. A busy call had no effect, so running it again is safe
(SQLite's documented rule for ``BEGIN IMMEDIATE`` and ``COMMIT``). Both waits end with
"database is locked" after ``busy_timeout_s``, as SQLite's own busy timeout would.

What does block the loop: the statement itself (microseconds for the pipeline's statements, a few
milliseconds for a large list page) and SQLite's WAL checkpoint, which runs in the commit that
crosses 1,000 WAL pages and fsyncs. That is the trade for the embedded default; a deployment that
cannot accept it uses PostgreSQL (``DATABASE_URL``), whose driver is asynchronous anyway.

Used through SQLAlchemy's aiosqlite dialect (``connect_args={"async_creator_fn": ...}``), so the
rest of the code base sees the same engine, sessions and errors as before.
"""

from __future__ import annotations

import asyncio
import sqlite3
import weakref
from collections.abc import Callable, Generator
from functools import partial
from typing import Any

import aiosqlite

_FIRST_BACKOFF_S = 0.001
_MAX_BACKOFF_S = 0.05
# one FIFO writer lock per (event loop, database file): asyncio locks belong to one loop
_WRITERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _writer_lock(database: str) -> asyncio.Lock:
    locks = _WRITERS.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(database, asyncio.Lock())


class _RunNow:
    """Stands in for aiosqlite's queue to its thread: runs each call at once, on this thread."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller, as aiosqlite
            if future is not None and not future.done():
                future.set_exception(exc)
            return
        if future is not None and not future.done():
            future.set_result(result)


class InlineConnection(aiosqlite.Connection):
    """An ``aiosqlite.Connection`` whose calls run on the caller's thread (see the module doc)."""

    def __init__(
        self, connector: Callable[[], sqlite3.Connection], busy_timeout_s: float, database: str
    ) -> None:
        super().__init__(connector, iter_chunk_size=64)
        self._tx = _RunNow()  # type: ignore[assignment]
        self._busy_timeout_s = busy_timeout_s
        self._database = database
        self._writer: asyncio.Lock | None = None  # held from BEGIN to the end of the transaction

    def __await__(self) -> Generator[Any, None, InlineConnection]:
        return self._open().__await__()  # no thread to start

    async def _open(self) -> InlineConnection:
        await self._connect()  # runs the connector at once (see _RunNow)
        return self

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        call = partial(fn, *args, **kwargs)
        deadline = asyncio.get_running_loop().time() + self._busy_timeout_s
        if self._writer is None and args and _is_begin(args[0]):
            await self._take_writer_lock(deadline)
        try:
            return await self._retry_busy(call, deadline)
        finally:
            if self._writer is not None and not self._in_transaction():
                self._writer.release()
                self._writer = None

    def stop(self) -> asyncio.Future[Any] | None:
        """Closing without ``close()`` (SQLAlchemy's terminate, a finaliser): SQLite rolls back,
        so this connection's turn as the writer ends too."""
        future = super().stop()
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        return future

    async def _take_writer_lock(self, deadline: float) -> None:
        lock = _writer_lock(self._database)
        try:
            async with asyncio.timeout_at(deadline):
                await lock.acquire()
        except TimeoutError:
            raise sqlite3.OperationalError("database is locked") from None
        self._writer = lock

    def _in_transaction(self) -> bool:
        conn = self._connection
        try:
            return conn is not None and conn.in_transaction
        except sqlite3.ProgrammingError:  # closed
            return False

    async def _retry_busy(self, call: Callable[[], Any], deadline: float) -> Any:
        backoff = _FIRST_BACKOFF_S
        while True:
            try:
                return call()
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:  # incl. extended codes
                    raise
                if asyncio.get_running_loop().time() + backoff > deadline:
                    raise
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)


def connector(busy_timeout_s: float) -> Callable[..., InlineConnection]:
    """An ``async_creator_fn`` for SQLAlchemy's aiosqlite dialect."""

    def connect(database: str, **kwargs: Any) -> InlineConnection:
        kwargs.pop("timeout", None)  # SQLite never waits by itself here, see the module doc
        kwargs["check_same_thread"] = False  # the pool may close a connection from its finaliser

        def open_sqlite() -> sqlite3.Connection:
            conn: sqlite3.Connection = sqlite3.connect(database, timeout=0, **kwargs)
            conn.execute("PRAGMA busy_timeout=0")
            return conn

        return InlineConnection(open_sqlite, busy_timeout_s, database)

    return connect


def _is_begin(sql: object) -> bool:
    return isinstance(sql, str) and sql.lstrip()[:5].upper() == "BEGIN"
