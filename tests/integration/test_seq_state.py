"""The publish script's seq-check state is bounded (issue 18, "noticed and left alone").

It keeps the last seq published per registration so a seq is published once (exactly once per
``(registrationId, seq)``, ``test_exactly_once.py``). It was a hash field per registration whose
expiry every batch renewed: while a partition published, nothing of it ever went away. Now a
registration's entry expires the history's age cap after its last publish, however busy the
partition is. And a rolling upgrade: while an instance of the old release still keeps the seqs
in its hash, old and new instances each skip what the other published.

Real Redis (a private server per test); what is checked is what Redis holds and what the
publisher reports (``published_seqs``, the catch-up's question), not how the script stores it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from redis.asyncio import Redis

from regstream.realtime.embedded import EmbeddedRedis
from regstream.realtime.partitions import Layout
from regstream.realtime.publisher import RegistrationPubSub
from tests.support import wait_until

CHANNEL = "service:registration-updates"
#: registrations published once each, then idle
IDLE = list(range(1, 5001))
#: a registration that keeps the partition publishing meanwhile
BUSY = 900_000


def _update(rid: int, seq: int) -> dict[str, Any]:
    return {"registrationId": rid, "status": "PENDING", "timestamp": 1, "message": "m", "seq": seq}


async def _keys_memory(admin: Redis) -> tuple[int, int]:
    """(keys, bytes): every key of the database and the sum of their MEMORY USAGE (SCAN also
    expires what it meets whose TTL passed, so nothing waits for Redis's active expiry)."""
    keys = used = 0
    async for key in admin.scan_iter(count=1000):
        size = await admin.memory_usage(key, samples=0)
        if size is not None:  # (expired between SCAN and MEMORY USAGE)
            keys, used = keys + 1, used + int(size)
    return keys, used


async def _history_seqs(admin: Redis, rid: int) -> list[int]:
    rows = await admin.xrange(CHANNEL + ":history", "-", "+")
    out = []
    for _, fields in rows or []:
        assert fields is not None
        update = orjson.loads(fields[b"m"])
        if update.get("registrationId") == rid:
            out.append(update["seq"])
    return out


async def test_issue18_seq_state_of_idle_registrations_expires_while_the_partition_publishes(
    redis_server: EmbeddedRedis,
) -> None:
    """5,000 registrations published once, then only one registration publishes, every 0.1 s,
    for longer than the age cap (1 s here): the others' seqs are forgotten and Redis holds no
    more than before them (the old hash kept ~65 B per registration: 300 KB here)."""
    publisher = RegistrationPubSub.from_url(redis_server.url, history_max_age=1.0)
    admin = Redis.from_url(redis_server.url)
    busy_seq = 0

    async def publish_busy() -> None:
        nonlocal busy_seq
        busy_seq += 1
        publisher.enqueue_update(_update(BUSY, busy_seq))
        assert await publisher.wait_flushed(10)

    try:
        for _ in range(3):
            await publish_busy()
        base_keys, base_bytes = await _keys_memory(admin)

        for rid in IDLE:
            publisher.enqueue_update(_update(rid, 1))
        await publish_busy()
        assert await publisher.published_seqs(IDLE) == dict.fromkeys(IDLE, 1)
        _, grown = await _keys_memory(admin)
        assert grown - base_bytes > 50 * len(IDLE)  # (the state is measurable)

        async def forgotten() -> bool:
            await publish_busy()
            await asyncio.sleep(0.1)
            return not await publisher.published_seqs(IDLE[::50])

        await wait_until(forgotten, timeout=8, interval=0, what="the idle registrations' seqs")
        assert await publisher.published_seqs([*IDLE, BUSY]) == {BUSY: busy_seq}

        async def back_to_base() -> bool:
            await publish_busy()
            keys, used = await _keys_memory(admin)
            # (the history may keep up to a stream node of the burst: trimmed by whole nodes)
            return keys <= base_keys + 1 and used - base_bytes < 16 * len(IDLE)

        await wait_until(back_to_base, timeout=5, interval=0.1, what="Redis's memory as before")
    finally:
        await publisher.aclose()
        await admin.aclose()


async def test_rolling_upgrade_old_and_new_instances_skip_each_others_seqs(
    redis_server: EmbeddedRedis,
) -> None:
    """An instance of the release before the seq keys keeps each registration's last seq as
    field ``s<id>`` of ``<channel>:history:index:<epoch>`` (simulated here: HSET, as its script
    does). While that hash exists the new script reads it (a seq the old instance published is
    skipped) and writes into it (the old instance's check sees the new one's seqs) without
    renewing its expiry; with no old instance it creates nothing there."""
    (partition,) = Layout.single().partitions
    publisher = RegistrationPubSub.from_url(redis_server.url)  # age cap: 1 h
    admin = Redis.from_url(redis_server.url)
    try:
        publisher.enqueue_update(_update(7, 1))
        assert await publisher.wait_flushed(10)
        raw = await admin.get(partition.epoch_key)
        assert isinstance(raw, bytes)
        epoch = raw.decode()
        legacy = partition.legacy_state_prefix + epoch
        assert await admin.exists(legacy) == 0  # (no old instance: not created)

        # an old instance published seqs 1-5 of registration 42 in this epoch
        await admin.hset(legacy, mapping={"s42": 5, "last": "0-0"})
        await admin.pexpire(legacy, 60_000)
        assert await publisher.published_seqs([42, 7]) == {42: 5, 7: 1}
        for seq in (4, 5, 6):
            publisher.enqueue_update(_update(42, seq))
        assert await publisher.wait_flushed(10)
        assert await _history_seqs(admin, 42) == [6]
        assert await admin.hget(legacy, "s42") == b"6"  # what the old instance's check reads
        assert 0 < await admin.pttl(legacy) <= 60_000  # its expiry is the old instances' only

        # the old instance published 7 after that: the new one's key says 6, the hash 7
        await admin.hset(legacy, "s42", 7)
        assert await publisher.published_seqs([42]) == {42: 7}
        for seq in (7, 8):
            publisher.enqueue_update(_update(42, seq))
        assert await publisher.wait_flushed(10)
        assert await _history_seqs(admin, 42) == [6, 8]

        # the old instances are gone and their hash expired: the keys alone
        await admin.delete(legacy)
        for seq in (8, 9):
            publisher.enqueue_update(_update(42, seq))
        assert await publisher.wait_flushed(10)
        assert await _history_seqs(admin, 42) == [6, 8, 9]
        assert await admin.exists(legacy) == 0
        assert await publisher.published_seqs([42, 7, 8]) == {42: 9, 7: 1}
    finally:
        await publisher.aclose()
        await admin.aclose()
