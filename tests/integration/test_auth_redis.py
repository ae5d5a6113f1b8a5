"""Redis credentials: ``REDIS_PASSWORD``, an ACL user, and secrets kept out of output (issue 4)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as redis_sync

from regstream.config import ConfigError, load_settings
from regstream.core_banking.simulator.server import RunningSimulator
from regstream.realtime.embedded import EmbeddedRedis
from tests.conftest import SettingsFactory
from tests.support import REGISTRATION, StreamClient, auth_headers, free_port, serve_app

SECRET = "s3cr3t-Redis-pw-canary"
ACL_SECRET = "acl-user-pw-canary-42"


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A private redis-server that wants a password (default user) and has an ACL user."""
    server = EmbeddedRedis(directory=tmp_path / "locked", port=free_port())
    server.start()  # answers PING until the password is set below
    client = redis_sync.Redis(port=free_port_of(server))
    acl = ["ACL", "SETUSER", "regstream", "on", f">{ACL_SECRET}", "~*", "&*", "+@all"]
    client.execute_command(*acl)  # type: ignore[no-untyped-call]
    client.config_set("requirepass", SECRET)
    client.close()
    try:
        yield server
    finally:
        server.stop()


async def _works(live_url: str, headers: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=live_url, headers=headers) as client:
        assert (await client.get("/readyz")).json()["checks"]["redis"] == "ok"
        rid = (await client.post("/api/registrations", json=REGISTRATION)).json()["id"]
        async with StreamClient(live_url, registration_id=rid, headers=headers) as sse:
            assert (await client.post(f"/api/registrations/{rid}/process")).status_code == 202
            await sse.wait_final(rid)


async def test_redis_password(make_settings: SettingsFactory, locked_redis: EmbeddedRedis) -> None:
    url = f"redis://127.0.0.1:{locked_redis.port}/0"
    with serve_app(make_settings(redis_url=url, redis_password=SECRET)) as live:
        assert SECRET not in repr(live.settings)
        await _works(live.url, auth_headers(live))


async def test_redis_acl_user(make_settings: SettingsFactory, locked_redis: EmbeddedRedis) -> None:
    url = f"redis://127.0.0.1:{locked_redis.port}/0"
    settings = make_settings(redis_url=url, redis_username="regstream", redis_password=ACL_SECRET)
    with serve_app(settings) as live:
        await _works(live.url, auth_headers(live))
    # the same through REDIS_HOST/REDIS_PORT
    settings = make_settings(
        redis_url=None, redis_host="127.0.0.1", redis_port=locked_redis.port,
        redis_username="regstream", redis_password=ACL_SECRET,
    )  # fmt: skip
    assert settings.effective_redis_url == (
        f"redis://regstream:{ACL_SECRET}@127.0.0.1:{locked_redis.port}/0"
    )


async def test_wrong_redis_password_never_shows_the_secret(
    make_settings: SettingsFactory, locked_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-password-canary-777"
    url = f"redis://:{wrong}@127.0.0.1:{locked_redis.port}/0"
    caplog.set_level(logging.DEBUG)
    with serve_app(make_settings(redis_url=url)) as live:
        async with httpx.AsyncClient(base_url=live.url) as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert wrong not in ready.text
    assert wrong not in caplog.text
    assert caplog.text.count("regstream") >= 0


def test_bad_redis_url_error_hides_the_secret() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(redis_url=f"http://user:{SECRET}@example:6379")
    assert SECRET not in str(info.value)
    assert str(info.value).startswith("invalid configuration: REDIS_URL")


def test_rediss_url_is_accepted_with_separate_credentials() -> None:
    settings = load_settings(redis_url="rediss://cache.example:6380/0", redis_password=SECRET,
                             redis_username="app")  # fmt: skip
    assert settings.effective_redis_url == f"rediss://app:{SECRET}@cache.example:6380/0"
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())


@pytest.mark.timeout(60)
def test_serve_start_up_output_hides_secrets(
    tmp_path: Path, locked_redis: EmbeddedRedis, t24_base_url: str
) -> None:
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "REDIS_URL": f"redis://127.0.0.1:{locked_redis.port}/0",
        "REDIS_PASSWORD": SECRET,
        "T24_BASE_URL": t24_base_url,
        "T24_USERNAME": "t24user",
        "T24_PASSWORD": "t24-secret-canary",
        "REGSTREAM_SECRET_KEY": "hmac-secret-canary-0123456789abc",
        "REGSTREAM_DATA_DIR": str(tmp_path / "var"),
        "REGSTREAM_LOG_LEVEL": "INFO",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "regstream", "serve", "--port", str(port), "--demo"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        ready = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert ready is not None and ready.json()["checks"]["redis"] == "ok"
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=20)
    output = out.decode("utf-8", "replace")
    assert "demo sign-in: user demo" in output
    for secret in (SECRET, "t24-secret-canary", "hmac-secret-canary"):
        assert secret not in output, f"{secret} printed"


@pytest.fixture
def t24_base_url(t24: RunningSimulator) -> str:
    return t24.base_url


def free_port_of(server: EmbeddedRedis) -> int:
    assert server.port is not None
    return server.port
