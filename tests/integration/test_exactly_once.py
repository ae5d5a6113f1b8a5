"""Every committed update published exactly once, in order (issue 16, reliability 1-2).

Real parts only: private redis-server processes, the real PostgreSQL, ``regstream serve`` as a
subprocess. What is checked is what Redis holds and sends: a raw subscriber on the channel and
the history stream (XRANGE), per ``(registrationId, seq)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
from redis.asyncio import Redis
from sqlalchemy import func, select

from regstream.core_banking.simulator.server import RunningSimulator
from regstream.db.engine import create_engine, create_session_factory
from regstream.db.tables import ProcessLogEntry, RegistrationRequest
from regstream.realtime.connections import create_client
from regstream.realtime.embedded import EmbeddedRedis
from regstream.realtime.publisher import RegistrationPubSub
from tests.integration.test_crash_and_shutdown import _env, _serve, _sim, _token
from tests.integration.test_work_queue import _fleet, _migrated, _setup, _sim_latency, _state
from tests.support import auth_headers, free_port, run_in_db, serve_app, wait_until

CHANNEL = "service:registration-updates"
PUB_NAME = "regstream-pub-test"
REGISTRATIONS = range(1, 21)


def _update(rid: int, seq: int) -> dict[str, Any]:
    return {"registrationId": rid, "status": "PENDING", "timestamp": 1, "message": "m", "seq": seq}


@contextlib.asynccontextmanager
async def _listening(url: str) -> AsyncIterator[list[tuple[int, int]]]:
    """A raw subscriber: every (registrationId, seq) the channel carries, in arrival order."""
    redis = Redis.from_url(url)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(CHANNEL)
    seen: list[tuple[int, int]] = []

    async def read() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                update = orjson.loads(message["data"])
                if "seq" in update:
                    seen.append((update["registrationId"], update["seq"]))

    task = asyncio.create_task(read())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pubsub.aclose()
        await redis.aclose()


async def _history(redis: Redis) -> list[tuple[int, int]]:
    rows = await redis.xrange(CHANNEL + ":history", "-", "+")
    out = []
    for _, fields in rows or []:
        assert fields is not None
        update = orjson.loads(fields[b"m"])
        if "seq" in update:
            out.append((update["registrationId"], update["seq"]))
    return out


async def _all_arrived(
    admin: Redis, seen: list[tuple[int, int]], expected: dict[int, list[int]]
) -> list[tuple[int, int]]:
    """Wait until the channel brought at least every expected update, then read the history and
    wait for the channel to have brought as many (anything late, a second copy, would be in the
    history already: it is read after it). Returns the history."""
    total = sum(len(s) for s in expected.values())
    await wait_until(lambda: len(seen) >= total, timeout=10, what="every update")
    history = await _history(admin)
    await wait_until(lambda: len(seen) >= len(history), timeout=5, what="the channel")
    return history


def _assert_once_in_order(seen: list[tuple[int, int]], expected: dict[int, list[int]]) -> None:
    duplicated = {key for key in seen if seen.count(key) > 1}
    assert not duplicated, f"published more than once: {sorted(duplicated)[:10]}"
    for rid, seqs in expected.items():
        assert [s for r, s in seen if r == rid] == seqs, rid


async def _publish_rounds(publisher: RegistrationPubSub, seqs: range) -> None:
    for seq in seqs:
        for rid in REGISTRATIONS:
            publisher.enqueue_update(_update(rid, seq))
        await asyncio.sleep(0)


async def test_redis_paused_past_the_socket_timeout_publishes_each_update_once(
    redis_server: EmbeddedRedis,
) -> None:
    """Redis stopped (SIGSTOP by PID) for 6 s while a batch is in flight: the client times out
    after 5 s and sends the script again on a new connection; when Redis goes on it runs the
    first call (its bytes were received before the client gave up) and the second one, which
    the script skips. (CLIENT PAUSE does not show it: a paused client that hangs up is dropped
    with its command.)"""
    commands = create_client(redis_server.url, name=PUB_NAME)  # the service's: 5 s, retried
    admin = Redis.from_url(redis_server.url)
    publisher = RegistrationPubSub(commands)
    try:
        async with _listening(redis_server.url) as seen:
            await _publish_rounds(publisher, range(1, 4))
            assert await publisher.wait_flushed(10)
            assert redis_server.process is not None
            redis_server.process.send_signal(signal.SIGSTOP)
            try:
                await _publish_rounds(publisher, range(4, 8))  # sent; Redis does not answer
                await asyncio.sleep(6)  # the stall itself (what is measured is what follows)
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
            assert await publisher.wait_flushed(30)
            await _publish_rounds(publisher, range(8, 11))
            assert await publisher.wait_flushed(10)
            expected = {rid: list(range(1, 11)) for rid in REGISTRATIONS}
            history = await _all_arrived(admin, seen, expected)
        _assert_once_in_order(history, expected)
        _assert_once_in_order(seen, expected)
    finally:
        await publisher.aclose()
        await commands.aclose()
        await admin.aclose()


async def test_connection_killed_after_the_script_was_sent_publishes_each_update_once(
    redis_server: EmbeddedRedis,
) -> None:
    """The publisher's connection (found by its name, ``regstream-pub-*``) killed while a batch
    is in flight, after Redis received the script: Redis runs it, the reply is lost with the
    connection, redis-py sends the script again on a new one; the second call is skipped."""
    commands = create_client(redis_server.url, name=PUB_NAME)
    admin = Redis.from_url(redis_server.url)
    killer = Redis.from_url(redis_server.url)
    publisher = RegistrationPubSub(commands)
    try:
        async with _listening(redis_server.url) as seen:
            await _publish_rounds(publisher, range(1, 3))
            assert await publisher.wait_flushed(10)
            ids = [c["id"] for c in await admin.client_list() if c.get("name") == PUB_NAME]
            assert len(ids) == 1, ids
            await killer.ping()  # connected before Redis stops
            # Redis stopped, the script arrives, then the kill: when Redis goes on it reads both
            # in the same turn, in arrival order, and runs the script; its reply is still
            # buffered when the kill frees the client, so it is lost although the script ran.
            assert redis_server.process is not None
            redis_server.process.send_signal(signal.SIGSTOP)
            try:
                publisher.enqueue_update(_update(1, 3))
                await wait_until(lambda: publisher.pending == 0, what="the batch in flight")
                await asyncio.sleep(0.2)  # its bytes written by the event loop

                async def kill_it() -> Any:
                    return await killer.client_kill_filter(_id=ids[0])

                kill = asyncio.create_task(kill_it())
                await asyncio.sleep(0.2)  # the kill's bytes written after the script's
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
            assert await kill == 1
            assert await publisher.wait_flushed(20)
            await _publish_rounds(publisher, range(4, 6))
            assert await publisher.wait_flushed(10)
            expected = {rid: [1, 2, 4, 5] for rid in REGISTRATIONS}
            expected[1] = [1, 2, 3, 4, 5]
            history = await _all_arrived(admin, seen, expected)
        _assert_once_in_order(history, expected)
        _assert_once_in_order(seen, expected)
    finally:
        await publisher.aclose()
        for client in (commands, admin, killer):
            await client.aclose()


async def test_service_killed_while_redis_is_down_publishes_what_was_committed_once(
    tmp_path: Path, redis_server: EmbeddedRedis, t24_private: RunningSimulator, postgres_url: str
) -> None:
    """Redis stopped (by PID) during a bulk, the service SIGKILLed with updates only in its
    in-memory outbox, then both restarted: the history and the channel carry every update of
    the process log once, in seq order (the start-up catch-up, pipeline/catch_up.py)."""
    await _sim(t24_private, "config", {"latency_ms": 300})
    env = _env(tmp_path, redis_server, t24_private, DATABASE_URL=postgres_url)
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with _serve(env, port, log, "--demo") as first:
        headers = {"Authorization": f"Bearer {_token(log)}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=20) as http:
            items = (await http.get("/api/registrations", params={"pageSize": 50})).json()["items"]
            rids = [item["id"] for item in items]
            for rid in rids:
                assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202

            async def some_published() -> bool:
                async with Redis.from_url(redis_server.url) as redis:
                    return bool(await redis.xlen(CHANNEL + ":history"))

            await wait_until(some_published, timeout=10, what="the first updates published")
            redis_server.kill()  # by PID: its history is gone with it (no persistence)

            async def all_done() -> bool:
                rows = [(await http.get(f"/api/registrations/{rid}")).json() for rid in rids]
                return all(not r["inProgress"] and r["status"] != "PENDING" for r in rows)

            await wait_until(all_done, timeout=60, interval=0.2, what="every run to end")
        first.send_signal(signal.SIGKILL)
        first.wait(10)

    engine = create_engine(postgres_url)
    try:
        async with create_session_factory(engine)() as session:
            entries = list(await session.scalars(
                select(ProcessLogEntry).order_by(ProcessLogEntry.registration_id,
                                                 ProcessLogEntry.seq)
            ))  # fmt: skip
    finally:
        await engine.dispose()
    expected: dict[int, list[int]] = {}
    for entry in entries:
        expected.setdefault(entry.registration_id, []).append(entry.seq)
    total = len(entries)
    assert total >= 5 * len(rids)

    redis_server.start()
    async with _listening(redis_server.url) as seen:
        with _serve(env, port, log):
            await wait_until(lambda: len(seen) >= total, timeout=30, what="every committed update")
            async with Redis.from_url(redis_server.url) as redis:
                history = await _history(redis)
            await wait_until(lambda: len(seen) >= len(history), timeout=5, what="the channel")
    assert f"catch-up: {total} committed updates" in log.read_text()
    _assert_once_in_order(history, expected)
    _assert_once_in_order(seen, expected)


async def test_outbox_overflow_while_redis_is_down_is_caught_up_from_the_database(
    make_settings: Any, redis_server: EmbeddedRedis
) -> None:
    """Redis down during a bulk with an outbox of 16: the updates it drops (and the later ones
    of those registrations) are republished from the process log when Redis is back, in order,
    once; the rest come from the outbox (fails without the publisher's ``recover``: the dropped
    updates are only announced for a re-sync)."""

    with serve_app(make_settings(outbox_max=16, pipeline_concurrency=1)) as live:
        ids = await live.load_demo()
        rids = sorted(ids.values())
        redis_server.kill()
        broker = live.services.bus.brokers[0]
        await wait_until(lambda: not broker.connected.is_set(), what="subscription lost")
        async with httpx.AsyncClient(
            base_url=live.url, headers=auth_headers(live, "admin")
        ) as http:
            for rid in rids:
                assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202

            async def all_done() -> bool:
                rows = [(await http.get(f"/api/registrations/{rid}")).json() for rid in rids]
                return all(not r["inProgress"] and r["status"] != "PENDING" for r in rows)

            await wait_until(all_done, timeout=60, interval=0.2, what="every run to end")

        async def log(session: Any) -> list[tuple[int, int]]:
            rows = await session.execute(
                select(ProcessLogEntry.registration_id, ProcessLogEntry.seq).order_by(
                    ProcessLogEntry.registration_id, ProcessLogEntry.seq
                )
            )
            return [(int(r), int(s)) for r, s in rows.all()]

        entries = run_in_db(live, log)
        assert len(entries) > 2 * 16, "the outbox did not overflow; the test proves nothing"
        expected: dict[int, list[int]] = {}
        for rid, seq in entries:
            expected.setdefault(rid, []).append(seq)
        redis_server.start()
        # subscribed as soon as Redis is up, maybe after the flusher's first batch: the channel
        # is checked for duplicates and order, the history for completeness too
        async with (
            _listening(redis_server.url) as seen,
            Redis.from_url(redis_server.url) as redis,
        ):
            history: list[tuple[int, int]] = []

            async def all_published() -> bool:
                history[:] = await _history(redis)
                return len(history) >= len(entries)

            await wait_until(all_published, timeout=30, what="every committed update")
            await wait_until(lambda: len(seen) >= 1, timeout=5, what="the channel")
            await asyncio.sleep(0.5)  # a late copy, if any, would be on the channel by now
            history[:] = await _history(redis)
    _assert_once_in_order(history, expected)
    _assert_once_in_order(seen, {r: [s for s in q if (r, s) in seen] for r, q in expected.items()})


async def test_an_instance_dying_while_redis_is_down_loses_nothing_to_the_fleet(
    tmp_path: Path, postgres_url: str, redis_server: EmbeddedRedis, t24_private: RunningSimulator
) -> None:
    """Two instances; Redis stopped (SIGSTOP by PID: an outage that keeps its data, so one
    epoch) during a bulk, one instance SIGKILLed meanwhile with committed updates only in its
    outbox, and never restarted; the survivor takes its runs over; Redis back: the channel and
    the history carry every process_log entry once, in seq order. The dead instance's
    taken-over runs: the survivor queues their committed entries again ahead of its own
    (runner, on resume); its finished runs: the survivor's catch-up when publishing works again
    (fails without either: entries missing)."""
    await _sim_latency(t24_private, 300)
    async with _migrated(postgres_url) as sessions:
        ids, headers = await _setup(sessions, 60)
        with _fleet(
            tmp_path, postgres_url, redis_server, t24_private, n=2,
            REGSTREAM_HEARTBEAT_INTERVAL="0.5", REGSTREAM_HEARTBEAT_TIMEOUT="2",
            REGSTREAM_PIPELINE_CONCURRENCY="4",  # the bulk lasts seconds: the kill lands mid-way
        ) as fleet:  # fmt: skip
            assert redis_server.process is not None
            redis_pid = redis_server.process
            async with (
                _listening(redis_server.url) as seen,
                Redis.from_url(redis_server.url) as redis,
            ):
                async with httpx.AsyncClient(
                    base_url=fleet[0][0], headers=headers, timeout=30
                ) as http:
                    response = await http.post(
                        "/api/registrations/process", json={"registrationIds": ids}
                    )
                    assert response.status_code == 200, response.text
                victim = fleet[1][1]
                victim_id = ""

                async def victim_busy() -> bool:
                    nonlocal victim_id
                    state = await _state(sessions)
                    victim_id = {i.pid: i.id for i in state["instances"]}.get(victim.pid, "")
                    held = [r for r in state["rows"].values()
                            if r.in_progress and r.instance_id == victim_id]  # fmt: skip
                    return bool(victim_id) and len(held) >= 3

                await wait_until(victim_busy, timeout=30, interval=0.05, what="the victim's runs")
                redis_pid.send_signal(signal.SIGSTOP)
                try:
                    outage_ms = time.time_ns() // 1_000_000

                    async def victim_finished_and_holds_runs() -> bool:
                        # the victim ended a run while Redis was down (its final is in no
                        # outbox but the dead one's) and holds runs in flight (to be taken over)
                        state = await _state(sessions)
                        async with sessions() as session:
                            ended = await session.scalar(
                                select(func.count(ProcessLogEntry.id))
                                .join(RegistrationRequest,
                                      RegistrationRequest.id == ProcessLogEntry.registration_id)
                                .where(ProcessLogEntry.stage.is_(None),
                                       ProcessLogEntry.timestamp_ms >= outage_ms,
                                       RegistrationRequest.instance_id == victim_id)
                            )  # fmt: skip
                        held = [r for r in state["rows"].values()
                                if r.in_progress and r.instance_id == victim_id]  # fmt: skip
                        return bool(ended) and len(held) >= 2

                    await wait_until(
                        victim_finished_and_holds_runs, timeout=20, interval=0.05,
                        what="the victim to end runs while Redis is down, holding others",
                    )  # fmt: skip
                    victim.send_signal(signal.SIGKILL)
                    victim.wait(10)

                    async def all_done() -> bool:
                        rows = (await _state(sessions))["rows"]
                        return not any(rows[rid].in_progress for rid in ids)

                    await wait_until(all_done, timeout=60, interval=0.25, what="the bulk to end")
                finally:
                    redis_pid.send_signal(signal.SIGCONT)
                async with sessions() as session:
                    query = select(ProcessLogEntry.registration_id, ProcessLogEntry.seq)
                    rows = await session.execute(query)
                    entries = sorted((int(r), int(s)) for r, s in rows.all())
                expected: dict[int, list[int]] = {}
                for rid, seq in entries:
                    expected.setdefault(rid, []).append(seq)
                history: list[tuple[int, int]] = []

                async def all_published() -> bool:
                    history[:] = await _history(redis)
                    return len(set(history)) >= len(entries) and len(set(seen)) >= len(entries)

                try:
                    await wait_until(all_published, timeout=60, what="every committed update")
                except AssertionError:
                    missing = sorted(set(entries) - set(history))
                    unseen = sorted(set(entries) - set(seen))
                    raise AssertionError(
                        f"not in the history: {missing[:30]}; not on the channel: {unseen[:30]}"
                        f" (history {len(history)}, epoch {await redis.get(CHANNEL + ':epoch')!r})"
                    ) from None
                await asyncio.sleep(0.5)  # a late copy, if any, would be there by now
                history[:] = await _history(redis)
    _assert_once_in_order(history, expected)
    _assert_once_in_order(seen, expected)
