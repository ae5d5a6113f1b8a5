"""Several startup nodes for a Redis Cluster (``REDIS_CLUSTER_NODES``): the node ``REDIS_URL``
names is dead (SIGKILLed, its replica promoted) before anything starts.

With that node alone a cluster client never learns the slot map and detection cannot ask
whether Redis is a cluster: the control test shows both (so the test's kill matters). With the
other nodes as redis-py's ``startup_nodes``, detection asks the next node, and every client the
service makes (commands, a partition's node subscriber, the limits' own cluster client) works,
and an app started meanwhile publishes, streams and counts limits on the cluster.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio.cluster import RedisCluster

from regstream.auth.limits import LimitStore, RateLimit
from regstream.config import Settings
from regstream.core_banking.simulator import SimulatorConfig
from regstream.core_banking.simulator.dataset import load_applicant
from regstream.core_banking.simulator.server import serve_in_thread
from regstream.realtime.connections import (
    REDIS_ERRORS,
    RedisTarget,
    create_client,
    create_node_subscriber_client,
    resolve_cluster,
)
from regstream.realtime.publisher import RegistrationPubSub
from tests.cluster_support import PrivateCluster
from tests.support import TEST_SECRET_KEY, StreamClient, auth_headers, serve_app, wait_until

pytestmark = pytest.mark.redis


@dataclass(frozen=True)
class FirstNodeDown:
    cluster: PrivateCluster
    url: str  # names the dead node
    others: tuple[tuple[str, int], ...]  # every live node


@pytest.fixture(scope="module")
def first_node_down(redis_cluster: PrivateCluster) -> FirstNodeDown:
    """The module's private cluster (every test here wants it so) with its first master, the
    one its ``url`` named, killed and replaced by its replica before the first test."""
    url = redis_cluster.url
    first = redis_cluster.masters()[0]
    assert url.endswith(f":{first.port}")
    killed = redis_cluster.kill_master_of(first.slots[0][0])
    assert killed.port == first.port
    asyncio.run(redis_cluster.wait_promoted(killed))
    others = tuple(("127.0.0.1", port) for port in redis_cluster.alive())
    assert len(others) == 5 and first.port not in {port for _, port in others}
    return FirstNodeDown(redis_cluster, url, others)


async def test_the_dead_node_alone_gives_no_redis(first_node_down: FirstNodeDown) -> None:
    """The control: without more startup nodes, detection and a cluster client both fail."""
    target = RedisTarget.from_url(first_node_down.url)
    with pytest.raises(REDIS_ERRORS):
        await resolve_cluster(target)
    client = create_client(replace(target, cluster=True), name="h6-alone", retries=0)
    try:
        with pytest.raises(REDIS_ERRORS):
            await asyncio.wait_for(client.set("h6-alone", b"x"), 15)
    finally:
        await client.aclose()


async def test_detection_asks_the_next_node(first_node_down: FirstNodeDown) -> None:
    target = replace(RedisTarget.from_url(first_node_down.url), nodes=first_node_down.others)
    resolved = await resolve_cluster(target)
    assert resolved.cluster and resolved.nodes == first_node_down.others


async def test_every_client_works_through_the_other_startup_nodes(
    first_node_down: FirstNodeDown,
) -> None:
    cluster = first_node_down.cluster
    target = replace(RedisTarget.from_url(first_node_down.url), cluster=True,
                     nodes=first_node_down.others)  # fmt: skip
    keys = cluster.name_per_master("h6-key")
    commands = create_client(target, name="h6-commands", retries=0)
    limits = create_client(target, name="h6-limits", retries=0, socket_timeout=2.0)
    assert isinstance(commands, RedisCluster) and isinstance(limits, RedisCluster)
    store = LimitStore(limits, secret=TEST_SECRET_KEY.encode(), timeout=10.0)
    try:
        for port, key in keys.items():  # every shard, the promoted one included
            assert await asyncio.wait_for(commands.set(key, b"v"), 15) is True
            with cluster.client(port) as direct:
                assert direct.get(key) == b"v"
        # a partition's subscriber: a plain client of the owning node, from the slot map
        channel = keys[cluster.masters()[-1].port]
        node = commands.get_node_from_key(channel)
        assert node is not None
        subscriber = create_node_subscriber_client(target, node.host, int(node.port),
                                                   name="h6-sub")  # fmt: skip
        pubsub = subscriber.pubsub()
        try:
            await pubsub.execute_command("SSUBSCRIBE", channel)
            assert await commands.spublish(channel, b"hello") == 1
            got = None
            for _ in range(50):  # bounded: 50 reads of at most 0.2 s
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if message is not None:
                    got = message
                    break
            assert got is not None and got["data"] == b"hello"
        finally:
            await pubsub.aclose()
            await subscriber.aclose()
        # the limits' own cluster client (``limits`` builds it from our client's startup nodes)
        limit = RateLimit(store, "h6-login", 2)
        assert [await limit.hit("h6-who") for _ in range(2)] == [0.0, 0.0]
        assert await limit.hit("h6-who") > 0
        assert not store.down
    finally:
        await store.aclose()
        await limits.aclose()
        await commands.aclose()


def _settings(down: FirstNodeDown, tmp_path: Path, t24_url: str) -> Settings:
    nodes = ",".join(f"{host}:{port}" for host, port in down.others)
    return Settings(
        data_dir=tmp_path / "var", redis_url=SecretStr(down.url), redis_cluster_nodes=nodes,
        t24_base_url=t24_url, secret_key=SecretStr(TEST_SECRET_KEY), t24_timeout=2.0,
        t24_deadline=4.0, probe_interval=1.0, lease_seconds=5.0, drain_spread=0.5,
        login_attempts_per_minute=2,
    )  # fmt: skip


async def test_an_app_started_while_the_first_node_is_down_works(
    first_node_down: FirstNodeDown, tmp_path: Path
) -> None:
    """REDIS_CLUSTER unset: detected through the next node; updates published and streamed;
    the sign-in throttle counted in the cluster."""
    with serve_in_thread(SimulatorConfig(latency_ms=5)) as t24:
        with serve_app(_settings(first_node_down, tmp_path, t24.base_url)) as live:
            assert live.services.bus.partitioned
            assert isinstance(live.app.state.auth.redis, RedisCluster)
            operator = auth_headers(live, "operator")
            async with httpx.AsyncClient(base_url=live.url, headers=operator, timeout=10) as http:
                rids = []
                for n in range(6):
                    created = await http.post("/api/registrations", json=load_applicant(8_100 + n))
                    assert created.status_code == 201, created.text
                    rids.append(created.json()["id"])
                headers = auth_headers(live, "admin")
                async with StreamClient(live.url, headers=headers) as everything:
                    response = await http.post("/api/registrations/process",
                                               json={"registrationIds": rids})  # fmt: skip
                    assert response.status_code == 200, response.text
                    for rid in rids:
                        final = await everything.wait_final(rid)
                        assert final["final"]
                assert (await http.get("/readyz")).status_code == 200
            wrong = {"username": "h6-kim", "password": "not-the-password-1"}
            async with httpx.AsyncClient(base_url=live.url, timeout=10) as anonymous:
                codes = [(await anonymous.post("/api/auth/login", json=wrong)).status_code
                         for _ in range(3)]  # fmt: skip
            assert codes == [401, 401, 429]
            assert not live.app.state.auth.store.down


async def test_the_library_publisher_takes_the_other_startup_nodes(
    first_node_down: FirstNodeDown,
) -> None:
    """``RegistrationPubSub.from_url(..., cluster=True, nodes=...)``: what a library user gives
    instead of ``REDIS_CLUSTER_NODES``. Through the dead node alone it publishes nothing (the
    control above); with the others it publishes and its subscriber receives, on every shard."""
    with pytest.raises(ValueError, match="cluster=True"):
        RegistrationPubSub.from_url(first_node_down.url, nodes=first_node_down.others)
    pubsub = RegistrationPubSub.from_url(
        first_node_down.url, cluster=True, nodes=first_node_down.others, name="h6-library"
    )
    received: list[dict[str, Any]] = []
    try:
        await pubsub.subscribe(received.append, ready_timeout=15)
        rids = list(range(1, 17))  # one registration per partition: every shard
        for rid in rids:
            await pubsub.publish_stage_update(rid, "duplicate_check", "started")
        await wait_until(lambda: {u["registrationId"] for u in received} == set(rids),
                         timeout=20, what="an update of every partition")  # fmt: skip
    finally:
        await pubsub.aclose()
