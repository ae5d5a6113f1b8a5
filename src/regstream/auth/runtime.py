"""Auth state of one app instance: rate limits, the argon2 turns and the stream guard.

Built by ``app``'s lifespan with the limits' Redis client (``AuthRuntime(settings, redis=…,
secret=…)``: one Redis, a Sentinel service's primary or a Redis Cluster) and closed by it
(``aclose()``); with ``redis=None`` every limit counts in this process only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from regstream.auth.limits import LimitStore, RateLimit
from regstream.auth.passwords import HashingTurns
from regstream.auth.stream_slots import StreamSlots
from regstream.auth.streams import StreamGuard
from regstream.config import Settings
from regstream.realtime.connections import RedisClient

#: refusals by unauthenticated clients audited per address and minute (so nobody floods the
#: audit table by hammering the API without credentials)
REFUSALS_AUDITED_PER_MINUTE = 30

#: latency reports a user's browsers may send per minute (a page reports every 5 s; a few tabs)
LATENCY_REPORTS_PER_MINUTE = 30


def guard_interval(ping_interval: float) -> float:
    """How often open streams' credentials are re-checked: well within one ping interval."""
    return min(10.0, max(0.25, ping_interval / 2))


def slot_ttl(interval: float) -> float:
    """How long a stream slot outlives its last renewal: three renewals, at least 2 s."""
    return max(2.0, 3 * interval)


@dataclass
class AuthRuntime:
    settings: Settings
    redis: RedisClient | None = None
    secret: bytes = b""
    store: LimitStore = field(init=False)
    process_limit: RateLimit = field(init=False)
    login_limit: RateLimit = field(init=False)
    login_address_limit: RateLimit = field(init=False)
    throttle_audit_limit: RateLimit = field(init=False)
    refusal_audit_limit: RateLimit = field(init=False)
    latency_report_limit: RateLimit = field(init=False)
    hashing: HashingTurns = field(init=False)
    guard: StreamGuard = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.store = LimitStore(self.redis, secret=self.secret)
        self.process_limit = RateLimit(self.store, "process", s.process_rate_per_minute)
        self.login_limit = RateLimit(self.store, "login", s.login_attempts_per_minute)
        self.login_address_limit = RateLimit(
            self.store, "login-address", s.login_attempts_per_address_per_minute
        )
        # one audit entry per minute for an address whose sign-ins are being throttled
        self.throttle_audit_limit = RateLimit(self.store, "login-throttled-audit", 1)
        self.refusal_audit_limit = RateLimit(
            self.store, "refusal-audit", REFUSALS_AUDITED_PER_MINUTE
        )
        self.latency_report_limit = RateLimit(
            self.store, "latency-report", LATENCY_REPORTS_PER_MINUTE
        )
        self.hashing = HashingTurns()
        interval = guard_interval(s.sse_ping_interval)
        slots = None
        if self.redis is not None:
            slots = StreamSlots(self.store, cap=s.streams_per_user, ttl=slot_ttl(interval))
        self.guard = StreamGuard(per_user=s.streams_per_user, interval=interval, slots=slots)

    async def aclose(self) -> None:
        """Close the limits' Redis clients (``limits``' own on a cluster, then ``redis``)."""
        await self.store.aclose()
        if self.redis is not None:
            await self.redis.aclose()
