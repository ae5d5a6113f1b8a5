"""Shared fixtures: real Redis, real PostgreSQL, the T24 simulator, a live server.

In CI (``CI=true``) a test that needs Redis or PostgreSQL and cannot reach it FAILS instead of
skipping: a skipped test is not a passed one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from regstream.config import Settings
from regstream.core_banking.simulator import SimulatorConfig
from regstream.core_banking.simulator.server import RunningSimulator, serve_in_thread
from regstream.realtime.embedded import EmbeddedRedis, find_server_binary
from tests.cluster_support import PrivateCluster
from tests.support import TEST_SECRET_KEY, LiveServer, free_port, serve_app

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
PG_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def unavailable(what: str) -> None:
    """Skip locally, fail in CI."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI but unreachable")
    pytest.skip(f"{what} unreachable")


# --- Redis -------------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A private real redis-server on a free TCP port, for one test (free to kill/restart)."""
    try:
        find_server_binary()
    except Exception:  # noqa: BLE001
        unavailable("a redis-server binary")
    server = EmbeddedRedis(directory=tmp_path / "redis", port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _private_cluster() -> Iterator[PrivateCluster]:
    try:
        find_server_binary()
    except Exception:  # noqa: BLE001
        unavailable("a redis-server binary")
    if shutil.which("redis-cli") is None:
        unavailable("redis-cli (redis-cli --cluster create forms the cluster)")
    cluster = PrivateCluster()
    cluster.start()  # stops whatever it started if the cluster does not form
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[PrivateCluster]:
    """A private Redis Cluster (3 masters, 3 replicas) shared by a module's tests: use keys of
    the test's own and kill nothing (``fresh_redis_cluster`` for that)."""
    yield from _private_cluster()


@pytest.fixture
def fresh_redis_cluster() -> Iterator[PrivateCluster]:
    """A private Redis Cluster for one test, free to kill nodes of."""
    yield from _private_cluster()


# --- PostgreSQL --------------------------------------------------------------------------------


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    import asyncpg

    try:
        asyncio.run(_pg_admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError) as exc:
        unavailable(f"PostgreSQL at {PG_ADMIN_URL.rsplit('@', 1)[-1]} ({type(exc).__name__})")
    return True


@pytest.fixture
def postgres_url(postgres_available: bool) -> Iterator[str]:
    """A fresh PostgreSQL database for one test (dropped afterwards)."""
    name = f"regstream_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- T24 simulator -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def t24() -> Iterator[RunningSimulator]:
    """A shared simulator with no added latency (do not change its knobs; use ``t24_private``)."""
    with serve_in_thread(SimulatorConfig(latency_ms=0)) as sim:
        yield sim


@pytest.fixture
def t24_private() -> Iterator[RunningSimulator]:
    """A simulator of this test's own, free to reconfigure through ``/_sim/config``."""
    with serve_in_thread(SimulatorConfig(latency_ms=0)) as sim:
        yield sim


# --- the app -----------------------------------------------------------------------------------


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(
    tmp_path: Path, redis_server: EmbeddedRedis, t24: RunningSimulator
) -> SettingsFactory:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "var",
            "redis_url": SecretStr(redis_server.url),
            "t24_base_url": t24.base_url,
            "secret_key": SecretStr(TEST_SECRET_KEY),
            "t24_timeout": 2.0,
            "t24_deadline": 4.0,
            "probe_interval": 1.0,
            "lease_seconds": 5.0,
            # a test's server stops without a signal (no drain delay); its open streams are
            # closed over at most 0.5 s instead of REGSTREAM_DRAIN_SPREAD's 5 s
            "drain_spread": 0.5,
            # the collector is tuned once per serving process (gc_tuning.py); this process
            # starts many apps and keeps the interpreter's collector (test_gc_tuning.py)
            "gc_gen0_threshold": 0,
        }
        values.update(overrides)
        if isinstance(values.get("redis_url"), str):
            values["redis_url"] = SecretStr(values["redis_url"])
        return Settings(**values)

    return make


@pytest.fixture
def live(make_settings: SettingsFactory) -> Iterator[LiveServer]:
    """The whole service on SQLite + a private Redis + the shared simulator."""
    with serve_app(make_settings()) as server:
        yield server


@pytest.fixture(params=["transport", "queued"])
def stream_path(request: pytest.FixtureRequest) -> str:
    """The write path a stream test runs on (``api/takeover.py``): ``transport`` (taken over from
    uvicorn) or ``queued`` (``make_settings(stream_fast_path=False)``); check with
    ``tests.support.on_write_path``."""
    return str(request.param)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test fails the run: a skipped test is not a passed one."""
    if not IN_CI:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and session.exitstatus == 0:
        session.exitstatus = 1
        if reporter is not None:
            reporter.write_line(f"CI: {skipped} test(s) skipped; failing the run", red=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Browser tests last: Playwright's sync API runs its own event loop in the main thread."""
    items.sort(key=lambda item: "tests/browser/" in item.nodeid)
