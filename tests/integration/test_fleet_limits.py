"""Issue 15 item 4: limits are fleet-wide. Two instances on one PostgreSQL database and one Redis
share the sign-in throttle, the process rate and the streams per user; a killed instance's
stream slots expire; with Redis down sign-in still works, throttled per process, and stream
slots count per process, then rejoin Redis.

Each test fails with the old per-process counters: over two instances every limit was twice
the setting, and a refusal never came.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync
from redis.asyncio import Redis

from regstream.auth.limits import LimitStore
from regstream.auth.principal import Principal, Role
from regstream.auth.stream_slots import KEY_PREFIX, StreamSlots
from regstream.auth.streams import StreamGuard
from regstream.core_banking.simulator.server import RunningSimulator
from regstream.realtime.connections import create_client
from regstream.realtime.embedded import EmbeddedRedis
from regstream.realtime.hub import Hub, QueuedStream
from tests.conftest import SettingsFactory
from tests.support import (
    TEST_SECRET_KEY,
    StreamClient,
    create_user,
    free_port,
    metric_value,
    serve_app,
    wait_until,
)

WRONG = {"username": "kim", "password": "not-the-password-1"}


async def _codes(urls: list[str], path: str, count: int, **kw: Any) -> list[httpx.Response]:
    """``count`` POSTs to ``path``, alternating over ``urls``, one after the other."""
    answers = []
    for i in range(count):
        async with httpx.AsyncClient(base_url=urls[i % len(urls)], timeout=10) as client:
            answers.append(await client.post(path, **kw))
    return answers


async def test_sign_in_throttle_and_process_rate_are_shared_by_two_instances(
    make_settings: SettingsFactory, postgres_url: str, tmp_path: Path
) -> None:
    def settings(name: str) -> Any:
        return make_settings(
            database_url=postgres_url, data_dir=tmp_path / name,
            login_attempts_per_minute=3, process_rate_per_minute=3,
        )  # fmt: skip

    with serve_app(settings("a")) as a, serve_app(settings("b")) as b:
        urls = [a.url, b.url]
        answers = await _codes(urls, "/api/auth/login", 4, json=WRONG)
        assert [r.status_code for r in answers] == [401, 401, 401, 429]
        assert 1 <= int(answers[-1].headers["Retry-After"]) <= 60
        assert answers[-1].json()["error"] == "TOO_MANY_REQUESTS"

        headers = create_user(a, "operator").headers
        # the rate is checked before the registration is looked up: unknown ids cost one each
        answers = await _codes(urls, "/api/registrations/999999/process", 4, headers=headers)
        assert [r.status_code for r in answers] == [404, 404, 404, 429]
        assert 1 <= int(answers[-1].headers["Retry-After"]) <= 60


async def test_streams_per_user_are_counted_across_instances(
    make_settings: SettingsFactory, postgres_url: str, tmp_path: Path
) -> None:
    def settings(name: str) -> Any:
        return make_settings(
            database_url=postgres_url, data_dir=tmp_path / name, streams_per_user=2,
            sse_ping_interval=1.0,
        )  # fmt: skip

    with serve_app(settings("a")) as a, serve_app(settings("b")) as b:
        viewer = create_user(a, "viewer").headers
        other = create_user(a, "viewer").headers
        async with StreamClient(a.url, registration_id=1, headers=viewer):
            async with StreamClient(b.url, registration_id=2, headers=viewer) as on_b:
                for url in (a.url, b.url):
                    async with StreamClient(
                        url, registration_id=3, headers=viewer, wait_connected=False
                    ) as third:
                        assert third.response.status_code == 429
                        assert third.response.headers["retry-after"] == "5"
                async with StreamClient(a.url, registration_id=3, headers=other) as fine:
                    assert fine.response.status_code == 200  # another user's count
                assert on_b.response.status_code == 200
            # the stream on b ended: its slot is free for a stream on a (at once: b frees it
            # when its hub lets the stream go; the renewal would take up to 3 intervals)
            async with StreamClient(a.url, registration_id=4, headers=viewer) as again:
                assert again.response.status_code == 200


ENV_DROP = ("REDIS_URL", "REDIS_HOST", "DATABASE_URL", "T24_BASE_URL", "REGSTREAM_SECRET_KEY")


@contextmanager
def _serve_process(env: dict[str, str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``regstream serve`` in a process of its own (so it can be SIGKILLed), stopped by PID."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "regstream", "serve", "--port", str(port), "--no-demo"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("server not ready:\n" + log.read_text()[-3000:])
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


async def test_a_killed_instance_s_stream_slots_expire(
    make_settings: SettingsFactory, postgres_url: str, tmp_path: Path,
    redis_server: EmbeddedRedis, t24: RunningSimulator,
) -> None:  # fmt: skip
    a_settings = make_settings(
        database_url=postgres_url, data_dir=tmp_path / "a", streams_per_user=2,
        sse_ping_interval=1.0,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    env.update(
        REGSTREAM_DATA_DIR=str(tmp_path / "b"), REDIS_URL=redis_server.url,
        T24_BASE_URL=t24.base_url, DATABASE_URL=postgres_url,
        REGSTREAM_SECRET_KEY=TEST_SECRET_KEY, REGSTREAM_STREAMS_PER_USER="2",
        SSE_PING_INTERVAL="1",
    )  # fmt: skip
    port = free_port()
    with serve_app(a_settings) as a:
        viewer = create_user(a, "viewer").headers
        with _serve_process(env, port, tmp_path / "b.log") as b:
            b_url = f"http://127.0.0.1:{port}"
            async with (
                StreamClient(b_url, registration_id=1, headers=viewer),
                StreamClient(b_url, registration_id=2, headers=viewer),
            ):
                async with StreamClient(
                    a.url, registration_id=3, headers=viewer, wait_connected=False
                ) as third:
                    assert third.response.status_code == 429  # b's two count on a
                os.killpg(b.pid, signal.SIGKILL)  # no goodbye: its slots are left in Redis
                b.wait(10)
                killed = time.monotonic()
                assert _slots(redis_server) == 2

                async def admitted() -> bool:
                    async with StreamClient(
                        a.url, registration_id=3, headers=viewer, wait_connected=False
                    ) as fourth:
                        return fourth.response.status_code == 200

                # slot ttl: 3 guard intervals of 0.5 s, at least 2 s
                await wait_until(admitted, timeout=15, interval=0.2, what="b's slots to expire")
                assert time.monotonic() - killed >= 1.0  # they did not vanish by themselves
                # and a's own stream, closed, gives its slot back
                await wait_until(lambda: _slots(redis_server) == 0, timeout=5, what="no slots")


def _slots(redis_server: EmbeddedRedis) -> int:
    """Stream slots held in Redis, every user, live or expired-but-not-yet-swept."""
    client = redis_sync.Redis.from_url(redis_server.url)
    try:
        now_ms = int(time.time() * 1000)
        return sum(
            int(client.zcount(key, now_ms, "+inf"))
            for key in client.scan_iter(match=f"{KEY_PREFIX}*")
        )
    finally:
        client.close()


async def test_sign_in_with_redis_down_is_throttled_per_process_never_500(
    make_settings: SettingsFactory, redis_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="regstream.auth.limits")
    with serve_app(make_settings(login_attempts_per_minute=3)) as live:
        password = "correct horse battery 9"
        user = create_user(live, "operator", password=password, token=False)
        first = await _codes([live.url], "/api/auth/login", 2, json=WRONG)
        assert [r.status_code for r in first] == [401, 401]
        assert metric_value("regstream_limits_shared") == 1

        redis_server.stop()
        # the two attempts made while Redis was up still count: one more, then refused
        answers = await _codes([live.url], "/api/auth/login", 3, json=WRONG)
        assert [r.status_code for r in answers] == [401, 429, 429]
        assert answers[1].json()["error"] == "TOO_MANY_REQUESTS"
        good = {"username": user.username, "password": password}
        ok = await _codes([live.url], "/api/auth/login", 1, json=good)
        assert ok[0].status_code == 200, ok[0].text
        assert metric_value("regstream_limits_shared") == 0
        outage_lines = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
        assert len(outage_lines) == 1  # once per outage, not per request


# --- the stream guard's slots on a real Redis, without HTTP ------------------------------------


def _guard(redis_server: EmbeddedRedis, cap: int = 2) -> tuple[StreamGuard, Redis]:
    client = create_client(redis_server.url, name="test-limits", retries=0, socket_timeout=1.0)
    assert isinstance(client, Redis)
    store = LimitStore(client, secret=b"k", retry_interval=0.1)
    slots = StreamSlots(store, cap=cap, ttl=30.0)
    return StreamGuard(per_user=cap, interval=0.5, slots=slots), client


def _viewer(operator_id: int = 7) -> Principal:
    return Principal(
        operator_id=operator_id, username="v", role=Role.VIEWER, credential_kind="token",
        credential_id=1,
    )  # fmt: skip


async def _open(guard: StreamGuard, hub: Hub, principal: Principal) -> QueuedStream | None:
    if not await guard.admit(principal, hub):
        return None
    stream = QueuedStream(1, max_buffer=1024, info=principal)
    hub.attach(stream)
    return stream


async def test_a_stream_leaving_the_hub_frees_its_slot_in_redis(
    redis_server: EmbeddedRedis,
) -> None:
    guard, client = _guard(redis_server)
    hub = Hub(on_detach=guard.on_detach)
    try:
        first = await _open(guard, hub, _viewer())
        second = await _open(guard, hub, _viewer())
        assert first is not None and second is not None
        assert await _open(guard, hub, _viewer()) is None  # the cap, counted in Redis
        assert _slots(redis_server) == 2
        hub.detach(first)  # the hub's hook frees the slot in a task of its own
        await wait_until(lambda: _slots(redis_server) == 1, timeout=5, what="slot freed")
        assert await _open(guard, hub, _viewer()) is not None
    finally:
        await client.aclose()


async def test_slots_count_per_process_while_redis_is_out_and_rejoin_it(
    redis_server: EmbeddedRedis,
) -> None:
    guard, client = _guard(redis_server)
    hub = Hub(on_detach=guard.on_detach)
    try:
        first = await _open(guard, hub, _viewer())
        assert first is not None and await _open(guard, hub, _viewer()) is not None
        redis_server.stop()
        # this process's two streams count: the cap holds per process
        assert await _open(guard, hub, _viewer()) is None
        hub.detach(first)
        late = await _open(guard, hub, _viewer())
        assert late is not None  # admitted per process (its slot is not in Redis)
        redis_server.start()  # an empty Redis (no persistence): the renewal puts back both

        async def renewed() -> bool:
            await guard.renew(hub)
            return _slots(redis_server) == 2

        await wait_until(renewed, timeout=10, interval=0.2, what="slots renewed into Redis")
        assert await _open(guard, hub, _viewer()) is None  # and count fleet-wide again
    finally:
        await client.aclose()
