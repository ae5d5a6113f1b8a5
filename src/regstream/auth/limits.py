"""In-process rate limiting: a token bucket per key.

Per process, like the stream cap: with ``serve --workers N`` the effective limit is N times the
setting (documented in ``docs/security.md``). Good enough to stop a runaway script or a password
guesser; a shared limiter (Redis) would be the next step if it ever is not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class RateLimiter:
    """``rate`` events per ``per`` seconds per key, bursting up to ``rate``.

    ``hit(key)`` takes one token and returns 0.0, or returns the seconds to wait (not taking one);
    ``hit(key, cost=n)`` takes ``n`` at once (a bulk action). A cost above ``rate`` never fits:
    callers refuse such a request outright.
    """

    def __init__(
        self, rate: int, per: float, *, max_keys: int = 50_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        if rate < 1 or per <= 0:
            raise ValueError("rate must be >= 1 and per > 0")
        self.rate = rate
        self.per = per
        self._fill = rate / per
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def hit(self, key: str, cost: float = 1.0) -> float:
        now = self._clock()
        tokens, last = self._buckets.get(key, (float(self.rate), now))
        tokens = min(float(self.rate), tokens + (now - last) * self._fill)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            return (cost - tokens) / self._fill
        if key not in self._buckets and len(self._buckets) >= self._max_keys:
            self._prune(now)
        self._buckets[key] = (tokens - cost, now)
        return 0.0

    def _prune(self, now: float) -> None:
        """Forget full buckets (they behave exactly like unknown keys)."""
        full = [
            k
            for k, (t, last) in self._buckets.items()
            if t + (now - last) * self._fill >= self.rate
        ]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self._max_keys:  # still full: drop the oldest half
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k][1])
            for key in oldest[: len(oldest) // 2]:
                del self._buckets[key]


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
