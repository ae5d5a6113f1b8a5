"""The server process killed mid-run (SIGKILL) and restarted; SIGTERM drains; Redis wedged.

These run ``regstream serve`` as a real subprocess against a private Redis, a T24 simulator
of the test's own (made slow, so runs are mid-flight) and a SQLite file.
"""

from __future__ import annotations

import asyncio
import contextlib
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
import orjson
from redis.asyncio import Redis

from regstream.core_banking.simulator.server import RunningSimulator
from regstream.realtime.embedded import EmbeddedRedis
from tests.support import StreamClient, auth_headers, free_port, serve_app, wait_until

ENV_DROP = ("REDIS_URL", "REDIS_HOST", "DATABASE_URL", "T24_BASE_URL", "REGSTREAM_SECRET_KEY")


def _env(tmp: Path, redis: EmbeddedRedis, sim: RunningSimulator, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    env.update(
        REGSTREAM_DATA_DIR=str(tmp / "var"), REDIS_URL=redis.url, T24_BASE_URL=sim.base_url,
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp / 'db.sqlite3'}", REGSTREAM_SECRET_KEY="k" * 32,
        REGSTREAM_PROCESS_RATE_PER_MINUTE="100000", REGSTREAM_LEASE_SECONDS="2",
        # each test's SIGTERM at teardown: 0.5 s of readiness off, not the default 5 s
        REGSTREAM_DRAIN_DELAY="0.5",
    )  # fmt: skip
    env.update(extra)
    return env


@contextmanager
def _serve(
    env: dict[str, str], port: int, log: Path, *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "regstream", "serve", "--port", str(port), *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("server not ready:\n" + log.read_text()[-3000:])
        yield proc
    finally:
        # the whole process group: `--workers N` children too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _token(log: Path) -> str:
    for line in log.read_text().splitlines():
        if "export REGSTREAM_TOKEN=" in line:
            return line.split("export REGSTREAM_TOKEN=", 1)[1].strip()
    raise AssertionError("no demo token printed:\n" + log.read_text()[-2000:])


async def _sim(sim: RunningSimulator, path: str, body: dict[str, Any] | None = None) -> Any:
    async with httpx.AsyncClient() as http:
        if body is None:
            return (await http.get(f"{sim.control_url}/{path}")).json()
        return (await http.post(f"{sim.control_url}/{path}", json=body)).json()


async def test_sigkill_mid_run_then_restart(
    tmp_path: Path, redis_server: EmbeddedRedis, t24_private: RunningSimulator
) -> None:
    await _sim(t24_private, "config", {"latency_ms": 300})
    env = _env(tmp_path, redis_server, t24_private)
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with _serve(env, port, log, "--demo") as first:
        headers = {"Authorization": f"Bearer {_token(log)}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=20) as http:
            rids = [item["id"] for item in
                    (await http.get("/api/registrations", params={"pageSize": 50})).json()["items"]]  # fmt: skip
            assert len(rids) == 10
            for rid in rids:
                assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
            await asyncio.sleep(0.45)  # mid-run: some lookups done, some in flight, some not begun
        killed_at_ms = time.time_ns() // 1_000_000
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    calls_before = (await _sim(t24_private, "stats"))["callsByCustomer"]

    redis = Redis.from_url(redis_server.url)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("service:registration-updates")
    finals: dict[int, list[str]] = {}
    try:
        with _serve(env, port, log):
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=20) as http:

                async def all_done() -> bool:
                    while (message := await pubsub.get_message(timeout=0.01)) is not None:
                        update = orjson.loads(message["data"])
                        if update.get("final"):
                            finals.setdefault(update["registrationId"], []).append(update["status"])
                    rows = [(await http.get(f"/api/registrations/{rid}")).json() for rid in rids]
                    return all(not r["inProgress"] and r["status"] != "PENDING" for r in rows)

                await wait_until(
                    all_done, timeout=60, interval=0.2, what="every run to end after restart"
                )
                rows = {rid: (await http.get(f"/api/registrations/{rid}")).json() for rid in rids}
    finally:
        await pubsub.aclose()
        await redis.aclose()

    from sqlalchemy import func, select

    from regstream.db.engine import create_engine, create_session_factory
    from regstream.db.tables import MobileUser, ProcessLogEntry

    engine = create_engine(env["DATABASE_URL"])
    try:
        async with create_session_factory(engine)() as session:
            entries = list(
                await session.scalars(select(ProcessLogEntry).order_by(ProcessLogEntry.seq))
            )
            per_cif = list(await session.execute(
                select(MobileUser.customer_number, func.count()).group_by(MobileUser.customer_number)
            ))  # fmt: skip
    finally:
        await engine.dispose()

    assert all(count == 1 for _, count in per_cif)  # nobody enrolled twice
    resumed = 0
    calls_after = (await _sim(t24_private, "stats"))["callsByCustomer"]
    for rid in rids:
        log_rows = [e for e in entries if e.registration_id == rid]
        finals_logged = [e for e in log_rows if e.stage is None]
        assert len(finals_logged) == 1, rid  # exactly one final status
        assert finals_logged[0].status == rows[rid]["status"]
        assert len(set(finals.get(rid, []))) <= 1  # never two different final statuses published
        kinds = [(e.stage, e.stage_status) for e in log_rows]
        if kinds.count(("duplicate_check", "started")) > 1:
            resumed += 1
        # a completed T24 lookup is never followed by another one
        if ("t24_lookup", "completed") in kinds:
            done_at = kinds.index(("t24_lookup", "completed"))
            assert ("t24_lookup", "started") not in kinds[done_at + 1 :], (rid, kinds)
    completed_before_kill = 0
    for rid in rids:
        done = [e for e in entries if e.registration_id == rid and e.stage == "t24_lookup"
                and e.stage_status == "completed" and e.timestamp_ms < killed_at_ms]  # fmt: skip
        if done:
            completed_before_kill += 1
            cif = rows_cif(rows, rid)
            # its result was in the process log: the restart did not call T24 again
            assert calls_after[cif] == calls_before[cif], (rid, cif)
    assert resumed >= 1, "the kill hit no run in flight; the test proved nothing"
    for rid in rids:
        if rid in finals:
            assert len(finals[rid]) == 1  # runs resumed after the restart published one final


def rows_cif(rows: dict[int, dict[str, Any]], rid: int) -> str:
    # masked in the API: "****00" → compare on the last two digits is ambiguous; use the demo map
    from regstream.core_banking.simulator.dataset import DEMO_APPLICANTS

    by_name = {(a.first_name, a.last_name): a.customer_number for a in DEMO_APPLICANTS}
    row = rows[rid]
    return by_name[(row["firstName"], row["lastName"])]


async def test_sigterm_drains(
    tmp_path: Path, redis_server: EmbeddedRedis, t24_private: RunningSimulator, stream_path: str
) -> None:
    """On both stream write paths (api/takeover.py)."""
    await _sim(t24_private, "config", {"latency_ms": 800})
    env = _env(
        tmp_path, redis_server, t24_private, REGSTREAM_SHUTDOWN_GRACE="10",
        REGSTREAM_DRAIN_DELAY="0.5", SSE_RETRY_MS="1000",
        REGSTREAM_STREAM_FAST_PATH=str(stream_path == "transport").lower(),
    )  # fmt: skip
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with _serve(env, port, log, "--demo") as server:
        headers = {"Authorization": f"Bearer {_token(log)}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=20) as http:
            rid = (await http.get("/api/registrations", params={"q": "Otieno"})).json()["items"][0][
                "id"
            ]
            async with StreamClient(url, headers=headers) as sse:
                assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
                await sse.wait_for(lambda fs: len(sse.updates(rid)) >= 3, what="run under way")
                server.send_signal(signal.SIGTERM)
                # the stream gets a retry hint and is closed so the browser moves on
                await wait_until(lambda: sse.closed, timeout=10, what="stream closed by the server")
                # (tests/integration/test_rolling_restart.py: the hint's jitter, the spread)
                last = sse.frames[-1]
                assert last.data is None and last.retry is not None and 500 <= last.retry <= 1500
                assert sse.raw.endswith(b"retry: %d\n\n" % last.retry)
        exit_code = await asyncio.to_thread(server.wait, 30)
    assert exit_code == 0, log.read_text()[-2000:]
    assert f"streams are written on the {stream_path} path" in log.read_text()
    # the running validation finished within the grace period: nothing left in progress
    from regstream.db import registrations
    from regstream.db.engine import create_engine, create_session_factory

    engine = create_engine(env["DATABASE_URL"])
    try:
        async with create_session_factory(engine)() as session:
            row = await registrations.get(session, registration_id=rid)
            assert row is not None and row.status == "APPROVED" and row.in_progress is False
    finally:
        await engine.dispose()


async def test_wedged_redis_turns_readiness_red_and_recovers(
    make_settings: Any, redis_server: EmbeddedRedis
) -> None:
    with serve_app(make_settings(probe_interval=0.5)) as live:
        headers = auth_headers(live, "admin")
        ids = await live.load_demo()
        async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=20) as http:
            assert (await http.get("/readyz")).status_code == 200
            assert redis_server.process is not None
            redis_server.process.send_signal(signal.SIGSTOP)  # alive, connected, silent
            try:

                async def red() -> bool:
                    body = (await http.get("/readyz")).json()
                    return bool(body["checks"]["subscription"] == "down")

                await wait_until(
                    red, timeout=10, what="readiness to notice the silent subscription"
                )
                metrics = (await http.get("/metrics")).text
                assert "regstream_redis_subscription_healthy 0.0" in metrics
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
            await wait_until(
                lambda: live.services.bus.brokers[0].healthy, timeout=20, what="subscriber rebuilt"
            )
            async with StreamClient(live.url, headers=headers) as sse:
                rid = ids["duplicate"]
                assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
                final = await sse.wait_final(rid)
            assert final["status"] == "DUPLICATE"
            assert (await http.get("/readyz")).status_code == 200
