"""The private Redis Cluster the cluster-mode tests run on (issue 18, ``tests/cluster_support.py``).

It forms (three masters serving all 16384 slots, each with a replica in sync), redis-py's
``redis.asyncio.cluster.RedisCluster`` publishes and receives on shard channels of all three
shards (``SPUBLISH``/``SSUBSCRIBE``), and a SIGKILLed master's replica is promoted and serves
its slots to a client made before the kill.
"""

from __future__ import annotations

import asyncio
import os
import time

from redis.asyncio.cluster import ClusterPubSub, RedisCluster

from tests.cluster_support import SLOTS, NodeInfo, PrivateCluster


def test_the_cluster_forms_with_three_masters_each_with_a_replica(
    redis_cluster: PrivateCluster,
) -> None:
    nodes = redis_cluster.nodes()
    masters = [n for n in nodes if n.role == "master"]
    replicas = [n for n in nodes if n.role == "replica"]
    assert (len(masters), len(replicas)) == (3, 3)
    assert sorted(str(r.master_id) for r in replicas) == sorted(m.node_id for m in masters)
    ranges = sorted(r for m in masters for r in m.slots)
    assert ranges[0][0] == 0 and ranges[-1][1] == SLOTS - 1
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(n.port < 55000 and n.pid is not None for n in nodes)
    for node in nodes:
        assert node.pid is not None
        os.kill(node.pid, 0)  # alive, and ours to signal
        with redis_cluster.client(node.port) as client:
            info = client.execute_command("CLUSTER INFO")
        assert (info["cluster_state"], info["cluster_slots_ok"]) == ("ok", str(SLOTS))
    assert redis_cluster.url == f"redis://127.0.0.1:{masters[0].port}"


async def _sharded_messages(
    pubsub: ClusterPubSub, count: int, timeout: float
) -> list[dict[str, bytes]]:
    """Up to ``count`` shard-channel messages, reading for at most ``timeout`` s."""
    got: list[dict[str, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        message = await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=0.2)
        if message is not None and message["type"] == "smessage":
            got.append({"channel": message["channel"], "data": message["data"]})
    return got


async def test_redis_py_cluster_client_spublish_and_ssubscribe_across_the_three_shards(
    redis_cluster: PrivateCluster,
) -> None:
    channels = redis_cluster.name_per_master("h5-shard-channel")
    assert len(channels) == 3  # one channel served by each master: the test crosses shards
    client = RedisCluster.from_url(redis_cluster.url)
    pubsub = client.pubsub()
    try:
        await pubsub.ssubscribe(*channels.values())
        for port, channel in channels.items():
            receivers = await client.spublish(channel, f"from {port}")
            assert receivers == 1
        got = await _sharded_messages(pubsub, 3, timeout=10)
    finally:
        await pubsub.aclose()
        await client.aclose()
    expected = [
        {"channel": channel.encode(), "data": f"from {port}".encode()}
        for port, channel in channels.items()
    ]
    key = lambda m: m["channel"]  # noqa: E731
    assert sorted(got, key=key) == sorted(expected, key=key)


async def test_a_killed_master_s_replica_is_promoted_and_serves_its_slots(
    fresh_redis_cluster: PrivateCluster,
) -> None:
    cluster = fresh_redis_cluster
    key = "h5-failover-key"
    victim = cluster.master_of(key)
    its_replicas = {n.port for n in cluster.nodes() if n.master_id == victim.node_id}
    assert len(its_replicas) == 1
    with cluster.client(victim.port) as direct:  # written and replicated before the kill
        direct.set(key, b"before")
        assert direct.execute_command("WAIT", 1, 5000) == 1
    client = RedisCluster.from_url(cluster.url)
    try:
        assert await client.get(key) == b"before"

        killed = cluster.kill_master_of(key)
        assert killed == victim
        assert victim.pid is not None
        assert _gone(victim.pid)  # SIGKILLed and reaped
        promoted: NodeInfo = await cluster.wait_promoted(killed)

        assert promoted.port in its_replicas
        assert promoted.role == "master" and promoted.slots == victim.slots
        assert cluster.master_of(key).port == promoted.port
        # the client made before the kill follows the new topology (bounded: its retries)
        assert await asyncio.wait_for(client.get(key), 15) == b"before"
        assert await client.set(key, b"after") is True
        node = client.get_node_from_key(key)
        assert node is not None and node.port == promoted.port
        with cluster.client(promoted.port) as direct:
            assert direct.get(key) == b"after"
    finally:
        await client.aclose()
    assert [n.role for n in cluster.nodes()].count("dead") == 1


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_stop_ends_every_node_and_removes_its_directory() -> None:
    cluster = PrivateCluster()
    cluster.start()
    try:
        pids = [n.pid for n in cluster.nodes()]
        directory = cluster.directory
        assert directory is not None and directory.is_dir()
    finally:
        cluster.stop()
    assert len(pids) == 6 and all(pid is not None and _gone(pid) for pid in pids)
    assert not directory.exists()
