"""``Broker``'s handling of one raw reply of its subscribed connection (``_on_reply``), without a
server: what each kind of reply does. The read itself is tested against a real Redis in
``tests/integration/test_broker.py``."""

from __future__ import annotations

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from regstream.realtime.broker import Broker
from regstream.realtime.messages import EventKey, Parsed

CHANNEL = b"service:registration-updates"


def _broker(received: list[Parsed], resyncs: list[tuple[int, ...]]) -> Broker:
    unused = Redis.from_url("redis://127.0.0.1:9/0")  # never connected: no command is sent
    return Broker(
        subscriber=lambda: unused, commands=unused, on_update=received.append,
        on_resync=resyncs.append,
    )  # fmt: skip


def _update(n: int) -> bytes:
    return orjson.dumps({"registrationId": 7, "seq": n, "eventId": f"1_100-{n}"})


@pytest.mark.parametrize("kind", [b"message", b"smessage"])
def test_messages_are_dispatched_once_in_id_order(kind: bytes) -> None:
    received: list[Parsed] = []
    broker = _broker(received, [])
    for n in (1, 2, 2, 1, 3):  # 2 and 1 again: duplicates of what was dispatched
        broker._on_reply([kind, CHANNEL, _update(n)])
    assert [p.seq for p in received] == [1, 2, 3]
    assert broker.last_key == EventKey("1", 100, 3)


def test_a_probe_is_seen_and_not_dispatched() -> None:
    received: list[Parsed] = []
    broker = _broker(received, [])
    broker._last_probe_seen = 0.0
    broker._on_reply([b"message", broker.probe_channel, b"probe"])
    assert broker._last_probe_seen > 0.0 and received == []


@pytest.mark.parametrize(
    "reply", [[b"subscribe", CHANNEL, 1], [b"pong", b""], b"PONG", [b"message", CHANNEL, b"[1]"],
              [b"message", CHANNEL, b"not json"], None],
)  # fmt: skip
def test_confirmations_pongs_and_non_objects_are_ignored(reply: object) -> None:
    received: list[Parsed] = []
    broker = _broker(received, [])
    broker._on_reply(reply)
    assert received == [] and broker.received == 0


def test_a_resync_message_reaches_on_resync() -> None:
    resyncs: list[tuple[int, ...]] = []
    broker = _broker([], resyncs)
    broker._on_reply([b"message", CHANNEL, b'{"type":"resync","registrationIds":[4,5]}'])
    assert resyncs == [(4, 5)]


@pytest.mark.parametrize("kind", [b"unsubscribe", b"sunsubscribe"])
def test_a_subscription_the_server_ended_rebuilds_the_subscriber(kind: bytes) -> None:
    """A shard channel whose slot moved: ``Broker.run`` takes this error as a lost connection."""
    broker = _broker([], [])
    with pytest.raises(RedisConnectionError, match="ended the subscription"):
        broker._on_reply([kind, CHANNEL, 0])
