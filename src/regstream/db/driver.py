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
violation is raised as SQLAlchemy's ``IntegrityError``, as from ``session.execute``.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["Driver", "Sql", "of", "sql"]

_INTEGRITY = (asyncpg.IntegrityConstraintViolationError, sqlite3.IntegrityError)


@dataclass(frozen=True, slots=True)
class Sql:
    """One statement, as each driver takes it."""

    postgres: str
    sqlite: str


def sql(text: str) -> Sql:
    """A statement written for both: PostgreSQL's ``$n`` placeholders, which SQLite reads as
    ``?n``. So no casts (``$1::int``) and no dialect-only syntax; write ``Sql`` for those."""
    return Sql(text, re.sub(r"\$(\d+)", r"?\1", text))


@dataclass(frozen=True, slots=True)
class Driver:
    """``postgres``: an ``asyncpg.Connection``; otherwise our inline aiosqlite connection."""

    postgres: bool
    connection: Any

    async def fetch_all(self, statement: Sql, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            if self.postgres:
                return [
                    tuple(row) for row in await self.connection.fetch(statement.postgres, *args)
                ]
            return [tuple(row) for row in await self.connection.execute_fetchall(
                statement.sqlite, args
            )]  # fmt: skip
        except _INTEGRITY as exc:
            raise IntegrityError(statement.postgres, None, exc) from exc

    async def fetch_one(self, statement: Sql, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The first row of the result, or None."""
        rows = await self.fetch_all(statement, args)
        return rows[0] if rows else None

    async def execute_many(self, statement: Sql, rows: list[tuple[Any, ...]]) -> None:
        text = statement.postgres if self.postgres else statement.sqlite
        try:
            await self.connection.executemany(text, rows)  # the same call on both drivers
        except _INTEGRITY as exc:
            raise IntegrityError(statement.postgres, None, exc) from exc


async def of(session: AsyncSession) -> Driver:
    """The driver connection of ``session``'s transaction (begun if it was not yet)."""
    # kept for the transaction: a group commit's steps ask for it several times per transaction
    transaction = session.sync_session.get_transaction()
    cached = session.info.get(_CACHE_KEY)
    if cached is not None and transaction is not None and cached[0] is transaction:
        return cached[1]  # type: ignore[no-any-return]
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    postgres = connection.dialect.name == "postgresql"
    driver_connection = raw.driver_connection
    assert driver_connection is not None  # a checked-out connection
    if postgres and not driver_connection.is_in_transaction():
        # SQLAlchemy's asyncpg adapter sends BEGIN lazily, with the transaction's first
        # statement: a statement on the driver before that would run (and commit) on its own.
        # Let the adapter begin (one round trip; only when no statement of the transaction
        # went through SQLAlchemy yet). SQLite: our "begin" listener has sent BEGIN IMMEDIATE.
        await connection.exec_driver_sql("SELECT 1")
    driver = Driver(postgres, driver_connection)
    session.info[_CACHE_KEY] = (session.sync_session.get_transaction(), driver)
    return driver


_CACHE_KEY = "regstream.db.driver"
