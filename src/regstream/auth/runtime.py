"""Per-process auth state: rate limiters and the stream guard (built by ``app``'s lifespan)."""

from __future__ import annotations

from dataclasses import dataclass, field

from regstream.auth.limits import RateLimiter
from regstream.auth.streams import StreamGuard
from regstream.config import Settings


def guard_interval(ping_interval: float) -> float:
    """How often open streams' credentials are re-checked: well within one ping interval."""
    return min(10.0, max(0.25, ping_interval / 2))


@dataclass
class AuthRuntime:
    settings: Settings
    process_limiter: RateLimiter = field(init=False)
    login_limiter: RateLimiter = field(init=False)
    refusal_log_limiter: RateLimiter = field(init=False)
    guard: StreamGuard = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.process_limiter = RateLimiter(s.process_rate_per_minute, 60.0)
        self.login_limiter = RateLimiter(s.login_attempts_per_minute, 60.0)
        # refusals by unauthenticated clients are audited, but at most 30 a minute per address,
        # so nobody can flood the audit table by hammering the API without credentials
        self.refusal_log_limiter = RateLimiter(30, 60.0)
        self.guard = StreamGuard(
            per_user=s.streams_per_user, interval=guard_interval(s.sse_ping_interval)
        )
