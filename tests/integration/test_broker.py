"""``Broker``'s read path (redis-py's public connection read) against a real Redis (a private
server per test).

A burst of several hundred messages arrives in a few socket reads, replies split across them: all
must be dispatched in order, exactly once, on RESP2 (replies) and RESP3 (pushes), on the same
connection throughout. A subscriber connection killed while it waits must
reconnect through ``Broker.run``'s error path, and what was published meanwhile must arrive
through the history catch-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import orjson
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from regstream.realtime import broker as broker_module
from regstream.realtime.broker import Broker
from regstream.realtime.connections import RedisClient, create_client, create_subscriber_client
from regstream.realtime.embedded import EmbeddedRedis, free_port
from regstream.realtime.messages import Parsed
from regstream.realtime.publisher import RegistrationPubSub
from tests.support import wait_until

CHANNEL = "test:broker-updates"
SUB_NAME = "test-broker-sub"
PAD = "x" * 220  # ~300-byte messages, like the service's updates


def _message(seq: int, *, event: int | None = None) -> bytes:
    body: dict[str, object] = {"registrationId": 7, "status": "PENDING", "seq": seq, "pad": PAD}
    if event is not None:
        body["eventId"] = f"1700000000000000_1700000000000-{event}"
    return orjson.dumps(body)


def _reconnects() -> float:
    value = REGISTRY.get_sample_value(
        "regstream_redis_reconnects_total", {"connection": "subscriber"}
    )
    return value or 0.0


@contextlib.asynccontextmanager
async def _running(broker: Broker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(broker.run())
    try:
        await asyncio.wait_for(broker.connected.wait(), 5)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _subscriber(url: str, protocol: int) -> Redis:
    """The service's subscriber client (RESP2: messages are replies), or one on RESP3 (redis-py
    8's default: messages are pushes)."""
    if protocol == 2:
        return create_subscriber_client(url, name=SUB_NAME)
    return Redis.from_url(url, protocol=protocol, client_name=SUB_NAME, socket_timeout=None)


@pytest.mark.parametrize("protocol", [2, 3])
async def test_burst_is_dispatched_in_order_exactly_once(
    redis_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture, protocol: int
) -> None:
    url = redis_server.url
    commands = create_client(url, name="test-broker-cmd")
    admin = create_client(url, name="test-broker-admin")
    received: list[Parsed] = []
    resyncs: list[tuple[int, ...]] = []
    broker = Broker(
        subscriber=lambda: _subscriber(url, protocol), commands=commands,
        on_update=received.append, on_resync=resyncs.append, channel=CHANNEL, probe_interval=1.0,
    )  # fmt: skip
    reconnects = _reconnects()
    n = 2000  # ~600 kB: more than one read (256 kB), so replies split across reads
    try:
        async with _running(broker):
            subscriber = await _subscriber_id(admin)
            pipe = commands.pipeline(transaction=False)
            for i in range(1, n + 1):
                pipe.publish(CHANNEL, _message(i, event=i))
                if i == 100:
                    pipe.publish(CHANNEL, _message(50, event=50))  # a duplicate: skipped
                    pipe.publish(CHANNEL, b"not json")  # ignored
                    pipe.publish(CHANNEL, orjson.dumps({"type": "resync", "registrationIds": [7]}))
                if i == 300:
                    pipe.publish(CHANNEL, _message(0))  # no eventId: dispatched, never de-duped
            await pipe.execute()
            await wait_until(lambda: len(received) >= n + 1, what="the burst")
            await asyncio.sleep(2.5)  # two probe intervals more: probes keep it healthy
            assert broker.healthy
            # the same connection all along: no read deadline or reconnect of redis-py's own
            assert await _subscriber_id(admin) == subscriber
        seqs = [p.seq for p in received]
        assert seqs == [*range(1, 301), 0, *range(301, n + 1)]
        assert broker.received == n + 1
        assert resyncs == [(7,)]
        assert _reconnects() == reconnects  # the probes came back: never rebuilt
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert not [m for m in warnings if "subscri" in m or "probe" in m], warnings
    finally:
        await commands.aclose()
        await admin.aclose()


async def _subscriber_id(admin: RedisClient) -> str:
    clients = [c for c in await admin.client_list() if c.get("name") == SUB_NAME]
    assert len(clients) == 1, clients
    return str(clients[0]["id"])


async def test_killed_connection_reconnects_and_catches_up(
    redis_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    url = redis_server.url
    target = [url]  # where the subscriber connects; a closed port holds it disconnected
    commands = create_client(url, name="test-broker-cmd")
    admin = create_client(url, name="test-broker-admin")
    publisher = RegistrationPubSub(commands, channel=CHANNEL)
    received: list[Parsed] = []
    broker = Broker(
        subscriber=lambda: create_subscriber_client(target[0], name=SUB_NAME),
        commands=commands, on_update=received.append, channel=CHANNEL, probe_interval=1.0,
    )  # fmt: skip
    reconnects = _reconnects()
    try:
        async with _running(broker):
            for seq in range(1, 4):  # live
                await publisher.publish_raw(_message(seq))
            await wait_until(lambda: len(received) == 3, what="three live updates")
            # Killed after a burst (some of it may still be unread, some may be read live;
            # which is timing): whatever was not read live must come from the history.
            # Reconnecting fails until the URL is good again.
            for seq in range(4, 304):
                await publisher.publish_raw(_message(seq))
            await asyncio.sleep(0.002)
            target[0] = f"redis://127.0.0.1:{free_port()}/0"
            await admin.client_kill_filter(_id=await _subscriber_id(admin))
            await wait_until(lambda: not broker.connected.is_set(), what="subscription lost")
            for seq in range(304, 404):  # published while the subscriber is away
                await publisher.publish_raw(_message(seq))
            assert await publisher.wait_flushed(10)
            await asyncio.sleep(0.3)  # a failed reconnect or two
            assert not broker.connected.is_set()
            target[0] = url
            await wait_until(lambda: len(received) >= 403, what="catch-up from the history")
            await asyncio.sleep(0.2)
            for seq in range(404, 407):  # live again, on the new connection
                await publisher.publish_raw(_message(seq))
            await wait_until(lambda: len(received) >= 406, what="live updates after reconnect")
        assert [p.seq for p in received] == list(range(1, 407))
        assert broker.received == 406
        assert _reconnects() == reconnects + 1
        # the dead connection surfaced as a Redis/OS error (reconnect), not as a "bug"
        lost = [r.getMessage() for r in caplog.records if r.name == broker_module.__name__]
        assert lost and lost[0].startswith("subscription lost ("), lost
        assert not any("subscription loop failed" in m for m in lost), lost
    finally:
        await publisher.aclose()
        await admin.aclose()
        await commands.aclose()
