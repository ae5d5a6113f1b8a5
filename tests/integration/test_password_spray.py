"""Issue 16: a password spray from one address must not slow sign-in for everyone else, nor fill
the audit table; a chunked body past the limit on the sign-in route is a 413, not a 500.

The live server trusts ``X-Forwarded-For`` (``REGSTREAM_TRUST_PROXY``), so one test client
speaks for two addresses: the sprayer's and a colleague's.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from sqlalchemy import func, select

from regstream.db.tables import AuditEntry
from tests.conftest import SettingsFactory
from tests.support import create_user, run_in_db, serve_app

SPRAYER = "203.0.113.66"
COLLEAGUE = "198.51.100.7"
SPRAY = 200
PER_ADDRESS = 10  # REGSTREAM_LOGIN_ATTEMPTS_PER_ADDRESS_PER_MINUTE (30 by default): fewer
# guesses reach a password check, so the test ends sooner; the spray outlasts the sign-ins


def _audit_rows(live: Any, client_ip: str) -> tuple[int, int]:
    """(all entries from ``client_ip``, of which throttling summaries)."""

    async def count(session: Any) -> tuple[int, int]:
        rows = (
            await session.execute(
                select(AuditEntry.details).where(AuditEntry.client_ip == client_ip)
            )
        ).all()
        summaries = [d for (d,) in rows if d and d.get("reason") == "throttled"]
        return len(rows), len(summaries)

    return run_in_db(live, count)  # type: ignore[no-any-return]


# The sprayer runs in a process of its own, as an attacker would: its 200 connections must not
# share this process's event loop and GIL with the colleague's timed sign-in. It prints "started"
# once its first answer is in, then one JSON list of every status code.
_SPRAYER = """
import asyncio, json, os, sys, uuid
import httpx

os.nice(19)  # an attacker's own CPU is not the server's: here they share two cores

async def main(url, count, address):
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        answered = []
        first = asyncio.Event()

        async def guess():
            body = {"username": "u" + uuid.uuid4().hex[:12], "password": "Spring2026!x"}
            response = await client.post(
                "/api/auth/login", json=body, headers={"X-Forwarded-For": address}
            )
            answered.append(response.status_code)
            first.set()

        tasks = [asyncio.create_task(guess()) for _ in range(count)]
        await first.wait()
        print("started", flush=True)
        await asyncio.gather(*tasks)
        print(json.dumps(answered), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


async def test_spray_from_one_address_leaves_sign_in_fast_for_others(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(trust_proxy=True, login_attempts_per_address_per_minute=PER_ADDRESS)
    with serve_app(settings) as live:
        password = "correct horse battery 7"
        user = create_user(live, "operator", password=password, token=False)
        colleague = {"username": user.username, "password": password}
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
            started = time.monotonic()  # for the failure message: this machine's own pace
            response = await client.post(
                "/api/auth/login", json=colleague, headers={"X-Forwarded-For": COLLEAGUE}
            )
            alone = time.monotonic() - started
            assert response.status_code == 200, response.text
        sprayer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _SPRAYER, live.url, str(SPRAY), SPRAYER,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert sprayer.stdout is not None
            line = await asyncio.wait_for(sprayer.stdout.readline(), 60)
            assert line == b"started\n"  # the spray is under way: its first answers are in
            took = []
            async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
                for _ in range(3):
                    started = time.monotonic()
                    response = await client.post(
                        "/api/auth/login", json=colleague, headers={"X-Forwarded-For": COLLEAGUE}
                    )
                    took.append(time.monotonic() - started)
                    assert response.status_code == 200, response.text
            colleague_done = time.monotonic()
            answered = json.loads(await asyncio.wait_for(sprayer.stdout.readline(), 120))
            spray_done = time.monotonic()
            assert await asyncio.wait_for(sprayer.wait(), 10) == 0
        finally:
            if sprayer.returncode is None:
                sprayer.kill()
                await sprayer.wait()

        # issue 16's target: under 1 s while the spray runs (was 14 s with 120 guesses). The
        # median of three, all during the spray: on a shared 2-core machine one sign-in can meet
        # a neighbour's load burst; with the spray unthrottled, every one of them waits seconds.
        assert spray_done > colleague_done, "the spray ended before the colleague's sign-ins"
        assert sorted(took)[1] < 1.0, (
            f"valid sign-ins took {[round(t, 2) for t in took]} s ({alone:.2f} s before the spray)"
        )
        # the sprayer's guesses past its limit never reached a password check
        assert answered.count(401) == PER_ADDRESS
        assert answered.count(429) == SPRAY - PER_ADDRESS
        # one audit entry per guess checked, one summary for the throttled rest
        assert _audit_rows(live, SPRAYER) == (PER_ADDRESS + 1, 1)


async def _chunks(total: int, size: int = 8192) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        yield b"x" * piece
        sent += piece


async def test_chunked_body_past_the_limit_on_sign_in_is_413(
    make_settings: SettingsFactory,
) -> None:
    with serve_app(make_settings()) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=10) as client:
            response = await client.post(
                "/api/auth/login", content=_chunks(100 * 1024),
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
    assert "content-length" not in response.request.headers  # it really was chunked
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"] == "PAYLOAD_TOO_LARGE"


async def test_audit_counts_are_readable(make_settings: SettingsFactory) -> None:
    """The helper above reads the audit table of a live server (guards the spray test's check)."""
    with serve_app(make_settings()) as live:
        async with httpx.AsyncClient(base_url=live.url) as client:
            body = {"username": "nobody-here", "password": "wrong-password-1"}
            assert (await client.post("/api/auth/login", json=body)).status_code == 401

        async def total(session: Any) -> int:
            return int((await session.execute(select(func.count(AuditEntry.id)))).scalar_one())

        assert run_in_db(live, total) >= 1
        assert _audit_rows(live, "127.0.0.1") == (1, 0)
