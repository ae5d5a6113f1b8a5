"""Fleet-wide limits on a Redis Cluster (issue 18): the moving windows (``limits``' cluster
storage, ``auth/limits.py``) and the per-user stream slots (one Lua script on one key, and
pipelines across nodes: ``auth/stream_slots.py``) of two instances (two ``LimitStore``\\ s, each
with a cluster client of its own, as ``create_client`` makes them in cluster mode).

Keys are chosen so that every test touches all three masters. With per-process counting (or a
store that did not reach the cluster) every limit would be twice the setting and no refusal
would come; with a store blind to cluster errors a killed master would fail the decisions
instead of counting them per process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import REGISTRY
from redis.asyncio.cluster import RedisCluster

from regstream.auth.limits import KEY_PREFIX, LimitStore, RateLimit
from regstream.auth.stream_slots import KEY_PREFIX as SLOTS_PREFIX
from regstream.auth.stream_slots import StreamSlots
from regstream.realtime.connections import RedisTarget, create_client
from tests.cluster_support import PrivateCluster
from tests.conftest import SettingsFactory
from tests.support import TEST_SECRET_KEY, serve_app, wait_until


@asynccontextmanager
async def _instances(
    cluster: PrivateCluster, name: str, *, count: int = 2, retry_interval: float = 2.0,
) -> AsyncIterator[list[LimitStore]]:  # fmt: skip
    """``count`` stores, each with a cluster client of its own (as the app's limits client).

    Their ``timeout`` is 5 s (a client's first command learns the slot map and loads a script:
    slow on a loaded machine); a test that kills a node shortens it once its clients are warm.
    """
    target = replace(RedisTarget.from_url(cluster.url), cluster=True)
    stores: list[LimitStore] = []
    try:
        for i in range(count):
            client = create_client(target, name=f"{name}-{i}", retries=0, socket_timeout=2.0,
                                   max_connections=16)  # fmt: skip
            assert isinstance(client, RedisCluster)
            stores.append(LimitStore(client, secret=TEST_SECRET_KEY.encode(), timeout=5.0,
                                     retry_interval=retry_interval))  # fmt: skip
        yield stores
    finally:
        for store in stores:
            await store.aclose()
            if store.redis is not None:
                await store.redis.aclose()


def _window_key(limit: RateLimit, identifier: str) -> str:
    """The moving window's key in Redis (``limits``: the prefix, then the item's key)."""
    return f"{KEY_PREFIX}:{limit.item.key_for(limit.name, identifier)}"


def _user(name: str) -> int:
    """An operator id from a ``name_per_master`` name (``<prefix>-<n>``)."""
    return 1000 + int(name.rsplit("-", 1)[1])


def _slots_key(name: str) -> str:
    return f"{SLOTS_PREFIX}{_user(name)}"


def _sample(name: str) -> float:
    value = REGISTRY.get_sample_value(name)  # prometheus_client's public reader
    assert value is not None, name
    return value


def _window_length(cluster: PrivateCluster, limit: RateLimit, identifier: str) -> int:
    key = _window_key(limit, identifier)
    with cluster.client(cluster.master_of(key).port) as node:
        return int(node.llen(key))


async def test_the_moving_window_is_shared_by_two_instances_on_a_cluster(
    redis_cluster: PrivateCluster,
) -> None:
    async with _instances(redis_cluster, "h5-window") as (a, b):
        limit_a, limit_b = RateLimit(a, "login", 3), RateLimit(b, "login", 3)
        names = redis_cluster.name_per_master("h5-window", lambda n: _window_key(limit_a, n))
        for identifier in names.values():
            assert [await limit_a.hit(identifier), await limit_b.hit(identifier),
                    await limit_a.hit(identifier)] == [0.0, 0.0, 0.0]  # fmt: skip
            refused = await limit_b.hit(identifier)  # the 4th in the minute, on the other one
            assert 0 < refused <= 60
            assert _window_length(redis_cluster, limit_a, identifier) == 3
        assert (a.down, b.down) == (False, False)


async def test_two_instances_of_the_app_share_the_sign_in_throttle_on_a_cluster(
    make_settings: SettingsFactory, redis_cluster: PrivateCluster, tmp_path: Path
) -> None:
    """REDIS_URL names one node and REDIS_CLUSTER is unset: the app finds out (INFO cluster)."""
    wrong = {"username": "h5-kim", "password": "not-the-password-1"}

    def settings(name: str) -> Any:
        return make_settings(redis_url=redis_cluster.url, data_dir=tmp_path / name,
                             login_attempts_per_minute=3)  # fmt: skip

    with serve_app(settings("a")) as a, serve_app(settings("b")) as b:
        assert isinstance(a.app.state.auth.redis, RedisCluster)
        codes = []
        for i in range(4):
            async with httpx.AsyncClient(base_url=[a.url, b.url][i % 2], timeout=10) as client:
                codes.append((await client.post("/api/auth/login", json=wrong)).status_code)
        assert codes == [401, 401, 401, 429]


async def test_a_burst_past_the_pool_waits_its_turn_instead_of_counting_per_process(
    redis_cluster: PrivateCluster,
) -> None:
    """redis-py's cluster pools refuse a 17th connection to a node at once (no blocking pool):
    a burst of 200 concurrent decisions on one key must neither fail over to per-process
    counting nor let more than the setting through."""
    async with _instances(redis_cluster, "h5-burst", count=1) as (store,):
        limit = RateLimit(store, "burst", 50)
        fallbacks = _sample("regstream_limit_fallbacks_total")
        waits = await asyncio.gather(*(limit.hit("h5-burst-key") for _ in range(200)))
        assert (sum(1 for w in waits if w == 0.0), store.down) == (50, False)
        assert _sample("regstream_limit_fallbacks_total") == fallbacks
        assert _window_length(redis_cluster, limit, "h5-burst-key") == 50


async def test_stream_slots_cap_holds_across_two_instances_on_a_cluster(
    redis_cluster: PrivateCluster,
) -> None:
    async with _instances(redis_cluster, "h5-slots") as (a, b):
        slots_a, slots_b = StreamSlots(a, cap=2, ttl=30.0), StreamSlots(b, cap=2, ttl=30.0)
        users = [_user(n) for n in redis_cluster.name_per_master("h5-user", _slots_key).values()]
        for user in users:
            assert await slots_a.acquire(user, "a:1") is True
            assert await slots_b.acquire(user, "b:1") is True
            assert await slots_a.acquire(user, "a:2") is False  # the cap, counted fleet-wide
            assert await slots_b.acquire(user, "b:2") is False

        # one pipeline over the three masters' keys frees one slot of each user
        assert await slots_b.release((user, "b:1") for user in users) is True
        for user in users:
            assert await slots_a.acquire(user, "a:3") is True
            assert await slots_b.acquire(user, "b:3") is False

        before = int(time.time() * 1000)
        assert await slots_a.renew({user: ["a:1", "a:3"] for user in users}) is True
        for user in users:
            key = f"{SLOTS_PREFIX}{user}"
            with redis_cluster.client(redis_cluster.master_of(key).port) as node:
                members = dict(node.zrange(key, 0, -1, withscores=True))
                assert sorted(members) == [b"a:1", b"a:3"]
                assert all(score >= before + 29_000 for score in members.values())
                assert node.pttl(key) > 29_000


async def test_aclose_closes_the_cluster_client_limits_built(
    redis_cluster: PrivateCluster,
) -> None:
    name = "h5-aclose-limits"

    def connections() -> int:
        count = 0
        for master in redis_cluster.masters():
            with redis_cluster.client(master.port) as node:
                count += sum(1 for c in node.client_list() if c.get("name") == name)
        return count

    target = replace(RedisTarget.from_url(redis_cluster.url), cluster=True)
    client = create_client(target, name=name, retries=0)
    store = LimitStore(client, secret=b"k")
    limit = RateLimit(store, "aclose", 5)
    for identifier in redis_cluster.name_per_master("h5-ac", lambda n: _window_key(limit, n)):
        assert await limit.hit(str(identifier)) == 0.0
    await client.aclose()  # ours: ``limits`` keeps a client of its own
    assert connections() >= 1
    await store.aclose()
    await wait_until(lambda: connections() == 0, timeout=5, what="limits' connections closed")


async def test_a_master_killed_mid_test_limits_count_per_process_then_fleet_wide_again(
    fresh_redis_cluster: PrivateCluster,
) -> None:
    """The worst master to lose: the one ``REDIS_URL`` names (every client's startup node). Its
    replica is paused until the per-process decisions are checked, so none of them can be taken
    after a promotion, however slow the machine."""
    cluster = fresh_redis_cluster
    async with _instances(cluster, "h5-failover", count=3, retry_interval=0.3) as (a, b, cold):
        limit_a, limit_b = RateLimit(a, "process", 2), RateLimit(b, "process", 2)
        limit_cold = RateLimit(cold, "process", 2)
        slots_a = StreamSlots(a, cap=1, ttl=30.0)
        victim_port = int(cluster.url.rsplit(":", 1)[1])
        before = cluster.name_per_master("h5-kill", lambda n: _window_key(limit_a, n))[victim_port]
        before_key = _window_key(limit_a, before)
        user = _user(cluster.name_per_master("h5-user", _slots_key)[victim_port])
        # a and b are running instances: both have counted in Redis (and mirrored in memory)
        assert [await limit_a.hit(before), await limit_b.hit(before)] == [0.0, 0.0]
        assert await slots_a.acquire(user, "a:1") is True
        with cluster.client(victim_port) as node:  # both replicated before the kill
            assert node.execute_command("WAIT", 1, 5000) == 1
        fallbacks = _sample("regstream_limit_fallbacks_total")
        for store in (a, b, cold):  # warm: an outage answers within 0.5 s
            store.timeout = 0.5
        replicas = [node.port for node in cluster.replicas_of(cluster.master_of(before_key))]
        cluster.pause(*replicas)

        killed = cluster.kill_master_of(before_key)
        assert killed.port == victim_port
        # per process, at the same setting, each from its own count: one more each
        assert [await limit_a.hit(before), await limit_b.hit(before)] == [0.0, 0.0]
        assert await limit_a.hit(before) > 0 and await limit_b.hit(before) > 0
        # an instance that never reached the cluster, its startup node dead, does not fail
        # either (redis-py: RedisClusterUnreachableError, not a RedisError): it counts alone
        assert [await limit_cold.hit(before), await limit_cold.hit(before)] == [0.0, 0.0]
        assert await limit_cold.hit(before) > 0
        assert (a.down, b.down, cold.down) == (True, True, True)
        assert _sample("regstream_limits_shared") == 0
        assert _sample("regstream_limit_fallbacks_total") >= fallbacks + 7
        assert await slots_a.acquire(user, "a:2") is None  # the guard counts per process

        cluster.resume(*replicas)
        promoted = await cluster.wait_promoted(killed)
        probe_a, probe_b = RateLimit(a, "probe", 10_000), RateLimit(b, "probe", 10_000)

        async def shared_again() -> bool:
            await probe_a.hit(before)
            await probe_b.hit(before)
            return not a.down and not b.down

        await wait_until(shared_again, timeout=20, interval=0.3, what="limits shared again")
        after = cluster.name_per_master("h5-after", lambda n: _window_key(limit_a, n))[
            promoted.port
        ]  # an identifier of the promoted node's slots, never counted before
        assert [await limit_a.hit(after), await limit_b.hit(after)] == [0.0, 0.0]
        assert await limit_a.hit(after) > 0  # the setting, fleet-wide again
        with cluster.client(promoted.port) as node:
            assert node.llen(_window_key(limit_a, after)) == 2  # served by the promoted replica
        assert _sample("regstream_limits_shared") == 1
        # the slot taken before the kill was replicated: the cap of one holds fleet-wide
        assert await slots_a.acquire(user, "a:3") is False
