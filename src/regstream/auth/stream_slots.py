"""Open streams per user, counted fleet-wide in Redis (issue 15).

A concurrency count, not a rate (``limits`` has none): each user has a sorted set
``regstream:streams:<operator id>`` of the open streams' ids (``<instance>:<n>``), scored by the
millisecond their slot expires. Admission is one Lua script (drop expired slots, count, add), so
two instances cannot both take the last slot. Each instance renews the slots of its live streams
every guard interval (``StreamGuard.renew``) to ``ttl`` seconds ahead and frees a slot as soon as
its stream leaves the hub (``Hub``'s ``on_detach`` hook), so a dead instance's slots expire
within ``ttl`` (30 s with the defaults: three renewals) and a closed stream's slot is free for
the user's next stream on any instance.

On a Redis Cluster (issue 18) the same code runs on redis-py's ``RedisCluster``: the script
touches one key (one user's set, one slot), and ``release``/``renew`` are pipelines without a
transaction, which redis-py splits by node (users' sets live on every shard). A master lost
mid-call is an outage like any other (below) until its replica is promoted.

While Redis does not answer, ``acquire`` returns ``None`` and the guard counts this process's
streams at the same cap (per process: at most N × the cap over N instances). When Redis is back
the next renewal adds the slots of streams admitted meanwhile, and those a restarted Redis lost
(the count may then exceed the cap until some end; nobody is cut).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from regstream.auth.limits import LimitStore, Unavailable

KEY_PREFIX = "regstream:streams:"

# KEYS[1] the user's set; ARGV: now (ms), expiry of the new slot (ms), cap, slot id
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
"""


class StreamSlots:
    """``acquire``/``release``/``renew`` the user's stream slots in Redis (``None``: Redis out)."""

    def __init__(self, store: LimitStore, *, cap: int, ttl: float) -> None:
        self.store = store
        self.cap = cap
        self.ttl = ttl
        redis = store.redis
        self._acquire = redis.register_script(_ACQUIRE) if redis is not None else None

    async def acquire(self, operator_id: int, slot: str) -> bool | None:
        """Take a slot for ``slot`` if the user has fewer than ``cap``; ``None`` if Redis is out."""
        script = self._acquire
        if script is None:
            return None
        now = int(time.time() * 1000)
        expires = now + int(self.ttl * 1000)
        key = f"{KEY_PREFIX}{operator_id}"
        result = await self.store.shared(
            lambda: script(keys=[key], args=[now, expires, self.cap, slot])
        )
        if isinstance(result, Unavailable):
            return None
        return bool(result)

    async def release(self, slots: Iterable[tuple[int, str]]) -> bool:
        """Free these ``(operator id, slot)``s; ``False`` if Redis did not answer."""
        redis = self.store.redis
        slots = list(slots)
        if redis is None or not slots:
            return redis is not None

        async def remove() -> None:
            async with redis.pipeline(transaction=False) as pipe:
                for operator_id, slot in slots:
                    pipe.zrem(f"{KEY_PREFIX}{operator_id}", slot)
                await pipe.execute()

        return not isinstance(await self.store.shared(remove), Unavailable)

    async def renew(self, live: Mapping[int, Iterable[str]]) -> bool:
        """Push the expiry of every live slot ``ttl`` ahead, adding those Redis lost or never had
        (a restarted Redis, streams admitted while it was out)."""
        redis = self.store.redis
        if redis is None or not live:
            return redis is not None
        expires = int(time.time() * 1000) + int(self.ttl * 1000)

        async def renew() -> None:
            async with redis.pipeline(transaction=False) as pipe:
                for operator_id, slots in live.items():
                    key = f"{KEY_PREFIX}{operator_id}"
                    pipe.zadd(key, dict.fromkeys(slots, expires))
                    pipe.pexpireat(key, expires)
                await pipe.execute()

        return not isinstance(await self.store.shared(renew), Unavailable)
