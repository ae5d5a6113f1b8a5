"""Redis connections: one factory, separate publisher and subscriber clients.

redis-py's own ``Retry`` with exponential backoff and jitter reconnects single commands; the
subscriber's reconnect loop lives in ``broker`` (it must also re-subscribe and catch up).
``health_check_interval`` makes a connection that sat idle prove it is alive before use.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def create_client(
    url: str, *, name: str, retries: int = 2, socket_timeout: float = 5.0, max_connections: int = 8
) -> Redis:
    """A client for commands (publisher, history, readiness). Bytes in, bytes out.

    A blocking pool with a small cap: a reconnect storm (thousands of streams resuming at once,
    each reading the history) waits for a connection instead of opening one per request.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout,
        client_name=name,
        decode_responses=False,
        socket_timeout=socket_timeout,
        socket_connect_timeout=2.0,
        health_check_interval=15,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def create_subscriber_client(url: str, *, name: str) -> Redis:
    """A client for the subscription: no socket timeout (it waits for messages)."""
    extra = {} if url.startswith("unix://") else {"socket_keepalive": True}
    return Redis.from_url(
        url,
        client_name=name,
        decode_responses=False,
        socket_timeout=None,
        socket_connect_timeout=2.0,
        **extra,
    )
