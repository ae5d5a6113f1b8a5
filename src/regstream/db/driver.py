"""The database driver's own connection under a session's transaction, for hand-written SQL.

Why by hand, and only here: a statement through SQLAlchemy's execution layer (compiled-cache
lookup, parameter processing, the greenlet hop, the DB-API cursor adapter, result set-up) cost
more than the statement itself on the pipeline's hottest path. Measured on appending a step's
log entries (one ``UPDATE ... RETURNING`` and one insert of 3 rows, ``bench/append_bench.py``):
SQLAlchemy ~440-560 µs of CPU on PostgreSQL and ~200 µs on SQLite; the same on the driver ~75 µs
on SQLite, and ~225 µs on PostgreSQL as one statement (one round trip instead of two). Everything
else keeps going through SQLAlchemy. Statements run in the session's transaction, so they commit
or roll back with it; the SQL is written per dialect (``$n`` for asyncpg, ``?`` for SQLite).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["Driver", "of"]


@dataclass(frozen=True, slots=True)
class Driver:
    """``postgres``: an ``asyncpg.Connection``; otherwise our inline aiosqlite connection."""

    postgres: bool
    connection: Any

    async def fetch_one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The first row of the result, or None."""
        if self.postgres:
            row = await self.connection.fetchrow(sql, *args)
            return None if row is None else tuple(row)
        rows = await self.connection.execute_fetchall(sql, args)
        return tuple(rows[0]) if rows else None

    async def execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        await self.connection.executemany(sql, rows)  # the same call on both drivers


async def of(session: AsyncSession) -> Driver:
    """The driver connection of ``session``'s transaction (begun if it was not yet)."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    postgres = connection.dialect.name == "postgresql"
    if postgres and not raw.driver_connection.is_in_transaction():
        # SQLAlchemy's asyncpg adapter sends BEGIN lazily, with the transaction's first
        # statement: a statement on the driver before that would run (and commit) on its own.
        # Let the adapter begin (one round trip; only when no statement of the transaction
        # went through SQLAlchemy yet). SQLite: our "begin" listener has sent BEGIN IMMEDIATE.
        await connection.exec_driver_sql("SELECT 1")
    return Driver(postgres, raw.driver_connection)
