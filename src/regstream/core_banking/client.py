"""The core-banking seam (``CoreBanking``) and its Temenos Transact REST implementation.

``T24Client`` speaks IRIS REST over one pool of keep-alive connections::

    client = T24Client(T24ClientConfig(base_url="http://127.0.0.1:8700/api/v1.0.0"))
    customer = await client.get_customer("100100")
    accounts = await client.list_accounts("100100")
    await client.aclose()

Decisions:

- The transport is ``_http.HttpClient``, a small hand-written HTTP/1.1 client (keep-alive
  GETs to one origin, answers parsed by httptools/llhttp), not a general-purpose library: the
  T24 calls were a third of the validation pipeline's CPU, and a GET cost ~350 µs of
  event-loop CPU through ``aiohttp.ClientSession`` (~2,900 µs through httpx) against ~180 µs
  through ``HttpClient`` (``bench/t24_http_bench.py``). Its module docstring says what it does
  and does not do. ``on_request`` lets tests see each request as it is sent.
- Every public call has a *deadline* (``T24ClientConfig.deadline``) covering all attempts,
  back-off sleeps and pages; when it expires mid-request the call raises ``CoreTimeout``. A
  retry is only started when its back-off sleep (or ``Retry-After``) ends at least
  ``_MIN_ATTEMPT_BUDGET`` seconds before the deadline; otherwise the last error is raised,
  which is how a long ``Retry-After`` becomes ``CoreMaintenance`` straight away.
- Retries use ``tenacity`` with exponential back-off and full jitter (AWS builders' library);
  which answers are retried is decided by ``_wire.is_transient``. The first attempt runs
  without tenacity (its per-request machinery, ~46 µs of CPU, was a few % of the service's CPU,
  and nearly every request ends on the first attempt); a retryable failure hands that outcome
  to tenacity as its attempt 1, so ``max_attempts``, back-off and ``Retry-After`` are unchanged.
- The circuit breaker counts *HTTP attempts*, not calls: ``breaker_threshold`` failed
  attempts in a row (timeouts, connection errors, 5xx; an expired deadline counts too) open
  it. When it rejects a retry (not the first attempt) the error that caused the retry is
  raised rather than ``CircuitOpen``, so a COB stays ``CORE_MAINTENANCE``.
- One log line and one latency observation per HTTP attempt: operation, attempt, HTTP
  status, T24 error code, outcome, duration and the correlation id. The customer id is masked
  (``****31``); bodies and headers are never logged. (The transport logs nothing, so no URL,
  and so no customer id, reaches the logs from it.)
- A customer id outside ``[A-Za-z0-9_-]{1,32}`` raises ``CoreRequestError`` without a request.
- The correlation id is a fresh random 128-bit hex id per public call, sent as
  ``X-Correlation-ID`` on every attempt and page of that call, so the core's logs and ours can be
  joined.
- Paging: ``page_start`` is the 1-based page number (IRIS semantics); ``page_token`` from the
  first answer is sent back on the following pages until ``total_size`` rows were read. An
  answer without ``total_size`` is a single page. More than ``max_pages`` pages, or an empty
  page before ``total_size`` rows, is ``CoreProtocolError``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import quote, urlencode, urlsplit

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from regstream.core_banking import _wire
from regstream.core_banking._http import HttpClient, HttpError, SentRequest, valid_target
from regstream.core_banking._telemetry import (
    CallContext,
    mask_customer_id,
    observe,
)
from regstream.core_banking.breaker import CircuitBreaker
from regstream.core_banking.errors import (
    CircuitOpen,
    CoreBankingError,
    CoreMaintenance,
    CoreProtocolError,
    CoreRequestError,
    CoreTimeout,
    CoreUnavailable,
    CustomerNotFound,
)
from regstream.domain.core_records import CoreAccount, CoreCustomer

__all__ = ["CoreBanking", "T24Client", "T24ClientConfig", "mask_customer_id"]

GET_CUSTOMER = "get_customer"
LIST_ACCOUNTS = "list_accounts"
#: Least time worth starting another attempt with (seconds left after the back-off sleep).
_MIN_ATTEMPT_BUDGET = 0.1
_CUSTOMER_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
#: Exceptions of one attempt that mean "no usable answer" (mapped by ``map_transport_error``).
#: The transport's timeouts are ``TimeoutError`` subclasses; the call deadline is not caught
#: here (``asyncio.timeout_at`` cancels the attempt and raises only where it is entered).
#: A ``ValueError`` from the transport is a request we could not send (our bug).
_TRANSPORT_ERRORS = (HttpError, TimeoutError, ValueError)


@runtime_checkable
class CoreBanking(Protocol):
    """What the pipeline needs from a core-banking system."""

    async def get_customer(self, customer_id: str) -> CoreCustomer: ...

    async def list_accounts(self, customer_id: str) -> list[CoreAccount]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class T24ClientConfig:
    """Connection, resilience and paging settings of ``T24Client``.

    ``base_url`` includes the API prefix, e.g. ``http://127.0.0.1:8700/api/v1.0.0``. Basic
    auth is used when both ``username`` and ``password`` are set. ``timeout`` bounds one HTTP
    attempt from sending the request to the complete answer (connect and waiting for a free
    connection: 2 s each; a kept-alive connection found closed as the request was sent is
    replaced once, see ``_http``); ``deadline`` bounds a whole
    ``get_customer``/``list_accounts`` call including retries and pages.
    """

    base_url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    company_id: str = "GB0010001"
    timeout: float = 5.0
    deadline: float = 15.0
    max_attempts: int = 3
    backoff_initial: float = 0.2
    backoff_max: float = 2.0
    breaker_threshold: int = 5
    breaker_reset: float = 30.0
    page_size: int = 25
    max_pages: int = 50
    max_connections: int = 100  # requests in flight at most; more wait for a free connection

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        parts = urlsplit(self.base_url)
        if "@" in parts.netloc:
            raise ValueError("base_url must not carry credentials: use username and password")
        # (the transport's own check of a request target; urlsplit left no "?" in the path)
        if parts.query or parts.fragment or not valid_target(parts.path or "/"):
            raise ValueError("base_url must be scheme://host[:port]/path, the path URL-encoded")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password must be set together")
        for name in ("timeout", "deadline", "backoff_initial", "backoff_max", "breaker_reset"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_attempts", "breaker_threshold", "page_size", "max_pages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


class T24Client:
    """``CoreBanking`` over Temenos Transact REST (IRIS), with retries and a circuit breaker."""

    def __init__(
        self,
        config: T24ClientConfig,
        *,
        on_request: Callable[[SentRequest], None] | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.config = config
        self._base_path = urlsplit(config.base_url).path.rstrip("/")
        headers = {"Accept": "application/json", "companyId": config.company_id}
        if config.username is not None and config.password is not None:
            # Sent on every request, UTF-8 (RFC 7617's charset), as httpx's BasicAuth did.
            userpass = f"{config.username}:{config.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(userpass).decode("ascii")
        self._http = HttpClient(
            config.base_url,
            headers=headers,
            max_connections=config.max_connections,
            connect_timeout=2.0,
            pool_timeout=2.0,
            read_timeout=config.timeout,
            keepalive=5.0,  # idle connections kept for 5 s, as httpx's default
            on_request=on_request,
        )
        self.breaker = breaker or CircuitBreaker(
            threshold=config.breaker_threshold, reset_after=config.breaker_reset
        )
        self._backoff = wait_random_exponential(
            multiplier=config.backoff_initial, max=config.backoff_max
        )

    async def __aenter__(self) -> T24Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- public calls ----------------------------------------------------------------------

    async def get_customer(self, customer_id: str) -> CoreCustomer:
        """The customer record; ``CustomerNotFound`` when the core has none."""
        call = self._start(GET_CUSTOMER, customer_id)
        path = f"{self._base_path}/party/customers/{quote(customer_id, safe='')}"
        try:
            async with asyncio.timeout_at(call.deadline_at):
                envelope = await self._fetch(call, path, {})
        except TimeoutError as exc:
            raise self._deadline_exceeded(call) from exc
        if envelope is None:  # "No records were found"
            raise CustomerNotFound(http_status=None, t24_code=None)
        return _wire.parse_customer(envelope.document["body"], customer_id)

    async def list_accounts(self, customer_id: str) -> list[CoreAccount]:
        """Every account (arrangement) of the customer, across all pages."""
        call = self._start(LIST_ACCOUNTS, customer_id)
        path = f"{self._base_path}/party/customers/{quote(customer_id, safe='')}/arrangements"
        try:
            async with asyncio.timeout_at(call.deadline_at):
                return await self._read_pages(call, path)
        except TimeoutError as exc:
            raise self._deadline_exceeded(call) from exc

    # --- paging, retries, one attempt ------------------------------------------------------

    async def _read_pages(self, call: CallContext, path: str) -> list[CoreAccount]:
        accounts: list[CoreAccount] = []
        params: dict[str, str | int] = {"page_size": self.config.page_size}
        rows_read = 0
        for page in range(1, self.config.max_pages + 1):
            params["page_start"] = call.page = page
            envelope = await self._fetch(call, path, params)
            if envelope is None:  # "No records were found": nothing (more) to read
                return accounts
            page_accounts = _wire.parse_accounts(envelope.document["body"])
            accounts.extend(page_accounts)
            rows_read += len(page_accounts)
            total = envelope.header.get("total_size")
            if not isinstance(total, int) or isinstance(total, bool) or rows_read >= total:
                return accounts
            if not page_accounts:
                raise CoreProtocolError("Core banking sent an empty page before the last row")
            token = envelope.header.get("page_token")
            if isinstance(token, str) and token:
                params["page_token"] = token
        raise CoreProtocolError("Core banking paging exceeded the page limit")

    async def _fetch(
        self, call: CallContext, path: str, params: dict[str, str | int]
    ) -> _wire.Envelope | None:
        """One request with retries; ``None`` means "No records were found"."""
        call.attempt = 0
        call.last_error = None
        target = f"{path}?{urlencode(params, quote_via=quote)}" if params else path
        try:
            # Fast path: nearly every request ends on its first attempt (an answer, or a final
            # error such as "not found"). Building and driving an ``AsyncRetrying`` per request
            # cost ~46 µs of CPU (0.5 µs without it), a few % of the service's CPU, so
            # tenacity only takes over after a retryable failure.
            try:
                return await self._attempt(call, target)
            except CoreBankingError as exc:
                if not _wire.should_retry(exc):
                    raise
                first_error = exc
            return await self._retry(call, target, first_error)
        except CircuitOpen:
            # The breaker opened during our retries: report what made us retry.
            last = call.last_error
            if last is not None:
                raise last from last.__cause__
            raise

    async def _retry(
        self,
        call: CallContext,
        target: str,
        first_error: CoreBankingError,
    ) -> _wire.Envelope | None:
        """Attempts 2.. of a request whose first attempt failed with ``first_error``.

        tenacity's attempt 1 re-raises ``first_error`` instead of sending a request, so its
        stop condition, back-off and ``Retry-After`` see the same attempt numbers and errors as
        when tenacity made the first attempt itself.
        """
        pending: CoreBankingError | None = first_error

        async def attempt() -> _wire.Envelope | None:
            nonlocal pending
            if pending is not None:
                exc, pending = pending, None
                raise exc
            return await self._attempt(call, target)

        retrying = AsyncRetrying(
            retry=retry_if_exception(_wire.should_retry),
            wait=self._wait,
            stop=lambda state: self._should_stop(call, state),
            reraise=True,
        )
        return await retrying(attempt)

    def _wait(self, state: RetryCallState) -> float:
        backoff = float(self._backoff(state))
        exc = state.outcome.exception() if state.outcome is not None else None
        retry_after = exc.retry_after if isinstance(exc, CoreBankingError) else None
        return max(backoff, retry_after) if retry_after is not None else backoff

    def _should_stop(self, call: CallContext, state: RetryCallState) -> bool:
        if state.attempt_number >= self.config.max_attempts:
            return True
        remaining = call.deadline_at - asyncio.get_running_loop().time()
        return state.upcoming_sleep + _MIN_ATTEMPT_BUDGET > remaining

    async def _attempt(self, call: CallContext, target: str) -> _wire.Envelope | None:
        call.attempt += 1
        try:
            is_probe = self.breaker.before_call()
        except CircuitOpen as exc:
            observe(call, None, exc)
            raise
        call.attempt_started = time.perf_counter()
        status: int | None = None
        try:
            try:
                answer = await self._http.get(target, {"X-Correlation-ID": call.correlation_id})
            except _TRANSPORT_ERRORS as exc:
                raise _wire.map_transport_error(exc) from exc
            status = answer.status_code
            result = _wire.interpret(answer)
        except CoreBankingError as exc:
            if isinstance(exc, CoreTimeout | CoreUnavailable | CoreMaintenance):
                self.breaker.record_failure()
            else:
                self.breaker.record_success()
            call.last_error = exc
            observe(call, status, exc)
            raise
        finally:
            if is_probe:
                self.breaker.release_probe()
        self.breaker.record_success()
        call.last_error = None
        observe(call, status, None)
        return result

    # --- bookkeeping -----------------------------------------------------------------------

    def _start(self, operation: str, customer_id: str) -> CallContext:
        if not isinstance(customer_id, str) or not _CUSTOMER_ID.fullmatch(customer_id):
            raise CoreRequestError("Customer id is not a valid core banking id")
        return CallContext(
            operation=operation,
            masked_id=mask_customer_id(customer_id),
            correlation_id=os.urandom(16).hex(),  # as random as uuid4().hex, an eighth the CPU
            deadline_at=asyncio.get_running_loop().time() + self.config.deadline,
        )

    def _deadline_exceeded(self, call: CallContext) -> CoreTimeout:
        exc = CoreTimeout("Core banking did not answer within the call deadline")
        self.breaker.record_failure()
        observe(call, None, exc)
        return exc
