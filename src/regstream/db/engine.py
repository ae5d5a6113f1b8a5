"""Engine and session factory, and migrations (at start, or by ``regstream migrate``; see
"migrations" below for the lock that lets instances start together).

SQLite runs on SQLAlchemy's ``sqlite+aiosqlite`` dialect as shipped: each connection's statements
run on aiosqlite's thread, so a statement or a wait for the write lock never blocks the event
loop. We run WAL mode and start every transaction with ``BEGIN IMMEDIATE``: a deferred SQLite
transaction that reads and then writes gets ``SQLITE_BUSY`` at once (no busy wait) when another
writer got there first; taking the write lock up front makes concurrent transactions queue for it
instead (SQLAlchemy's documented pysqlite/aiosqlite recipe), each for up to
``SQLITE_BUSY_TIMEOUT_S`` (SQLite's own busy timeout, on the connection's thread). The group
commit's sync steps (a run's steps) run instead on a second, stock ``pysqlite`` engine on the
same file with the same settings, a whole batch in one worker thread (``threaded_sessions``):
aiosqlite hands every statement to its thread 3-4 times; none for an in-memory database.

Sessions are SQLAlchemy's as shipped (``expire_on_commit=False``). ``async_sessionmaker.begin()``
commits and closes in a task of its own (shielded from cancellation), one event-loop turn after
the block ends; on SQLite that turn is spent holding the write lock, and under load every
transaction then waited a turn for the one before it (a lock convoy, 9d530a7: the soak test
accepted its 1,000 clicks in 89 s instead of 35 s). The hot path (``group_commit``) therefore
uses ``transaction(sessions)``: ``AsyncSession.begin()`` commits in the caller's own step, and
only the close (the connection back to the pool, the transaction already over) is SQLAlchemy's
shielded task.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy import event, make_url, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30.0


def create_engine(
    url: str, *, pool_size: int = 20, statement_timeout: float | None = None
) -> AsyncEngine:
    """``statement_timeout`` (PostgreSQL; ``REGSTREAM_DB_STATEMENT_TIMEOUT`` in the service):
    no statement, lock wait, connection attempt or wait for a pooled connection takes longer, so
    a locked table or an unreachable server gives a quick error (answered 503) instead of
    requests that hang. Migrations lift it for their own transaction (``migrate``)."""
    if url.startswith("sqlite"):
        engine = create_async_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S},
            pool_size=pool_size, max_overflow=pool_size,
        )  # fmt: skip
        _configure_sqlite(engine.sync_engine)
        return engine
    options: dict[str, Any] = {}
    if statement_timeout is not None:
        ms = str(max(1, int(statement_timeout * 1000)))
        options["connect_args"] = {
            "timeout": statement_timeout,  # asyncpg: connecting, authentication included
            "server_settings": {"statement_timeout": ms, "lock_timeout": ms},
        }
        options["pool_timeout"] = statement_timeout
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, **options
    )


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


#: What ``create_session_factory`` makes.
SessionFactory = async_sessionmaker[AsyncSession]


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    return async_sessionmaker(engine, expire_on_commit=False)


def threaded_sessions(sessions: SessionFactory) -> sessionmaker[Session] | None:
    """SQLite: sessions of a synchronous engine (stock ``pysqlite``) on the same database file and
    settings, for work that runs whole in a thread of its own (``GroupCommit.run_sync``: a batch
    of steps, one thread hand-off, where aiosqlite hands off 3-4 times per statement); None on
    other databases. Its engine belongs to the caller (``dispose`` it when done)."""
    engine = sessions.kw.get("bind")
    if not isinstance(engine, AsyncEngine) or engine.dialect.name != "sqlite":
        return None
    if engine.url.database in (None, "", ":memory:") or "memory" in str(engine.url):
        return None  # a second connection would open another, empty database
    sync = create_sync_engine(
        make_url(engine.url).set(drivername="sqlite"),
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S},
    )
    _configure_sqlite(sync)
    return sessionmaker(sync, expire_on_commit=False)


@asynccontextmanager
async def transaction(
    sessions: SessionFactory, *, bind: AsyncConnection | None = None
) -> AsyncIterator[AsyncSession]:
    """A session in a transaction that commits (or rolls back) in the caller's own step as the
    block ends, unlike ``sessions.begin()`` (see the module doc): for transactions that run
    back to back under load. ``bind``: a connection the caller holds (not in a transaction),
    on which the session begins and commits its own."""
    new = sessions() if bind is None else sessions(bind=bind)
    async with new as session, session.begin():
        yield session


# --- migrations --------------------------------------------------------------------------------
# Every instance migrates at start (unless REGSTREAM_MIGRATE_ON_START=false) and a release
# pipeline may run ``regstream migrate`` at the same time. On PostgreSQL the whole upgrade runs in
# one transaction that first takes a transaction-level advisory lock on MIGRATION_LOCK_KEY, so
# instances started together take turns: the first migrates, the others wait for its commit and
# then find the schema at head (issue 15: without it, one of two instances died on
# ``UniqueViolationError ... pg_type_typname_nsp_index``, two CREATE TABLEs of one name racing).
# The lock is released with the transaction, also when the process dies. SQLite needs no lock:
# its database belongs to one host's data dir, and its first write takes the database's lock.

#: ``pg_advisory_xact_lock`` key held while migrating ("regstrm" in ASCII; any other user of the
#: same database would have to pick this exact 64-bit number to wait on us).
MIGRATION_LOCK_KEY = int.from_bytes(b"regstrm", "big")


class SchemaNotAtHead(Exception):
    """The database's schema is not this release's (older, with migrations off at start, or
    newer); ``str(exc)`` is one line."""


@dataclass(frozen=True, slots=True)
class Migration:
    """What ``migrate`` did: the revision before (None: an empty database) and after (head)."""

    before: str | None
    after: str
    waited: bool  # another process held the migration lock when we asked for it

    def describe(self) -> str:
        if self.before == self.after:
            return f"database schema already at head ({self.after}); nothing to do"
        start = "an empty database" if self.before is None else self.before
        return f"database schema migrated from {start} to {self.after} (head)"


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None  # the package ships its migrations
    return head


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _check_known(current: str | None) -> None:
    """A schema a newer release migrated (a revision this one does not ship) is refused in one
    line: alembic would fail on it with "Can't locate revision", and this release's code was
    not written for that schema."""
    if current is None:
        return
    try:
        ScriptDirectory.from_config(_alembic_config()).get_revision(current)
    except CommandError:
        raise SchemaNotAtHead(
            f"database schema is at {current}, newer than this release (its head is "
            f"{head_revision()}): a newer release migrated it; run that release"
        ) from None


async def migrate(engine: AsyncEngine) -> Migration:
    """Apply every Alembic migration up to head (idempotent); on PostgreSQL under the
    migration lock, so any number of processes may call it at once."""

    def _upgrade(connection: Connection) -> tuple[str | None, str | None]:
        before = _current_revision(connection)
        _check_known(before)
        cfg = _alembic_config()
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")
        return before, _current_revision(connection)

    async with engine.begin() as conn:
        waited = False
        if conn.dialect.name == "postgresql":
            # the service's statement and lock timeouts (create_engine) are for requests: a
            # migration may rewrite a big table, and waiting for another process's migration
            # is waiting for a lock
            await conn.execute(text("SET LOCAL statement_timeout = 0"))
            await conn.execute(text("SET LOCAL lock_timeout = 0"))
            key = {"key": MIGRATION_LOCK_KEY}
            if not await conn.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), key):
                waited = True
                log.info("waiting for another process's database migration to finish")
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), key)
        before, after = await conn.run_sync(_upgrade)
    assert after is not None
    return Migration(before, after, waited)


async def prepare_schema(engine: AsyncEngine, *, migrate_on_start: bool) -> None:
    """At start: migrate (``REGSTREAM_MIGRATE_ON_START``, the default), else ``require_head``."""
    if migrate_on_start:
        await migrate(engine)
    else:
        await require_head(engine)


async def require_head(engine: AsyncEngine) -> None:
    """Raise ``SchemaNotAtHead`` unless the schema is this release's (start-up with
    ``REGSTREAM_MIGRATE_ON_START=false``: the release pipeline runs ``regstream migrate``)."""
    async with engine.connect() as conn:
        current = await conn.run_sync(_current_revision)
    _check_known(current)
    head = head_revision()
    if current != head:
        found = "empty" if current is None else f"at {current}"
        raise SchemaNotAtHead(
            f"database schema is {found}, this release needs {head}: run `regstream migrate` "
            "first (REGSTREAM_MIGRATE_ON_START=false)"
        )


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means "the database cannot answer now" (down, refusing, cut off, a
    statement or lock wait past ``REGSTREAM_DB_STATEMENT_TIMEOUT``, no pooled connection in
    time), as opposed to a bug or a constraint: requests answer it 503, runs wait it out."""
    if isinstance(exc, OperationalError | PoolTimeout | OSError):  # OSError: refused, timeouts
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    state = getattr(exc.orig, "sqlstate", None) or ""  # PostgreSQL's SQLSTATE (asyncpg)
    return state in _UNAVAILABLE_STATES or state[:2] in _UNAVAILABLE_CLASSES


# SQLSTATEs of a database that cannot answer now: a statement or lock wait cut by the timeouts,
# and the classes "connection exception", "insufficient resources", "operator intervention"
# (shutting down, starting up, too many connections)
_UNAVAILABLE_STATES = {"57014", "55P03"}  # query_canceled, lock_not_available
_UNAVAILABLE_CLASSES = {"08", "53", "57"}


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
