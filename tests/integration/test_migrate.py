"""Migrations that cannot race (issue 15): ``regstream migrate`` processes started together on an
empty PostgreSQL database all succeed (they take turns on an advisory lock); ``serve`` with
``REGSTREAM_MIGRATE_ON_START=false`` refuses a schema not at head with one line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy import text

from regstream.core_banking.simulator.server import RunningSimulator
from regstream.db.engine import (
    MIGRATION_LOCK_KEY,
    SchemaNotAtHead,
    create_engine,
    head_revision,
    migrate,
    require_head,
)
from regstream.realtime.embedded import EmbeddedRedis
from tests.support import TEST_SECRET_KEY, free_port

ENV_DROP = ("REDIS_URL", "REDIS_HOST", "DATABASE_URL", "T24_BASE_URL", "REGSTREAM_SECRET_KEY")


def _env(tmp_path: Path, database_url: str, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ENV_DROP and not k.startswith("REGSTREAM_")
    }
    env.update(
        DATABASE_URL=database_url, REGSTREAM_SECRET_KEY=TEST_SECRET_KEY,
        REGSTREAM_DATA_DIR=str(tmp_path / "var"), REGSTREAM_LOG_LEVEL="WARNING", **extra,
    )  # fmt: skip
    return env


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def _fetch(url: str, sql: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(_plain(url), timeout=5)
    try:
        return [tuple(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()


def _regstream(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "regstream", *args], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_four_migrate_processes_started_together_on_an_empty_database_all_succeed(
    tmp_path: Path, postgres_url: str
) -> None:
    """What a fleet does when every instance migrates at start (`serve` runs the same
    ``db.engine.migrate``). The test holds the migration lock until all four wait for it, so
    they are released together. Without the lock in ``migrate`` they do not wait and this test
    fails at once; unsynchronised, four such processes on an empty database lost 1, 0, 3, 3 and 3
    of 4 (five runs) to ``UniqueViolationError`` on ``pg_type_typname_nsp_index``."""
    env = _env(tmp_path, postgres_url)
    head = head_revision()

    async def hold_the_lock_until_four_wait() -> list[subprocess.Popen[str]]:
        conn = await asyncpg.connect(_plain(postgres_url), timeout=5)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
            procs = [_regstream("migrate", env=env) for _ in range(4)]
            await _wait_for_waiters(conn, procs)
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
            return procs
        finally:
            await conn.close()

    procs = asyncio.run(hold_the_lock_until_four_wait())
    results = [(p.wait(60), *p.communicate()) for p in procs]
    assert [(code, err) for code, _, err in results] == [(0, "")] * 4, results
    lines = sorted(out.strip() for _, out, _ in results)
    waited = " (after waiting for another process's migration)"
    assert lines == sorted(
        [f"database schema migrated from an empty database to {head} (head){waited}"]
        + [f"database schema already at head ({head}); nothing to do{waited}"] * 3
    )
    assert asyncio.run(_fetch(postgres_url, "SELECT version_num FROM alembic_version")) == [(head,)]


def test_three_instances_started_together_on_an_empty_database_all_come_up(
    tmp_path: Path, postgres_url: str, redis_server: EmbeddedRedis, t24: RunningSimulator
) -> None:
    """The issue's target: `regstream serve` x 3 (migrating at start, the default) on a fresh
    database, released together by the test's hold on the migration lock; all three ready."""
    ports = [free_port() for _ in range(3)]
    servers: list[subprocess.Popen[str]] = []

    async def start_while_holding_the_lock() -> None:
        conn = await asyncpg.connect(_plain(postgres_url), timeout=5)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
            for n, port in enumerate(ports):
                env = _env(
                    tmp_path / str(n), postgres_url, REDIS_URL=redis_server.url,
                    T24_BASE_URL=t24.base_url, REGSTREAM_DRAIN_DELAY="0",
                    REGSTREAM_DRAIN_SPREAD="0",
                )  # fmt: skip
                servers.append(_regstream("serve", "--port", str(port), env=env))
            await _wait_for_waiters(conn, servers)
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        finally:
            await conn.close()

    try:
        asyncio.run(start_while_holding_the_lock())
        for port, server in zip(ports, servers, strict=True):
            _wait_ready(port, server)
        assert asyncio.run(_fetch(postgres_url, "SELECT version_num FROM alembic_version")) == [
            (head_revision(),)
        ]
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            _reap(server)


async def _wait_for_waiters(
    conn: asyncpg.Connection, procs: list[subprocess.Popen[str]], timeout: float = 60
) -> None:
    """Until every process in ``procs`` waits for the migration lock ``conn`` holds."""
    deadline = time.monotonic() + timeout
    waiting = 0
    while waiting < len(procs):
        assert time.monotonic() < deadline, f"only {waiting} of {len(procs)} waited for the lock"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        await asyncio.sleep(0.05)


def _wait_ready(port: int, server: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, server.communicate()
        assert time.monotonic() < deadline, f"serve on {port} did not become ready"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def _reap(server: subprocess.Popen[str]) -> None:
    try:
        server.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # its shutdown is not what these tests are about
        server.kill()
        server.communicate(timeout=10)


async def test_migrate_on_sqlite_and_again_is_a_no_op(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}")
    try:
        first = await migrate(engine)
        again = await migrate(engine)
    finally:
        await engine.dispose()
    head = head_revision()
    assert (first.before, first.after, first.waited) == (None, head, False)
    assert (again.before, again.after, again.waited) == (head, head, False)


def test_migrate_command_failure_is_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    env = _env(tmp_path, f"postgresql+asyncpg://regstream:pw-canary@127.0.0.1:{port}/none")
    done = subprocess.run(
        [sys.executable, "-m", "regstream", "migrate"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: migration failed: ")
    assert "pw-canary" not in done.stderr


def test_serve_without_migrate_on_start_refuses_a_schema_not_at_head(
    tmp_path: Path, postgres_url: str, redis_server: EmbeddedRedis, t24: RunningSimulator
) -> None:
    """REGSTREAM_MIGRATE_ON_START=false: one line and exit 1 on an empty database; after
    `regstream migrate`, the same command starts."""
    env = _env(
        tmp_path, postgres_url, REGSTREAM_MIGRATE_ON_START="false", REDIS_URL=redis_server.url,
        T24_BASE_URL=t24.base_url, REGSTREAM_DRAIN_DELAY="0", REGSTREAM_DRAIN_SPREAD="0",
    )  # fmt: skip
    port = free_port()
    serve = ("serve", "--port", str(port))
    refused = _regstream(*serve, env=env)
    code, (out, err) = refused.wait(60), refused.communicate()
    assert code == 1, (out, err)
    assert err == (
        f"error: database schema is empty, this release needs {head_revision()}: run "
        "`regstream migrate` first (REGSTREAM_MIGRATE_ON_START=false)\n"
    )
    assert (
        asyncio.run(
            _fetch(postgres_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        )
        == []
    )

    migrated = subprocess.run(
        [sys.executable, "-m", "regstream", "migrate"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert migrated.returncode == 0, migrated.stderr
    server = _regstream(*serve, env=env)
    try:
        _wait_ready(port, server)
    finally:
        server.terminate()
        _reap(server)


async def test_a_schema_newer_than_this_release_is_refused_in_one_line(database_url: str) -> None:
    """A newer release migrated the database (a rollback, or an old instance restarting during
    a roll-out): migrate and require_head both refuse, naming the revisions, instead of
    alembic's "Can't locate revision" traceback."""
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
        expected = (
            f"database schema is at 9999_future, newer than this release (its head is "
            f"{head_revision()}): a newer release migrated it; run that release"
        )
        with pytest.raises(SchemaNotAtHead) as migrating:
            await migrate(engine)
        assert str(migrating.value) == expected
        with pytest.raises(SchemaNotAtHead) as checking:
            await require_head(engine)
        assert str(checking.value) == expected
    finally:
        await engine.dispose()
