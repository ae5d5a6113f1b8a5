"""A small circuit breaker for the T24 client (closed -> open -> half-open -> closed).

Why our own class rather than ``circuitbreaker``/``aiobreaker``: we need exactly three
transitions, a single half-open probe shared by concurrent callers, an injectable clock for
tests and a Prometheus gauge; the libraries add decorators, listeners and global state that
we would have to work around. One event loop drives it, so no lock is needed: no method
awaits.

- *closed*: calls pass; ``threshold`` consecutive failures (timeouts, connection errors,
  5xx) open the breaker. Any other answer (200, 404, 401, ...) resets the count: the core is
  answering.
- *open*: ``before_call`` raises ``CircuitOpen`` until ``reset_after`` seconds have passed.
- *half-open*: exactly one caller gets through as a probe; others get ``CircuitOpen``. The
  probe's success closes the breaker, its failure re-opens it for another ``reset_after``.
  A probe abandoned without an outcome (cancelled) frees the slot for the next caller.

``regstream_t24_breaker_open`` is 1 from opening until a probe succeeds (open or half-open),
0 while closed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

from regstream.core_banking.errors import CircuitOpen
from regstream.metrics import T24_BREAKER_OPEN

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Count consecutive failures and stop calling the core while it is down.

    Usage::

        breaker.before_call()          # raises CircuitOpen while open
        try:
            ...                        # the call
        except Transient:
            breaker.record_failure()
        else:
            breaker.record_success()
    """

    def __init__(
        self,
        *,
        threshold: int = 5,
        reset_after: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        if reset_after <= 0:
            raise ValueError("reset_after must be positive")
        self.threshold = threshold
        self.reset_after = reset_after
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.reset_after:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def before_call(self) -> bool:
        """Admit a call or raise ``CircuitOpen``; return ``True`` when the call is the probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return False
        if state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        raise CircuitOpen()

    def record_success(self) -> None:
        self._failures = 0
        self._probe_in_flight = False
        if self._opened_at is not None:
            self._opened_at = None
            T24_BREAKER_OPEN.set(0)

    def record_failure(self) -> None:
        self._failures += 1
        was_probe = self._probe_in_flight
        self._probe_in_flight = False
        if was_probe or (self._opened_at is None and self._failures >= self.threshold):
            self._opened_at = self._clock()
            T24_BREAKER_OPEN.set(1)

    def release_probe(self) -> None:
        """Forget an abandoned probe (no outcome recorded) so the next caller may probe."""
        self._probe_in_flight = False
