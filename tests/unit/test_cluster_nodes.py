"""``REDIS_CLUSTER_NODES``: more startup nodes of a Redis Cluster besides ``REDIS_URL``'s, parsed
once, carried by ``RedisTarget`` and given to redis-py's ``RedisCluster`` as ``startup_nodes``
(``tests/integration/test_cluster_startup_nodes.py`` kills the URL's node and starts the app)."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster

from regstream.config import load_settings
from regstream.realtime.connections import RedisTarget, create_client

NODES = "n1:7000, [fd00::2]:7001,n3"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("REDIS_URL", "REDIS_HOST", "REDIS_SENTINELS", "REDIS_TLS", "REDIS_CLUSTER",
                 "REDIS_CLUSTER_NODES", "REDIS_PASSWORD", "REDIS_USERNAME"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_nodes_are_parsed_and_reach_the_target(env: pytest.MonkeyPatch) -> None:
    env.setenv("REDIS_URL", "redis://app:s3cret@n1:7000")
    env.setenv("REDIS_CLUSTER_NODES", NODES)
    settings = load_settings()
    assert settings.redis_cluster_nodes == (("n1", 7000), ("fd00::2", 7001), ("n3", 6379))
    target = RedisTarget.from_settings(settings)
    assert target.nodes == settings.redis_cluster_nodes and not target.cluster  # detected later
    # the URL's node first, each once
    assert target.startup_nodes == (("n1", 7000), ("fd00::2", 7001), ("n3", 6379))
    assert target.node_url("fd00::2", 7001) == "redis://app:s3cret@[fd00::2]:7001"
    assert "s3cret" not in target.describe() and "s3cret" not in repr(target)
    assert target.describe() == "redis://n1:7000 (+2 startup nodes)"


def test_without_redis_url_the_first_node_is_the_url(env: pytest.MonkeyPatch) -> None:
    env.setenv("REDIS_CLUSTER_NODES", "n2:7002,n3:7003")
    env.setenv("REDIS_PASSWORD", "p@ss")
    env.setenv("REDIS_CLUSTER", "true")
    settings = load_settings()
    assert settings.effective_redis_url == "redis://:p%40ss@n2:7002/0"
    target = RedisTarget.from_settings(settings)
    assert target.cluster and target.startup_nodes == (("n2", 7002), ("n3", 7003))


def test_the_cluster_client_starts_from_every_node(env: pytest.MonkeyPatch) -> None:
    env.setenv("REDIS_URL", "redis://127.0.0.1:7000")
    env.setenv("REDIS_CLUSTER_NODES", "127.0.0.1:7001,127.0.0.2:7002")
    env.setenv("REDIS_CLUSTER", "true")
    client = create_client(RedisTarget.from_settings(load_settings()), name="unit")
    assert isinstance(client, RedisCluster)
    names = {f"{node.host}:{node.port}" for node in client.startup_nodes}
    assert names == {"127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.2:7002"}


def test_a_target_without_nodes_is_unchanged(env: pytest.MonkeyPatch) -> None:
    env.setenv("REDIS_URL", "redis://n1:7000")
    target = RedisTarget.from_settings(load_settings())
    assert target.nodes == () and target.startup_nodes == (("n1", 7000),)
    assert target.describe() == "redis://n1:7000"
    with pytest.raises(ValueError, match="redis:// or rediss://"):
        RedisTarget(url="unix:///run/redis.sock", nodes=(("n1", 7000),))
