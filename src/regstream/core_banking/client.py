"""The core-banking seam (``CoreBanking``) and its Temenos Transact REST implementation.

``T24Client`` speaks IRIS REST through one ``aiohttp.ClientSession`` (a pool of keep-alive
connections, optionally mutual TLS and an explicit proxy)::

    client = T24Client(T24ClientConfig(base_url="http://127.0.0.1:8700/api/v1.0.0"))
    customer = await client.get_customer("100100")
    accounts = await client.list_accounts("100100")
    await client.aclose()

Decisions:

- The transport is aiohttp (issue 17): proxies, CA bundles and client certificates come with
  it, and a bank's team does not inherit an HTTP client of its own. Not httpx, which the CLI
  uses: its connection pool walks every waiting request against every connection on each
  request, so at the pipeline's 64 requests in flight a GET cost ~3 ms of CPU, against ~0.15 ms
  through aiohttp (``bench/RESULTS.md`` run 14), which would have cut the pipeline's throughput
  by more than half. ``max_connections`` bounds the requests in flight (the service sets it to
  the pipeline concurrency); waiting for a free connection plus connecting is bounded by 4 s
  (connecting alone by 2 s), each read by ``timeout``.
- TLS: one ``ssl.SSLContext`` per client (``tls_context``): the system's CAs, or only
  ``ca_bundle``'s; ``client_cert`` + ``client_key`` (optionally encrypted, ``client_key_password``)
  for mutual TLS. Proxy: ``proxy_url`` only; the standard ``HTTP(S)_PROXY``/``NO_PROXY``
  variables (and ``.netrc``) are read only with ``trust_env=True``, so an environment set up
  for other tools does not silently route customer lookups through a proxy.
- Answers are streamed and reading stops past ``max_body`` bytes (decoded: aiohttp undoes gzip
  and deflate): a runaway gateway cannot fill the memory. Redirects are not followed (a 3xx is
  an answer like any other, ``CORE_BAD_RESPONSE``); no cookies are kept between calls.
- Every public call has a *deadline* (``T24ClientConfig.deadline``) covering all attempts,
  back-off sleeps and pages; when it expires mid-request the call raises ``CoreTimeout``. A
  retry is only started when its back-off sleep (or ``Retry-After``) ends at least
  ``_MIN_ATTEMPT_BUDGET`` seconds before the deadline; otherwise the last error is raised,
  which is how a long ``Retry-After`` becomes ``CoreMaintenance`` straight away.
- Retries: ``tenacity`` drives every attempt, the first included (issue 17: the retry policy
  as designed, no first-attempt bypass), with exponential back-off and full jitter (AWS
  builders' library); which answers are retried is decided by ``_wire.is_transient``
  (timeouts, dropped connections, 502/503/504, 500 ``TGVCP-001``). The client iterates
  tenacity's ``Retrying`` (``for attempt in retrying: with attempt: ...``, its documented
  form): tenacity decides each attempt, the back-off and when to stop; its ``sleep`` hook
  only notes the back-off, which the client then awaits before the next attempt. Not
  ``AsyncRetrying``: it wraps each of its own steps in a coroutine after an
  ``inspect.iscoroutinefunction`` test, every attempt, ~15 µs of CPU per call (half of
  tenacity's cost per call, measured), for hooks that have nothing to await here. No
  ``before``/``after`` hooks (``None``: tenacity skips them). A kept-alive connection the
  core closed as we sent on it is retried by aiohttp itself, once, on a new connection (safe
  for a GET), within the same attempt.
- The circuit breaker counts *HTTP attempts*, not calls: ``breaker_threshold`` failed
  attempts in a row (timeouts, connection errors, 5xx; an expired deadline counts too) open
  it. When it rejects a retry (not the first attempt) the error that caused the retry is
  raised rather than ``CircuitOpen``, so a COB stays ``CORE_MAINTENANCE``. TLS and auth
  failures are configuration problems: not retried, and they do not open the breaker.
- One latency observation and one log line per HTTP attempt: operation, attempt, HTTP
  status, T24 error code, outcome, duration and the correlation id. A failed attempt (every
  retry) and a breaker rejection log at WARNING, a successful attempt at DEBUG (its line was
  ~15 % of the client's CPU per call; the metrics count it all the same: ``_telemetry``). The
  customer id is masked (``****31``); bodies and headers are never logged (aiohttp logs no
  request lines).
- A customer id outside ``[A-Za-z0-9_-]{1,32}`` raises ``CoreRequestError`` without a request.
  Within that set an id needs no percent-encoding: request URLs are assembled from the
  base URL's parsed parts (``yarl.URL.build(..., encoded=True)``), not parsed again per call
  (~4 µs each).
- The correlation id is a fresh random 128-bit hex id per public call, sent as
  ``X-Correlation-ID`` on every attempt and page of that call, so the core's logs and ours can be
  joined.
- Paging: ``page_start`` is the 1-based page number (IRIS semantics); ``page_token`` from the
  first answer is sent back on the following pages until ``total_size`` rows were read. An
  answer without ``total_size`` is a single page. More than ``max_pages`` pages, or an empty
  page before ``total_size`` rows, is ``CoreProtocolError``. Arrangement lists and holdings v4
  lists are both read (``_wire.parse_accounts``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import aiohttp
from tenacity import RetryCallState, Retrying, retry_if_exception, wait_random_exponential
from yarl import URL

from regstream.core_banking import _wire
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

__all__ = [
    "CoreBanking",
    "SentRequest",
    "T24Client",
    "T24ClientConfig",
    "mask_customer_id",
    "tls_context",
]

GET_CUSTOMER = "get_customer"
LIST_ACCOUNTS = "list_accounts"
#: Least time worth starting another attempt with (seconds left after the back-off sleep).
_MIN_ATTEMPT_BUDGET = 0.1
#: Connect (TCP, TLS, proxy tunnel) and wait-for-a-free-connection timeouts (seconds).
_CONNECT_TIMEOUT = 2.0
_POOL_TIMEOUT = 2.0
_CUSTOMER_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
#: RFC 3986 path characters, percent-encoded (no spaces, no non-ASCII, no "?" or "#").
_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
#: What one attempt may raise without an answer (mapped by ``_wire.map_transport_error``):
#: aiohttp's ``ClientError`` tree (its timeouts are ``TimeoutError`` too), ``ssl.SSLError``
#: and ``OSError`` to be safe. The call deadline is not caught here (``asyncio.timeout_at``
#: cancels the attempt and raises only where it is entered).
_TRANSPORT_ERRORS = (
    aiohttp.ClientError,
    TimeoutError,
    ssl.SSLError,
    OSError,
    ValueError,
    _wire.BodyTooLarge,
)


@runtime_checkable
class CoreBanking(Protocol):
    """What the pipeline needs from a core-banking system."""

    async def get_customer(self, customer_id: str) -> CoreCustomer: ...

    async def list_accounts(self, customer_id: str) -> list[CoreAccount]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class T24ClientConfig:
    """Connection, TLS, resilience and paging settings of ``T24Client``.

    ``base_url`` includes the API prefix, e.g. ``http://127.0.0.1:8700/api/v1.0.0``. Basic
    auth is used when both ``username`` and ``password`` are set. ``timeout`` bounds each wait
    for the core (the next bytes of the answer, or sending the request); connecting and waiting
    for a free connection have 2 s each; ``deadline`` bounds a whole
    ``get_customer``/``list_accounts`` call including retries and pages. TLS and proxy fields
    are described in the module docstring (file paths as strings).
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
    max_body: int = 8 * 1024 * 1024  # bytes of one answer (decoded); more is CORE_BAD_RESPONSE
    ca_bundle: str | None = None  # PEM CAs trusted for the core (default: the system's)
    client_cert: str | None = None  # PEM client certificate (chain) for mutual TLS
    client_key: str | None = None  # its PEM private key
    client_key_password: str | None = field(default=None, repr=False)
    proxy_url: str | None = field(default=None, repr=False)  # may carry proxy credentials
    trust_env: bool = False  # read HTTP(S)_PROXY, NO_PROXY, .netrc

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        parts = urlsplit(self.base_url)
        if "@" in parts.netloc:
            raise ValueError("base_url must not carry credentials: use username and password")
        if parts.query or parts.fragment or not _PATH.fullmatch(parts.path or "/"):
            raise ValueError("base_url must be scheme://host[:port]/path, the path URL-encoded")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password must be set together")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key must be set together")
        if self.proxy_url is not None and not self.proxy_url.startswith(("http://", "https://")):
            raise ValueError("proxy_url must start with http:// or https://")
        for name in ("timeout", "deadline", "backoff_initial", "backoff_max", "breaker_reset"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_attempts", "breaker_threshold", "page_size", "max_pages", "max_body"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


def tls_context(config: T24ClientConfig) -> ssl.SSLContext:
    """The client's TLS settings: CAs to trust and, for mutual TLS, our certificate.

    Raises ``OSError``/``ssl.SSLError`` for unreadable files or a key that does not match the
    certificate (or a wrong password); the settings check this at start.
    """
    context = ssl.create_default_context(cafile=config.ca_bundle)
    if config.client_cert is not None:
        # An encrypted key without a password fails here: never OpenSSL's terminal prompt.
        password = config.client_key_password
        context.load_cert_chain(
            config.client_cert, config.client_key, password=password if password else b""
        )
    return context


@dataclass(frozen=True, slots=True)
class SentRequest:
    """A request as it is sent, for tests (``on_request``): the URL holds the customer id, so
    it is not for logs; an ``Authorization`` header is shown as ``***``."""

    method: str
    url: str
    headers: Mapping[str, str]


class _AttemptTrace:
    """Per-attempt context for aiohttp's tracing: whether the attempt opened a new connection
    (to a ``https`` core: a new TLS connection)."""

    __slots__ = ("fresh",)

    def __init__(self) -> None:
        self.fresh = False


async def _connection_created(
    session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceConnectionCreateEndParams
) -> None:
    trace = context.trace_request_ctx
    if isinstance(trace, _AttemptTrace):
        trace.fresh = True


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
        base = URL(config.base_url)  # parsed (and normalised) once; request URLs reuse its parts
        self._scheme = base.scheme
        self._authority = base.raw_authority
        self._customers_path = base.raw_path.rstrip("/") + "/party/customers/"
        self._tls = config.base_url.startswith("https://")
        headers = {
            "Accept": "application/json",
            "User-Agent": "regstream",
            "companyId": config.company_id,
        }
        if config.username is not None and config.password is not None:
            # Sent on every request, UTF-8 (RFC 7617's charset), as aiohttp.BasicAuth would.
            userpass = f"{config.username}:{config.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(userpass).decode("ascii")
        # Tracing costs CPU on every request: only for TLS (new-connection detection) or tests.
        tracing = aiohttp.TraceConfig()
        if self._tls:
            tracing.on_connection_create_end.append(_connection_created)
        if on_request is not None:
            tracing.on_request_start.append(_recorder(on_request))
        traces = [tracing] if self._tls or on_request is not None else []
        self._proxy = URL(config.proxy_url) if config.proxy_url is not None else None
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=config.max_connections,
                limit_per_host=0,
                ssl=tls_context(config),
                keepalive_timeout=5.0,  # below uvicorn's and most gateways' idle close
            ),
            headers=headers,
            # a free connection and connecting: 2 s each; each read from the core: timeout
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=_POOL_TIMEOUT + _CONNECT_TIMEOUT,
                sock_connect=_CONNECT_TIMEOUT,
                sock_read=config.timeout,
            ),
            cookie_jar=aiohttp.DummyCookieJar(),  # calls stay independent
            trust_env=config.trust_env,
            auto_decompress=True,
            trace_configs=traces,
        )
        self.breaker = breaker or CircuitBreaker(
            threshold=config.breaker_threshold, reset_after=config.breaker_reset
        )
        self._backoff = wait_random_exponential(
            multiplier=config.backoff_initial, max=config.backoff_max
        )
        self._retry = retry_if_exception(_wire.should_retry)

    async def __aenter__(self) -> T24Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._session.close()

    # --- public calls ----------------------------------------------------------------------

    async def get_customer(self, customer_id: str) -> CoreCustomer:
        """The customer record; ``CustomerNotFound`` when the core has none."""
        call = self._start(GET_CUSTOMER, customer_id)
        url = self._url(self._customers_path + customer_id)
        try:
            async with asyncio.timeout_at(call.deadline_at):
                envelope = await self._fetch(call, url)
        except TimeoutError as exc:
            raise self._deadline_exceeded(call) from exc
        if envelope is None:  # "No records were found"
            raise CustomerNotFound(http_status=None, t24_code=None)
        return _wire.parse_customer(envelope.document["body"], customer_id)

    async def list_accounts(self, customer_id: str) -> list[CoreAccount]:
        """Every account (arrangement) of the customer, across all pages."""
        call = self._start(LIST_ACCOUNTS, customer_id)
        path = f"{self._customers_path}{customer_id}/arrangements"
        try:
            async with asyncio.timeout_at(call.deadline_at):
                return await self._read_pages(call, path)
        except TimeoutError as exc:
            raise self._deadline_exceeded(call) from exc

    # --- paging, retries, one attempt ------------------------------------------------------

    async def _read_pages(self, call: CallContext, path: str) -> list[CoreAccount]:
        accounts: list[CoreAccount] = []
        page_size = self.config.page_size
        token: str | None = None
        rows_read = 0
        for page in range(1, self.config.max_pages + 1):
            call.page = page
            if token is None:  # numbers only: nothing to encode
                url = self._url(path, f"page_size={page_size}&page_start={page}")
            else:
                query: dict[str, str | int] = {
                    "page_size": page_size,
                    "page_start": page,
                    "page_token": token,
                }
                url = self._url(path).with_query(query)
            envelope = await self._fetch(call, url)
            if envelope is None:  # "No records were found": nothing (more) to read
                return accounts
            body = envelope.document["body"]
            accounts.extend(_wire.parse_accounts(body))
            rows = _wire.page_rows(body)
            rows_read += rows
            total = envelope.header.get("total_size")
            if not isinstance(total, int) or isinstance(total, bool) or rows_read >= total:
                return accounts
            if not rows:
                raise CoreProtocolError("Core banking sent an empty page before the last row")
            sent_token = envelope.header.get("page_token")
            if isinstance(sent_token, str) and sent_token:
                token = sent_token
        raise CoreProtocolError("Core banking paging exceeded the page limit")

    def _url(self, path: str, query: str = "") -> URL:
        """The request URL: the base URL's scheme and authority, ``path`` and ``query`` as they
        are (already encoded)."""
        return URL.build(
            scheme=self._scheme,
            authority=self._authority,
            path=path,
            query_string=query,
            encoded=True,
        )

    async def _fetch(self, call: CallContext, url: URL) -> _wire.Envelope | None:
        """One request with retries; ``None`` means "No records were found"."""
        call.attempt = 0
        call.last_error = None
        call.backoff = 0.0

        def note_backoff(seconds: float) -> None:  # slept below, before the next attempt
            call.backoff = seconds

        # tenacity's synchronous Retrying, iterated (see Retries in the module docstring)
        retrying = Retrying(
            sleep=note_backoff,
            retry=self._retry,
            wait=self._wait,
            stop=lambda state: self._should_stop(call, state),
            # None: tenacity skips the hook (its stubs type it as a callable, not optional)
            before=None,  # type: ignore[arg-type]
            after=None,  # type: ignore[arg-type]
            reraise=True,
        )
        result: _wire.Envelope | None = None
        try:
            for attempt in retrying:
                if call.backoff:
                    await asyncio.sleep(call.backoff)
                    call.backoff = 0.0
                with attempt:
                    result = await self._attempt(call, url)
            return result
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

    async def _attempt(self, call: CallContext, url: URL) -> _wire.Envelope | None:
        call.attempt += 1
        try:
            is_probe = self.breaker.before_call()
        except CircuitOpen as exc:
            observe(call, None, exc)
            raise
        call.attempt_started = time.perf_counter()
        status: int | None = None
        try:
            answer = await self._send(call, url)
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

    async def _send(self, call: CallContext, url: URL) -> _wire.Answer:
        """One HTTP exchange: the answer read up to ``max_body``, or a ``CoreBankingError``."""
        trace = _AttemptTrace()
        try:
            async with self._session.get(
                url,
                headers={"X-Correlation-ID": call.correlation_id},
                allow_redirects=False,
                proxy=self._proxy,
                trace_request_ctx=trace if self._tls else None,
            ) as response:
                content = await _read_capped(response, self.config.max_body)
                return _wire.Answer(response.status, response.headers, content)
        except _TRANSPORT_ERRORS as exc:
            fresh_tls = trace.fresh and self._tls
            raise _wire.map_transport_error(exc, fresh_tls=fresh_tls) from exc

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


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The decoded body; reading stops as soon as it passes ``limit`` bytes."""
    announced = response.headers.get("Content-Length", "")
    if announced.isdigit():
        if int(announced) > limit:
            raise _wire.BodyTooLarge(f"answer body of {announced} bytes")
        if "Content-Encoding" not in response.headers:
            # Not compressed: aiohttp reads exactly the announced length, within the cap. One
            # read, not a chunk iterator (its per-chunk awaits cost ~15 µs per call).
            return await response.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise _wire.BodyTooLarge(f"answer body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _recorder(on_request: Callable[[SentRequest], None]) -> Callable[..., Any]:
    async def record(
        session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceRequestStartParams
    ) -> None:
        headers = {str(name): str(value) for name, value in params.headers.items()}
        for name in list(headers):
            if name.lower() == "authorization":
                headers[name] = "***"
        on_request(SentRequest(params.method, str(params.url), _CaseInsensitive(headers)))

    return record


class _CaseInsensitive(dict[str, str]):
    """Header names looked up in any case (for ``SentRequest.headers``)."""

    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__({name.lower(): value for name, value in headers.items()})

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())
