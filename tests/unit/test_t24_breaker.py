"""The T24 client's circuit breaker (regstream.core_banking.breaker)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from regstream.core_banking.breaker import BreakerState, CircuitBreaker
from regstream.core_banking.errors import CircuitOpen


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _gauge() -> float | None:
    return REGISTRY.get_sample_value("regstream_t24_breaker_open")


def _state(breaker: CircuitBreaker) -> BreakerState:
    # A function call, so mypy does not narrow the property across assertions.
    return breaker.state


def _open(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.threshold):
        assert breaker.before_call() is False
        breaker.record_failure()


def test_opens_after_threshold_consecutive_failures() -> None:
    breaker = CircuitBreaker(threshold=3, reset_after=30, clock=FakeClock())
    for _ in range(2):
        breaker.before_call()
        breaker.record_failure()
    assert _state(breaker) is BreakerState.CLOSED
    breaker.before_call()
    breaker.record_failure()
    assert _state(breaker) is BreakerState.OPEN
    assert _gauge() == 1.0
    with pytest.raises(CircuitOpen):
        breaker.before_call()


def test_success_resets_the_count() -> None:
    breaker = CircuitBreaker(threshold=2, reset_after=30, clock=FakeClock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert _state(breaker) is BreakerState.CLOSED


def test_half_open_admits_one_probe_and_success_closes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, reset_after=30, clock=clock)
    _open(breaker)
    clock.now += 29.9
    assert _state(breaker) is BreakerState.OPEN
    clock.now += 0.1
    assert _state(breaker) is BreakerState.HALF_OPEN
    assert breaker.before_call() is True
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # a second caller while the probe is in flight
    breaker.record_success()
    assert _state(breaker) is BreakerState.CLOSED
    assert _gauge() == 0.0
    assert breaker.before_call() is False


def test_failed_probe_reopens_for_a_full_period() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=2, reset_after=10, clock=clock)
    _open(breaker)
    clock.now += 10
    assert breaker.before_call() is True
    breaker.record_failure()
    assert _state(breaker) is BreakerState.OPEN
    clock.now += 9.9
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    clock.now += 0.1
    assert breaker.before_call() is True


def test_abandoned_probe_frees_the_slot() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, reset_after=5, clock=clock)
    _open(breaker)
    clock.now += 5
    assert breaker.before_call() is True
    breaker.release_probe()  # cancelled without an outcome
    assert breaker.before_call() is True


def test_late_failure_of_a_call_started_before_opening_keeps_the_open_period() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, reset_after=10, clock=clock)
    _open(breaker)
    clock.now += 5
    breaker.record_failure()
    clock.now += 5
    assert _state(breaker) is BreakerState.HALF_OPEN


@pytest.mark.parametrize(
    ("threshold", "reset_after"),
    [pytest.param(0, 1.0, id="threshold"), pytest.param(1, 0.0, id="reset-after")],
)
def test_rejects_bad_arguments(threshold: int, reset_after: float) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(threshold=threshold, reset_after=reset_after)
