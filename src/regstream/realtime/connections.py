"""Redis connections: the one place that knows how to reach Redis.

``RedisTarget.from_settings`` resolves the settings once (a ``redis://``/``rediss://``/``unix://``
URL, ``REDIS_HOST``, or Sentinel, plus TLS) and ``create_client`` / ``create_subscriber_client``
build redis-py clients from it, each with its own name and pool:

    target = RedisTarget.from_settings(settings)
    commands = create_client(target, name="regstream-pub-42", max_connections=8)
    subscriber = create_subscriber_client(target, name="regstream-sub-42")

Sentinel: redis-py's ``Sentinel(...).master_for(...)``. Every new connection asks the sentinels
for the current primary, and a connection to a demoted primary is dropped on its first
``READONLY`` answer, so the clients follow a promotion without a restart. What a promotion may
have lost is the publisher's business (``publisher.RegistrationPubSub.check_primary``).

Redis Cluster (``RedisTarget.cluster``, from ``REDIS_CLUSTER`` or detected by ``resolve_cluster``):
``create_client`` returns redis-py's ``RedisCluster`` (it follows ``MOVED``/``ASK`` and refreshes
the slot map after a failover); the subscription of one partition is a plain client of the node
that owns the partition's slot (``create_node_subscriber_client``), made again on every
reconnect from the cluster client's current slot map (``realtime/broker.py``). The URL's node and
``RedisTarget.nodes`` (``REDIS_CLUSTER_NODES``) are redis-py's ``startup_nodes``: a client (and
the detection) asks the next one while one is down, so one dead node never leaves an instance
started meanwhile without Redis.

redis-py's own ``Retry`` with exponential backoff and jitter reconnects single commands; the
subscriber's reconnect loop lives in ``broker`` (it must also re-subscribe and catch up).
``health_check_interval`` makes a connection that sat idle prove it is alive before use.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from regstream.config import SENTINEL_SCHEMES, SentinelAddress, Settings, parse_sentinel_url

CONNECT_TIMEOUT = 2.0

#: a client for commands: one Redis (or a Sentinel service's primary), or a Redis Cluster
RedisClient = Redis | RedisCluster

#: what a Redis that is down, slow, failing over or refusing raises through redis-py: its cluster
#: client's ``RedisClusterUnreachableError``/``SlotNotCoveredError`` are no ``RedisError``
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)


@dataclass(frozen=True)
class TlsOptions:
    """Client-side TLS: the CA bundle to trust (system CAs when None) and a client certificate."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    check_hostname: bool = True

    def connection_kwargs(self) -> dict[str, Any]:
        """redis-py's ``ssl_*`` connection keywords (the server's certificate is required)."""
        kwargs: dict[str, Any] = {
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": self.check_hostname,
        }
        if self.ca is not None:
            kwargs["ssl_ca_certs"] = str(self.ca)
        if self.cert is not None and self.key is not None:
            kwargs["ssl_certfile"] = str(self.cert)
            kwargs["ssl_keyfile"] = str(self.key)
        return kwargs


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is and how to talk to it: a URL, or a Sentinel service; TLS or not.

    Build it with ``from_settings`` (the service) or ``from_url`` (tests, tools). ``describe()``
    is safe to log (no credentials).
    """

    url: str | None = field(default=None, repr=False)  # redis://, rediss:// or unix://
    sentinel: SentinelAddress | None = None
    tls: TlsOptions | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    #: a Redis Cluster (``url`` names one of its nodes; the others are discovered)
    cluster: bool = False
    #: more startup nodes of a cluster (``host``, ``port``) besides the URL's, asked in turn
    nodes: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if (self.url is None) == (self.sentinel is None):
            raise ValueError("a RedisTarget has either a url or a sentinel address")
        if (self.cluster or self.nodes) and (self.url is None or self.is_unix):
            raise ValueError("a Redis Cluster is reached by a redis:// or rediss:// node URL")

    @classmethod
    def from_url(cls, url: str, *, tls: TlsOptions | None = None) -> RedisTarget:
        """A target from a ``redis://``, ``rediss://``, ``unix://`` or Sentinel URL."""
        if url.startswith(SENTINEL_SCHEMES):
            address = parse_sentinel_url(url)
            if tls is None and address.tls:
                tls = TlsOptions()
            return cls(sentinel=address, tls=tls)
        if tls is None and url.startswith("rediss://"):
            tls = TlsOptions()
        return cls(url=url, tls=tls)

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisTarget:
        """The service's target (``effective_redis_url`` + the TLS and sentinel settings)."""
        url = settings.effective_redis_url
        if url is None:
            raise ValueError("no Redis configured (the embedded server starts in stack.py)")
        tls = None
        if settings.redis_tls_enabled:
            tls = TlsOptions(
                ca=settings.redis_tls_ca, cert=settings.redis_tls_cert,
                key=settings.redis_tls_key, check_hostname=settings.redis_tls_check_hostname,
            )  # fmt: skip
        target = cls.from_url(url, tls=tls)
        if target.sentinel is None:
            nodes = settings.redis_cluster_nodes
            return replace(target, cluster=bool(settings.redis_cluster), nodes=nodes)
        secret = settings.redis_sentinel_password
        return cls(
            sentinel=target.sentinel, tls=tls,
            sentinel_username=settings.redis_sentinel_username,
            sentinel_password=secret.get_secret_value() if secret is not None else None,
        )  # fmt: skip

    @property
    def is_unix(self) -> bool:
        return self.url is not None and self.url.startswith("unix://")

    @property
    def startup_nodes(self) -> tuple[tuple[str, int], ...]:
        """The URL's node, then ``nodes`` (once each): where a cluster client starts."""
        if self.url is None or self.is_unix:
            return ()
        parts = urlsplit(self.url)
        found = [(parts.hostname or "localhost", parts.port or 6379)]
        found += [node for node in self.nodes if node not in found]
        return tuple(found)

    def node_url(self, host: str, port: int) -> str:
        """The URL of one node: this target's scheme, credentials and query, that address."""
        assert self.url is not None
        parts = urlsplit(self.url)
        netloc = parts.netloc.rpartition("@")
        auth = netloc[0] + "@" if netloc[1] else ""
        where = f"[{host}]" if ":" in host else host
        return parts._replace(netloc=f"{auth}{where}:{port}", path="").geturl()

    def describe(self) -> str:
        """``redis://host:port/db`` / ``unix:///path`` / ``sentinel mymaster (3 sentinels)``."""
        tls = " (TLS)" if self.tls is not None else ""
        if self.sentinel is not None:
            count = len(self.sentinel.sentinels)
            return f"Sentinel service {self.sentinel.service!r} ({count} sentinels){tls}"
        parts = urlsplit(self.url or "")
        where = parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"
        cluster = " (Redis Cluster)" if self.cluster else ""
        if self.nodes:
            more = len(self.startup_nodes) - 1
            cluster += f" (+{more} startup node{'s' if more != 1 else ''})"
        return f"{parts.scheme}://{where}{tls}{cluster}"


async def resolve_cluster(target: RedisTarget, setting: bool | None = None) -> RedisTarget:
    """The target in cluster mode when ``setting`` (``REDIS_CLUSTER``) says so, or, unset, when
    the server says ``cluster_enabled:1`` (``INFO cluster``): the URL's node is asked, then each
    of ``nodes`` while none answered. Raises ``RedisError``/``OSError`` when none can be asked."""
    if setting is not None or target.sentinel is not None or target.is_unix:
        return replace(target, cluster=bool(setting)) if setting is not None else target
    failure: BaseException | None = None
    for host, port in target.startup_nodes:
        node = replace(target, url=target.node_url(host, port), cluster=False, nodes=())
        probe = create_client(node, name="regstream-probe", retries=0, max_connections=1)
        try:
            info = await probe.info("cluster")
        except REDIS_ERRORS as exc:
            failure = exc  # the next node
            continue
        finally:
            await probe.aclose()
        return replace(target, cluster=str(info.get("cluster_enabled", 0)) == "1")
    assert failure is not None
    raise failure


class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool with ``BlockingConnectionPool``'s wait for a free connection:
    a burst of history reads queues for the pool's connections (up to ``timeout``) instead of
    failing with "Too many connections", the same as without Sentinel."""


class SentinelMasterClient(Redis):
    """The client ``master_for`` returns; ``aclose()`` also closes the sentinels' connections
    (redis-py leaves them to whoever made the ``Sentinel``, and each client makes its own)."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        if isinstance(manager, Sentinel):
            await manager.aclose()


def create_client(
    target: RedisTarget | str, *, name: str, retries: int = 2, socket_timeout: float = 5.0,
    max_connections: int = 8,
) -> RedisClient:  # fmt: skip
    """A client for commands (publisher, history, readiness). Bytes in, bytes out.

    A blocking pool with a small cap: a reconnect storm (thousands of streams resuming at once,
    each reading the history) waits for a connection instead of opening one per request.
    """
    target = RedisTarget.from_url(target) if isinstance(target, str) else target
    if target.cluster:
        return _cluster_client(target, name=name, retries=retries, socket_timeout=socket_timeout,
                               max_connections=max_connections)  # fmt: skip
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": socket_timeout,  # the wait for a free connection of the pool
        "client_name": name,
        "decode_responses": False,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "health_check_interval": 15,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }
    if target.sentinel is not None:
        return _master_for(target, options, pool_class=BlockingSentinelConnectionPool)
    assert target.url is not None
    pool = BlockingConnectionPool.from_url(target.url, **options, **_tls_kwargs(target))
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def create_subscriber_client(target: RedisTarget | str, *, name: str) -> Redis:
    """A client for the subscription: no socket timeout (it waits for messages); RESP2, where a
    message is a plain reply (RESP3, redis-py 8's default, makes each a push that redis-py routes
    through its push handlers: ~1.1-1.2x the broker's CPU per message, ``bench/broker_bench.py``).
    The connection sends only (S)SUBSCRIBE, which RESP2 allows (the probes go on the command
    client); the broker reads RESP3 as well."""
    target = RedisTarget.from_url(target) if isinstance(target, str) else target
    options: dict[str, Any] = {
        "client_name": name,
        "decode_responses": False,
        "socket_timeout": None,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "protocol": 2,
    }
    if not target.is_unix:
        options["socket_keepalive"] = True
    if target.sentinel is not None:
        return _master_for(target, options, pool_class=SentinelConnectionPool)
    assert target.url is not None
    return Redis.from_url(target.url, **options, **_tls_kwargs(target))


def create_node_subscriber_client(target: RedisTarget, host: str, port: int, *, name: str) -> Redis:
    """A subscriber client of one cluster node (its shard channels): the target's credentials and
    TLS, that node's address."""
    url = target.node_url(host, port)
    return create_subscriber_client(replace(target, url=url, cluster=False, nodes=()), name=name)


def _cluster_client(
    target: RedisTarget, *, name: str, retries: int, socket_timeout: float, max_connections: int
) -> RedisCluster:
    """redis-py's cluster client: a pool per node, ``MOVED``/``ASK`` followed, the slot map
    refreshed after a node fails (its replica promoted); started from the URL's node and
    ``target.nodes`` (redis-py's public ``startup_nodes``: it asks them in turn)."""
    assert target.url is not None
    tls = target.tls.connection_kwargs() if target.tls is not None else {}
    if tls and target.url.startswith("redis://"):
        tls["ssl"] = True  # REDIS_TLS=true with a redis:// URL
    startup = [ClusterNode(host, port) for host, port in target.nodes] or None
    return RedisCluster.from_url(
        target.url, startup_nodes=startup, client_name=name, decode_responses=False,
        socket_timeout=socket_timeout,
        socket_connect_timeout=CONNECT_TIMEOUT, health_check_interval=15,
        max_connections=max_connections,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
        **tls,
    )  # fmt: skip


def _tls_kwargs(target: RedisTarget) -> dict[str, Any]:
    if target.tls is None:
        return {}
    kwargs = target.tls.connection_kwargs()
    if target.url is not None and target.url.startswith("redis://"):
        kwargs["connection_class"] = SSLConnection  # REDIS_TLS=true with a redis:// URL
    return kwargs


def _master_for(
    target: RedisTarget, options: dict[str, Any], *, pool_class: type[SentinelConnectionPool]
) -> Redis:
    address = target.sentinel
    assert address is not None
    tls = target.tls.connection_kwargs() if target.tls is not None else {}
    # The sentinels: same TLS, their own credentials, short timeouts (discovery moves on to the
    # next sentinel when one does not answer).
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": CONNECT_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "username": target.sentinel_username,
        "password": target.sentinel_password,
        "decode_responses": False,
    }
    if target.tls is not None:
        sentinel_kwargs.update(ssl=True, **tls)
    sentinel = Sentinel(address.sentinels, sentinel_kwargs=sentinel_kwargs)
    extra: dict[str, Any] = {"ssl": True, **tls} if target.tls is not None else {}
    client: Redis = sentinel.master_for(
        address.service, redis_class=SentinelMasterClient, connection_pool_class=pool_class,
        db=address.db, username=address.username, password=address.password,
        **options, **extra,
    )  # fmt: skip
    return client
