"""The database driver's own connection under a session's transaction, for hand-written SQL.

Why by hand, and only here: a statement through SQLAlchemy's execution layer (compiled-cache
lookup, parameter processing, the greenlet hop, the DB-API cursor adapter, result set-up) cost
more than the statement itself on the pipeline's hottest path. Measured on appending a step's
log entries (``bench/append_bench.py``, 3 entries, medians of 3 interleaved reps, this process's
CPU): through SQLAlchemy 227 µs on SQLite and 517 µs on PostgreSQL (an ``UPDATE ... RETURNING``
and an insert of the rows); on the driver 55 µs and 155 µs (PostgreSQL: one statement, so one
round trip instead of two). Only the statements every validation runs are written here
(appending log entries, the duplicate check's query, enrolling a user); everything else goes
through SQLAlchemy.

Statements run in the session's transaction, so they commit or roll back with it. A constraint
violation is raised as SQLAlchemy's ``IntegrityError`` and a lost PostgreSQL connection as its
``OperationalError`` (with the connection invalidated), as from ``session.execute``.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

__all__ = ["Bound", "Driver", "Sql", "of", "shifted", "sql"]

_INTEGRITY = (asyncpg.IntegrityConstraintViolationError, sqlite3.IntegrityError)


@dataclass(frozen=True, slots=True)
class Sql:
    """One statement, as each driver takes it."""

    postgres: str
    sqlite: str


@dataclass(frozen=True, slots=True)
class Bound:
    """A statement with its arguments, handed to another data function to run with its own
    (``registrations.append_events``: in the same statement on PostgreSQL, one round trip)."""

    statement: Sql
    args: tuple[Any, ...]


def shifted(text: str, by: int) -> str:
    """PostgreSQL ``text`` with its placeholders moved up by ``by`` (``$1`` becomes ``$(1+by)``),
    to follow another statement's in a combined one."""
    return re.sub(r"\$(\d+)", lambda m: f"${int(m.group(1)) + by}", text)


def sql(text: str) -> Sql:
    """A statement written for both: PostgreSQL's ``$n`` placeholders, which SQLite reads as
    ``?n``. So no casts (``$1::int``) and no dialect-only syntax; write ``Sql`` for those."""
    return Sql(text, re.sub(r"\$(\d+)", r"?\1", text))


@dataclass(frozen=True, slots=True)
class Driver:
    """``postgres``: an ``asyncpg.Connection``; otherwise our inline aiosqlite connection."""

    postgres: bool
    connection: Any
    owner: AsyncConnection  # SQLAlchemy's connection the driver connection belongs to

    async def fetch_all(self, statement: Sql, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            if self.postgres:
                rows = await self.connection.fetch(statement.postgres, *args)
            else:
                rows = await self.connection.execute_fetchall(statement.sqlite, args)
        except Exception as exc:  # noqa: BLE001 - translated, then re-raised
            raise await self._translate(statement, exc) from exc
        return [tuple(row) for row in rows]

    async def fetch_one(self, statement: Sql, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The first row of the result, or None."""
        rows = await self.fetch_all(statement, args)
        return rows[0] if rows else None

    async def execute_many(self, statement: Sql, rows: list[tuple[Any, ...]]) -> None:
        try:
            if self.postgres:
                await self.connection.executemany(statement.postgres, rows)
            else:
                cursor = await self.connection.executemany(statement.sqlite, rows)
                await cursor.close()
        except Exception as exc:  # noqa: BLE001 - translated, then re-raised
            raise await self._translate(statement, exc) from exc

    async def _translate(self, statement: Sql, exc: Exception) -> Exception:
        """What ``session.execute`` would have raised: ``IntegrityError`` for a constraint
        violation; for a connection that died, ``OperationalError``, with SQLAlchemy told
        (``invalidate``) so that it drops the connection instead of rolling back on it (a
        rollback there fails, and the group commit would fail its whole batch with that)."""
        if isinstance(exc, _INTEGRITY):
            return IntegrityError(statement.postgres, None, exc)
        if self.postgres and self.connection.is_closed():
            await self.owner.invalidate(exc)
            return OperationalError(statement.postgres, None, exc)
        return exc


async def of(session: AsyncSession) -> Driver:
    """The driver connection of ``session``'s transaction (begun if it was not yet)."""
    # kept for the transaction: a group commit's steps ask for it several times per transaction
    transaction = session.sync_session.get_transaction()
    cached = session.info.get(_CACHE_KEY)
    if (
        cached is not None
        and transaction is not None
        and cached[0] is transaction
        and transaction.is_active  # not after a failed flush, before the rollback
    ):
        return cached[1]  # type: ignore[no-any-return]
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    postgres = connection.dialect.name == "postgresql"
    driver_connection = raw.driver_connection
    assert driver_connection is not None  # a checked-out connection
    if postgres and not driver_connection.is_in_transaction():
        # SQLAlchemy's asyncpg adapter sends BEGIN lazily, with the transaction's first
        # statement: a statement on the driver before that would run (and commit) on its own.
        # Let the adapter begin (BEGIN and this SELECT: two round trips, once per transaction
        # whose first statement is one of ours). SQLite: our "begin" listener sent BEGIN
        # IMMEDIATE when the session took the connection.
        await connection.exec_driver_sql("SELECT 1")
    driver = Driver(postgres, driver_connection, connection)
    session.info[_CACHE_KEY] = (session.sync_session.get_transaction(), driver)
    return driver


_CACHE_KEY = "regstream.db.driver"
