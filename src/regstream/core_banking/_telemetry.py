"""Telemetry of T24 calls: the per-call context, one log line and metrics per HTTP attempt.

What a line carries (DOMAIN.md section 6): operation, page, attempt, HTTP status, T24 error
code, outcome, duration, correlation id and the *masked* customer id. Never a body, a header
or a T24 error message. Metric labels are low-cardinality: ``outcome`` is ``ok``,
``circuit_open`` or the lower-cased error code; ``code`` is the ``ErrorCode`` value or
``CIRCUIT_OPEN``. A call rejected by the breaker adds no latency observation.

Levels (issue 17, the client's CPU per call): a failed attempt, and so every retry, and a
breaker rejection are WARNING; a successful attempt is DEBUG, because at INFO its line was
~15 % of the client's CPU per call (``bench/t24_http_bench.py``) and said nothing the metrics
do not: ``regstream_t24_call_seconds{outcome="ok"}`` counts every attempt, successes
included. With DEBUG off for the ``regstream.core_banking.client`` logger a success builds
no line, no ``extra`` dict and formats nothing. Success lines come back with DEBUG for that
logger alone: ``REGSTREAM_LOG_LEVELS=regstream.core_banking.client=DEBUG`` (``logs.configure``),
or ``logging.getLogger("regstream.core_banking.client").setLevel(logging.DEBUG)`` in code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from regstream.core_banking.errors import CircuitOpen, CoreBankingError, CoreTlsError
from regstream.metrics import T24_CALL_LATENCY, T24_ERRORS

__all__ = ["CallContext", "mask_customer_id", "observe"]

# Named after the client: operators filter on the module that makes the calls.
logger = logging.getLogger("regstream.core_banking.client")


def mask_customer_id(customer_id: str) -> str:
    """``"100231"`` -> ``"****31"``: enough to tell log lines apart, not to identify anyone."""
    return "****" + customer_id[-2:] if len(customer_id) > 2 else "****"


@dataclass(slots=True)
class CallContext:
    """State of one public call across its attempts and pages."""

    operation: str
    masked_id: str
    correlation_id: str
    deadline_at: float  # event-loop time
    page: int | None = None
    attempt: int = 0
    last_error: CoreBankingError | None = None
    backoff: float = 0.0  # seconds to sleep before the next attempt (tenacity's decision)
    attempt_started: float = field(default_factory=time.perf_counter)


def observe(call: CallContext, status: int | None, exc: CoreBankingError | None) -> None:
    """One log line and the metrics for one HTTP attempt (or a call that never got one)."""
    duration = time.perf_counter() - call.attempt_started
    if exc is None:  # the common case: a metric, and a line only at DEBUG
        _latency(call.operation, "ok").observe(duration)
        if logger.isEnabledFor(logging.DEBUG):
            _log(logging.DEBUG, call, status, None, "ok", duration)
        return
    if isinstance(exc, CircuitOpen):
        outcome, duration, code = "circuit_open", 0.0, "CIRCUIT_OPEN"
    else:
        outcome, code = exc.code.value.lower(), exc.code.value
        _latency(call.operation, outcome).observe(duration)
    _errors(call.operation, code).inc()
    if logger.isEnabledFor(logging.WARNING):
        _log(logging.WARNING, call, status, exc, outcome, duration)


def _log(
    level: int,
    call: CallContext,
    status: int | None,
    exc: CoreBankingError | None,
    outcome: str,
    duration: float,
) -> None:
    t24_code = exc.t24_code if exc is not None else None
    duration_ms = round(duration * 1000, 1)  # as printed: no long digit runs in the record
    # a TLS failure says which one (an operator's first question); nothing else adds to the line
    tls_detail = exc.detail if isinstance(exc, CoreTlsError) else None
    extra: dict[str, object] = {
        "t24_operation": call.operation,
        "t24_page": call.page,
        "t24_attempt": call.attempt,
        "http_status": status,
        "t24_code": t24_code,
        "outcome": outcome,
        "duration_ms": duration_ms,
        "correlation_id": call.correlation_id,
    }
    if isinstance(exc, CoreTlsError):
        extra["tls_error"] = tls_detail
    # Formatted here, once (the level is enabled): the redaction filter reads the message
    # anyway, and a record without arguments spares it a second formatting.
    logger.log(
        level,
        f"t24 {call.operation} page={call.page or '-'} attempt={call.attempt} "
        f"status={status if status is not None else '-'} t24_code={t24_code or '-'} "
        f"outcome={outcome} duration_ms={duration_ms:.1f} correlation_id={call.correlation_id} "
        f"customer={call.masked_id}{f' tls={tls_detail}' if tls_detail else ''}",
        extra=extra,
    )


# Labelled metric children by label values: ``labels()`` takes a lock and builds a key per call.
_LATENCY: dict[tuple[str, str], Histogram] = {}
_ERRORS: dict[tuple[str, str], Counter] = {}


def _latency(operation: str, outcome: str) -> Histogram:
    child = _LATENCY.get((operation, outcome))
    if child is None:
        child = _LATENCY[operation, outcome] = T24_CALL_LATENCY.labels(operation, outcome)
    return child


def _errors(operation: str, code: str) -> Counter:
    child = _ERRORS.get((operation, code))
    if child is None:
        child = _ERRORS[operation, code] = T24_ERRORS.labels(operation, code)
    return child
