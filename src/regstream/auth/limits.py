"""Fleet-wide rate limits: moving windows in Redis (``limits``), per process while Redis is out.

Every instance of the service counts in the same Redis, so a setting means the same with one
instance or ten (issue 15). The strategy is ``limits``' moving window (exact: the N+1th event in
any 60 s is refused), on its redis-py storage built over a connection pool made by
``realtime.connections.create_client`` — the same URL, credentials, TLS and Sentinel handling as
the service's other Redis clients, but its own small pool so a herd of stream resumes reading
the history never delays a sign-in (and a sign-in never delays the publisher).

On a Redis Cluster (``create_client`` returned redis-py's ``RedisCluster``: issue 18) the window
lives in ``limits``' ``RedisClusterStorage`` (``implementation="redispy"``), which builds a
``RedisCluster`` of its own from an ``async+redis+cluster://`` URI and the options it passes
through to redis-py (``limits`` takes no ready client or pool in cluster mode): the URI names our
client's startup nodes and the options are its credentials, TLS, timeouts, name and per-node
pool size, so both reach the same nodes the same way. Each window is one key (one slot), so its
script runs on one node; a failover (a replica promoted) is an outage of the slots that master
served, answered as any other outage below, and redis-py's client follows the new slot map.
``aclose()`` closes that client (``limits`` has no close of its own). redis-py's cluster pools
do not wait for a free connection (past ``max_connections`` per node a command fails at once
with ``MaxConnectionsError``), so in cluster mode the store lets at most that many operations
run at a time and the others wait their turn within ``timeout``, as the blocking pool makes
them wait on one Redis: a burst of sign-ins is never taken for an outage.

While Redis does not answer, every limit falls back to ``limits``' in-memory storage at the same
setting, so N instances allow at most N times the setting, never unlimited. Every event Redis
allowed is also counted there, so an outage starts from this process's own recent count, not
from an empty window. The first failure is logged once per outage, ``regstream_limits_shared``
drops to 0 and each decision taken per process counts in ``regstream_limit_fallbacks_total``.
Redis is tried again ``retry_interval`` seconds after a failure, so an outage costs a request
nothing (no timeout per request); counts made during the outage are not carried into Redis.
``timeout`` bounds one decision, the wait for the pool included. No Redis error reaches a caller.

Keys: ``regstream:limits:rate/<limit>/<identifier>/<n>/1/minute``. The setting is part of the
key: every instance must run with the same one, or each counts its own window. Identifiers that
could carry personal data or a secret (client addresses, typed user names: people type passwords
into the name field) are BLAKE2b digests keyed with the service's secret key (the same on every
instance), never in clear.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisClusterStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.exceptions import RedisClusterException, RedisError

from regstream import metrics
from regstream.realtime.connections import RedisClient

log = logging.getLogger(__name__)

T = TypeVar("T")
KEY_PREFIX = "regstream:limits"
#: what a Redis that is down, slow or failing over raises through redis-py and ``limits`` (a
#: cluster with no node to ask, or a slot nobody serves: ``RedisClusterException``, not a
#: ``RedisError``, and not wrapped by ``limits``)
REDIS_FAILURES: tuple[type[BaseException], ...] = (
    StorageError, RedisError, RedisClusterException, OSError, TimeoutError,
)  # fmt: skip
#: the connection options of our cluster client that ``limits``' own client gets too
_CLUSTER_OPTIONS = (
    "username", "password", "client_name", "socket_timeout", "socket_connect_timeout",
    "health_check_interval", "max_connections",
)  # fmt: skip


class Unavailable:
    """What ``LimitStore.shared`` returns instead of a result while Redis does not answer."""


UNAVAILABLE = Unavailable()


class LimitStore:
    """Where every limit counts: Redis (``redis``, may be ``None``) or, while it does not answer,
    this process's memory. ``shared(op)`` runs a Redis operation or returns ``UNAVAILABLE``."""

    def __init__(
        self, redis: RedisClient | None, *, secret: bytes, timeout: float = 2.0,
        retry_interval: float = 2.0,
    ) -> None:  # fmt: skip
        self.redis = redis
        self._secret = hashlib.blake2b(secret, digest_size=32).digest()
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.memory = MovingWindowRateLimiter(MemoryStorage())
        self.shared_limiter: MovingWindowRateLimiter | None = None
        self._cluster_storage: RedisClusterStorage | None = None
        self._turns: asyncio.Semaphore | None = None  # cluster mode: the pool's blocking wait
        if isinstance(redis, RedisCluster):
            self._cluster_storage = cluster_storage(redis)
            self._turns = asyncio.Semaphore(_pool_size(redis))
            self.shared_limiter = MovingWindowRateLimiter(self._cluster_storage)
        elif redis is not None:
            # documented (``connection_pool``), though its options are typed as scalars
            storage = RedisStorage(
                "async+redis://", implementation="redispy", wrap_exceptions=True,
                key_prefix=KEY_PREFIX,
                connection_pool=redis.connection_pool,  # type: ignore[arg-type]
            )  # fmt: skip
            self.shared_limiter = MovingWindowRateLimiter(storage)
        self._retry_at = 0.0
        self._down = False
        metrics.LIMITS_SHARED.set(1 if redis is not None else 0)

    def digest(self, *parts: str) -> str:
        """A short stand-in, the same on every instance, for identifiers not to store in clear."""
        joined = "\x1f".join(parts).encode("utf-8", "surrogatepass")
        return hashlib.blake2b(joined, digest_size=12, key=self._secret).hexdigest()

    @property
    def down(self) -> bool:
        return self._down

    async def aclose(self) -> None:
        """Close ``limits``' own cluster client (the caller closes ``redis``)."""
        storage, self._cluster_storage = self._cluster_storage, None
        # ``bridge.storage``: the client ``limits`` built (public names, though not documented:
        # ``limits`` itself never closes it)
        client = getattr(getattr(storage, "bridge", None), "storage", None)
        if isinstance(client, RedisCluster):
            await client.aclose()

    async def shared(self, op: Callable[[], Awaitable[T]]) -> T | Unavailable:
        """``await op()`` against Redis within ``timeout``; ``UNAVAILABLE`` if Redis is out."""
        if self.redis is None or time.monotonic() < self._retry_at:
            metrics.LIMIT_FALLBACKS.inc()
            return UNAVAILABLE
        try:
            async with asyncio.timeout(self.timeout):
                if self._turns is None:
                    result = await op()
                else:
                    async with self._turns:
                        result = await op()
        except REDIS_FAILURES as exc:
            self._retry_at = time.monotonic() + self.retry_interval
            metrics.LIMIT_FALLBACKS.inc()
            if not self._down:
                self._down = True
                metrics.LIMITS_SHARED.set(0)
                log.warning(
                    "Redis unreachable for fleet-wide limits (%s): limits count per process, "
                    "at the same settings, until it answers", type(exc).__name__,
                )  # fmt: skip
            return UNAVAILABLE
        if self._down:
            self._down = False
            metrics.LIMITS_SHARED.set(1)
            log.info("Redis answers again: limits are fleet-wide again")
        return result


class RateLimit:
    """``per_minute`` events per key in any 60 seconds, counted fleet-wide.

    ``await hit(key)`` takes one and returns 0.0, or returns the seconds until one is free (not
    taking it); ``hit(key, cost=n)`` takes ``n`` at once (a bulk action). A cost above the limit
    never fits: callers refuse such a request outright.

    A refusal of a single event is remembered until the window frees a slot: in a moving window
    nothing frees one sooner (entries only age out), so a flood past the limit (a password spray)
    is answered from memory without a Redis round trip per request, exactly as Redis would.
    """

    MAX_REMEMBERED = 10_000

    def __init__(self, store: LimitStore, name: str, per_minute: int) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be >= 1")
        self.store = store
        self.name = name
        self.item: RateLimitItem = RateLimitItemPerMinute(per_minute, namespace="rate")
        self.rate = per_minute
        self._refused_until: dict[str, float] = {}  # key -> time.monotonic() of the free slot

    async def hit(self, key: str, cost: int = 1) -> float:
        now = time.monotonic()
        until = self._refused_until.get(key)
        if until is not None:
            if now < until:
                return until - now
            del self._refused_until[key]
        shared = self.store.shared_limiter
        wait: float | Unavailable = UNAVAILABLE
        if shared is not None:
            wait = await self.store.shared(lambda: self._hit(shared, key, cost))
        if isinstance(wait, Unavailable):
            wait = await self._hit(self.store.memory, key, cost)
        elif not wait:
            # mirrored into this process's memory, so an outage starts from this process's own
            # count instead of an empty window (the memory count is never above Redis's)
            await self.store.memory.hit(self.item, self.name, key, cost=cost)
        if wait and cost == 1:  # (a bulk refused may leave room for a single one)
            self._remember(key, now + wait)
        return wait

    def _remember(self, key: str, until: float) -> None:
        if len(self._refused_until) >= self.MAX_REMEMBERED:
            now = time.monotonic()
            self._refused_until = {k: t for k, t in self._refused_until.items() if t > now}
            if len(self._refused_until) >= self.MAX_REMEMBERED:
                return  # all still refused: ask the store for this one each time
        self._refused_until[key] = until

    async def _hit(self, limiter: MovingWindowRateLimiter, key: str, cost: int) -> float:
        if await limiter.hit(self.item, self.name, key, cost=cost):
            return 0.0
        stats = await limiter.get_window_stats(self.item, self.name, key)
        return max(0.001, stats.reset_time - time.time())


def cluster_storage(redis: RedisCluster) -> RedisClusterStorage:
    """``limits``' cluster storage reaching the nodes of ``redis`` with its options (credentials,
    TLS, timeouts, name, pool size per node): ``limits`` builds a ``RedisCluster`` of its own."""
    nodes = redis.get_nodes() or list(redis.nodes_manager.startup_nodes.values())
    hosts = ",".join(f"[{n.host}]:{n.port}" if ":" in n.host else f"{n.host}:{n.port}"
                     for n in nodes)  # fmt: skip
    kwargs = redis.get_connection_kwargs()
    options: dict[str, Any] = {k: kwargs[k] for k in _CLUSTER_OPTIONS if kwargs.get(k) is not None}
    connection_class = kwargs.get("connection_class")
    if isinstance(connection_class, type) and issubclass(connection_class, SSLConnection):
        options["ssl"] = True
        options.update(
            (key, value) for key, value in kwargs.items()
            if key.startswith("ssl_") and value is not None
        )  # fmt: skip
    return RedisClusterStorage(
        f"async+redis+cluster://{hosts}", implementation="redispy", wrap_exceptions=True,
        key_prefix=KEY_PREFIX, **options,
    )  # fmt: skip


def _pool_size(redis: RedisCluster) -> int:
    size = redis.get_connection_kwargs().get("max_connections")
    return size if isinstance(size, int) and size > 0 else 16


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
