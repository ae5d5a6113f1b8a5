"""The core-banking seam (``CoreBanking``) and its Temenos Transact REST implementation.

``T24Client`` speaks IRIS REST over one shared ``httpx.AsyncClient``::

    client = T24Client(T24ClientConfig(base_url="http://127.0.0.1:8700/api/v1.0.0"))
    customer = await client.get_customer("100100")
    accounts = await client.list_accounts("100100")
    await client.aclose()

Decisions:

- Every public call has a *deadline* (``T24ClientConfig.deadline``) covering all attempts,
  back-off sleeps and pages; when it expires mid-request the call raises ``CoreTimeout``. A
  retry is only started when its back-off sleep (or ``Retry-After``) ends at least
  ``_MIN_ATTEMPT_BUDGET`` seconds before the deadline; otherwise the last error is raised,
  which is how a long ``Retry-After`` becomes ``CoreMaintenance`` straight away.
- Retries use ``tenacity`` with exponential back-off and full jitter (AWS builders' library);
  which answers are retried is decided by ``_wire.is_transient``.
- The circuit breaker counts *HTTP attempts*, not calls: ``breaker_threshold`` failed
  attempts in a row (timeouts, connection errors, 5xx; an expired deadline counts too) open
  it. When it rejects a retry (not the first attempt) the error that caused the retry is
  raised rather than ``CircuitOpen``, so a COB stays ``CORE_MAINTENANCE``.
- One log line and one latency observation per HTTP attempt: operation, attempt, HTTP
  status, T24 error code, outcome, duration and the correlation id. The customer id is masked
  (``****31``); bodies and headers are never logged. ``httpx``'s own INFO line carries the URL
  (and so the customer id): a filter on the ``httpx`` logger drops those lines for this
  client's base URL while the client is open.
- A customer id outside ``[A-Za-z0-9_-]{1,32}`` raises ``CoreRequestError`` without a request.
- The correlation id is a fresh UUID per public call, sent as ``X-Correlation-ID`` on every
  attempt and page of that call, so the core's logs and ours can be joined.
- Paging: ``page_start`` is the 1-based page number (IRIS semantics); ``page_token`` from the
  first answer is sent back on the following pages until ``total_size`` rows were read. An
  answer without ``total_size`` is a single page. More than ``max_pages`` pages, or an empty
  page before ``total_size`` rows, is ``CoreProtocolError``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import quote

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from regstream.core_banking import _wire
from regstream.core_banking._telemetry import (
    CallContext,
    DropRequestLines,
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
    auth is used when both ``username`` and ``password`` are set. ``timeout`` is the read and
    write timeout of one HTTP attempt (connect and pool: 2 s); ``deadline`` bounds a whole
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

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
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
        transport: httpx.AsyncBaseTransport | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.config = config
        self._base = config.base_url.rstrip("/")
        auth = (
            httpx.BasicAuth(config.username, config.password)
            if config.username is not None and config.password is not None
            else None
        )
        self._http = httpx.AsyncClient(
            auth=auth,
            headers={"Accept": "application/json", "companyId": config.company_id},
            timeout=httpx.Timeout(connect=2.0, read=config.timeout, write=config.timeout, pool=2.0),
            transport=transport,
            follow_redirects=False,
        )
        self.breaker = breaker or CircuitBreaker(
            threshold=config.breaker_threshold, reset_after=config.breaker_reset
        )
        self._backoff = wait_random_exponential(
            multiplier=config.backoff_initial, max=config.backoff_max
        )
        self._log_filter = DropRequestLines(self._base)
        logging.getLogger("httpx").addFilter(self._log_filter)

    async def __aenter__(self) -> T24Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        logging.getLogger("httpx").removeFilter(self._log_filter)
        await self._http.aclose()

    # --- public calls ----------------------------------------------------------------------

    async def get_customer(self, customer_id: str) -> CoreCustomer:
        """The customer record; ``CustomerNotFound`` when the core has none."""
        call = self._start(GET_CUSTOMER, customer_id)
        url = f"{self._base}/party/customers/{quote(customer_id, safe='')}"
        try:
            async with asyncio.timeout_at(call.deadline_at):
                envelope = await self._fetch(call, url, {})
        except TimeoutError as exc:
            raise self._deadline_exceeded(call) from exc
        if envelope is None:  # "No records were found"
            raise CustomerNotFound(http_status=None, t24_code=None)
        return _wire.parse_customer(envelope.document["body"], customer_id)

    async def list_accounts(self, customer_id: str) -> list[CoreAccount]:
        """Every account (arrangement) of the customer, across all pages."""
        call = self._start(LIST_ACCOUNTS, customer_id)
        url = f"{self._base}/party/customers/{quote(customer_id, safe='')}/arrangements"
        try:
            async with asyncio.timeout_at(call.deadline_at):
                return await self._read_pages(call, url)
        except TimeoutError as exc:
            raise self._deadline_exceeded(call) from exc

    # --- paging, retries, one attempt ------------------------------------------------------

    async def _read_pages(self, call: CallContext, url: str) -> list[CoreAccount]:
        accounts: list[CoreAccount] = []
        params: dict[str, str | int] = {"page_size": self.config.page_size}
        rows_read = 0
        for page in range(1, self.config.max_pages + 1):
            params["page_start"] = call.page = page
            envelope = await self._fetch(call, url, params)
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
        self, call: CallContext, url: str, params: dict[str, str | int]
    ) -> _wire.Envelope | None:
        """One request with retries; ``None`` means "No records were found"."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(_wire.should_retry),
            wait=self._wait,
            stop=lambda state: self._should_stop(call, state),
            reraise=True,
        )
        call.attempt = 0
        call.last_error = None
        try:
            return await retrying(self._attempt, call, url, dict(params))
        except CircuitOpen:
            # The breaker opened during our retries: report what made us retry.
            last = call.last_error
            if last is not None:
                raise last from last.__cause__
            raise

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

    async def _attempt(
        self, call: CallContext, url: str, params: dict[str, str | int]
    ) -> _wire.Envelope | None:
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
                response = await self._http.get(
                    url, params=params, headers={"X-Correlation-ID": call.correlation_id}
                )
            except httpx.HTTPError as exc:
                raise _wire.map_transport_error(exc) from exc
            status = response.status_code
            result = _wire.interpret(response)
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
            correlation_id=uuid.uuid4().hex,
            deadline_at=asyncio.get_running_loop().time() + self.config.deadline,
        )

    def _deadline_exceeded(self, call: CallContext) -> CoreTimeout:
        exc = CoreTimeout("Core banking did not answer within the call deadline")
        self.breaker.record_failure()
        observe(call, None, exc)
        return exc
