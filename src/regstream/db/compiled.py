"""PostgreSQL: the hot Core statements compiled once and sent to asyncpg from a sync step.

A validation's two appends (``registrations.Append``: one statement each on PostgreSQL,
``log_append.postgres``) cost ~220 us of CPU each through ``Connection.execute`` (the compiled
cache's key, the execution context, bind and result processing, the adapter's cursor), ~160 us
through ``exec_driver_sql`` and ~70 us on asyncpg itself (a scratch measurement while this was
written; ``bench/db_bench.py`` measures a validation's database work, bench/RESULTS.md run 17).
So they stay Core statements built from ``db/tables.py`` (Alembic and the type checker see
them), are compiled once per dialect (``statement.compile(dialect=…)``: its SQL and its
positional order, ``positiontup``), and go to the driver connection through SQLAlchemy's
public ``AdaptedConnection.run_async`` from inside the step's ``run_sync`` (no extra hop).

The transaction: SQLAlchemy's asyncpg adapter sends ``BEGIN`` lazily, with a connection's first
statement. A statement sent straight to asyncpg before that would run in autocommit, outside the
group commit's transaction. So ``fetch`` asks asyncpg (``is_in_transaction``) and sends a
transaction's first statement through ``exec_driver_sql``, which begins it
(tests/integration/test_data_layer.py: rows written so roll back with the step).

``fetch_many`` sends one statement for many parameter sets in one round trip (asyncpg's
``fetchmany``); the group commit uses it for the first statements of a batch's steps.

Errors are turned into SQLAlchemy's as its adapter would: a constraint violation into
``IntegrityError`` (a unique violation fails the enrolment step), any other server error into
``DBAPIError`` (its ``orig`` keeps the SQLSTATE, which ``engine.unavailable`` reads; asyncpg
reports a value it cannot encode as one too, ``DataError``), and a lost connection into
``OperationalError`` after invalidating the pooled connection. No parameters in any of them:
they are personal data (a driver's or server's message may still quote a value, so the service
never logs an error's text, only its type).

Parameters are given as the driver takes them: JSON values as JSON text (SQLAlchemy's asyncpg
codec for ``json`` encodes text), dates as ``date``, arrays as lists.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import asyncpg
from sqlalchemy import Executable
from sqlalchemy.engine import AdaptedConnection, Connection, Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.sql.compiler import SQLCompiler

#: the parameter that a statement sent by ``fetch_many`` returns as its first column
KEY = "fetch_set"
#: ``Connection.info`` key: the SQLAlchemy transaction whose first statement went through it
_BEGUN = "regstream.compiled.begun"


@functools.cache
def _compiled(
    statement: Executable, dialect: Dialect
) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """The SQL, its parameters' names in order, and the values the statement holds (literals
    the statement was built with, as ``in_progress=False``)."""
    compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
    if not isinstance(compiled, SQLCompiler) or compiled.positiontup is None:
        raise TypeError("a statement with positional parameters is needed")
    return compiled.string, tuple(compiled.positiontup), dict(compiled.params)


def fetch(
    conn: Connection, statement: Executable, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """``statement``'s rows for ``params`` (every bind parameter by name), in ``conn``'s
    transaction (PostgreSQL on asyncpg, called inside ``run_sync``)."""
    sql, args = _args(statement, conn.dialect, params)
    adapted = _adapted(conn)
    if _begins(conn, adapted):
        # SQLAlchemy's adapter begins with its first statement: the first of each of its
        # transactions goes through it, whatever the server says (its commit sends COMMIT only
        # for a transaction it began)
        rows = [tuple(row) for row in conn.exec_driver_sql(sql, tuple(args))]
        conn.info[_BEGUN] = conn.get_transaction()
        return rows
    with _errors(conn, sql):
        records = adapted.run_async(lambda driver: driver.fetch(sql, *args))
    return [tuple(record) for record in records]


def fetch_many(
    conn: Connection, statement: Executable, param_sets: Sequence[Mapping[str, Any]]
) -> list[list[tuple[Any, ...]]]:
    """``fetch`` for each of ``param_sets``, sent together: asyncpg's ``fetchmany`` sends every
    execution, then one sync, so many statements cost one round trip (bench/RESULTS.md run 19:
    ~12 us of CPU per statement instead of ~150). Its answer is every execution's rows in one
    list, so ``statement`` must return the bind parameter ``KEY`` as its first column: it is
    set here to each set's index and tells whose rows are whose (a set whose statement returned
    no rows gets ``[]``). One failing execution raises (as a failing ``fetch`` does); what the
    sets before it wrote stays in the transaction, which the caller then rolls back (on a
    server error PostgreSQL has aborted it already)."""
    sets = [{**params, KEY: i} for i, params in enumerate(param_sets)]
    out: list[list[tuple[Any, ...]]] = [[] for _ in sets]
    adapted = _adapted(conn)
    start = 0
    if sets and _begins(conn, adapted):  # the transaction's first statement: through ``fetch``
        out[0] = fetch(conn, statement, sets[0])
        start = 1
    if start == len(sets):
        return out
    sql = _compiled(statement, conn.dialect)[0]
    argsets = [_args(statement, conn.dialect, params)[1] for params in sets[start:]]
    with _errors(conn, sql):
        records = adapted.run_async(lambda driver: driver.fetchmany(sql, argsets))
    for record in records:
        out[record[0]].append(tuple(record))
    return out


def _args(
    statement: Executable, dialect: Dialect, params: Mapping[str, Any]
) -> tuple[str, list[Any]]:
    """The SQL and its positional arguments for ``params``."""
    sql, names, held = _compiled(statement, dialect)
    return sql, [params[name] if name in params else _held(held, name) for name in names]


def _adapted(conn: Connection) -> AdaptedConnection:
    adapted = conn.connection.dbapi_connection
    if not isinstance(adapted, AdaptedConnection):
        raise TypeError("an async driver's connection is needed")
    return adapted


def _begins(conn: Connection, adapted: AdaptedConnection) -> bool:
    """Whether the next statement is the first of SQLAlchemy's transaction on ``conn``."""
    driver: asyncpg.Connection = adapted.driver_connection
    return conn.info.get(_BEGUN) is not conn.get_transaction() or not driver.is_in_transaction()


@contextmanager
def _errors(conn: Connection, sql: str) -> Iterator[None]:
    """The driver's errors as SQLAlchemy's adapter raises them (module docstring)."""
    try:
        yield
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise IntegrityError(sql, None, exc) from exc
    except asyncpg.PostgresError as exc:
        raise DBAPIError(sql, None, exc) from exc
    except (asyncpg.InterfaceError, OSError) as exc:  # the connection is gone or unusable
        conn.invalidate(exc)
        raise OperationalError(sql, None, exc, connection_invalidated=True) from exc


def _held(held: Mapping[str, Any], name: str) -> Any:
    """The value a statement holds for a parameter the caller did not give: only a literal it
    was built with (SQLAlchemy itself refuses a plain bind without a value; ``None`` here would
    compare with NULL and match nothing)."""
    value = held.get(name)
    if value is None:
        raise KeyError(f"a value is required for bind parameter {name!r}")
    return value
