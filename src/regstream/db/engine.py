"""Engine and session factory, and migrations applied at start.

SQLite notes: we run WAL mode and start every transaction with ``BEGIN IMMEDIATE``. A deferred
SQLite transaction that reads and then writes gets ``SQLITE_BUSY`` at once (no busy wait) when
another writer got there first; taking the write lock up front makes concurrent runs queue for it
instead (SQLAlchemy's documented pysqlite recipe). Statements run on the event loop and a busy
lock is waited for with ``asyncio.sleep`` (``sqlite_inline``), up to ``SQLITE_BUSY_TIMEOUT_S``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from regstream.db import sqlite_inline

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30.0


def create_engine(url: str, *, pool_size: int = 20) -> AsyncEngine:
    if url.startswith("sqlite"):
        creator = sqlite_inline.connector(SQLITE_BUSY_TIMEOUT_S)
        engine = create_async_engine(
            url, connect_args={"async_creator_fn": creator},
            pool_size=pool_size, max_overflow=pool_size,
        )  # fmt: skip
        _configure_sqlite(engine)
        return engine
    return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class Session(AsyncSession):
    """Closes *inline* as the ``async with`` block ends.

    SQLAlchemy's ``AsyncSession.__aexit__`` (and ``async_sessionmaker.begin()``'s) run the
    commit/rollback and the close in a task of their own, shielded from cancellation: the
    transaction stays open one more event-loop turn. On SQLite that turn is spent holding the
    database's write turn (``sqlite_inline``), so under load every transaction waited a loop turn
    for the one before it (a lock convoy: ~40 requests queued for seconds; the soak test with a
    busy core accepted its 1,000 clicks in 89 s, 35 s without). Here the session closes in the
    caller's own step; SQLAlchemy's shielded close is kept as the cleanup when that is
    interrupted (cancelled while a PostgreSQL rollback is in flight).
    """

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        try:
            await self.close()
        except BaseException:
            await super().__aexit__(type_, value, traceback)
            raise


class SessionFactory(async_sessionmaker[AsyncSession]):
    """``async_sessionmaker`` whose ``begin()`` commits inline too (see ``Session``)."""

    def begin(self) -> AbstractAsyncContextManager[AsyncSession]:  # type: ignore[override]
        return _transaction(self)


@asynccontextmanager
async def _transaction(factory: SessionFactory) -> AsyncIterator[AsyncSession]:
    async with factory() as session, session.begin():
        yield session


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    return SessionFactory(engine, class_=Session, expire_on_commit=False)


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


async def migrate(engine: AsyncEngine) -> None:
    """Apply every Alembic migration up to head (idempotent)."""

    def _upgrade(connection: Connection) -> None:
        cfg = _alembic_config()
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")

    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
