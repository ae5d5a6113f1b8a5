"""A small HTTP/1.1 client for one origin: keep-alive GETs, answers parsed by llhttp.

``T24Client`` sends two or three GETs per validation to one host. Through
``aiohttp.ClientSession`` a GET cost ~350 µs of event-loop CPU on the bench machine (uvloop,
32 in flight) and the T24 calls were a third of the validation pipeline's CPU (py-spy, bulk
validation on PostgreSQL); this client does the same GET in ~180 µs, JSON decode included
(``bench/t24_http_bench.py``). It is written by hand because it is on the hot path and the
numbers say so; it stays small by doing only what the core-banking link needs:

- ``GET`` only (idempotent), to the origin of ``base_url`` (``http`` or ``https``), no proxies,
  no redirects (a 3xx is an answer like any other), no cookies;
- answers parsed by ``httptools`` (Node's llhttp: Content-Length, chunked, read-to-close,
  keep-alive rules, malformed framing rejected), bodies up to ``max_body`` bytes, ``gzip`` /
  ``deflate`` decoded (we ask for ``identity``; a gateway may compress anyway);
- a pool of keep-alive connections, at most ``max_connections`` requests in flight (more wait
  up to ``pool_timeout``); idle connections are dropped after ``keepalive`` seconds;
- a connection is reused only after a complete answer that allows it; anything else (error,
  timeout, cancellation) closes it, so an unread answer can never be taken for the next one;
- a kept-alive connection the server closed just as we sent (nothing came back, within
  ``_STALE_WINDOW`` of sending) is retried once on a new connection: safe for a GET, and what
  HTTP clients commonly do; a close after that is an answer (``Disconnected``), not retried here;
- bytes after a complete answer (a wrong ``Content-Length``) drop the connection: they can never
  become the next request's answer; a chunked answer's trailer fields are not headers;
- timeouts: ``connect_timeout`` for TCP (and TLS) set-up, ``read_timeout`` from the request
  sent to the answer complete. Both raise ``TimeoutError`` subclasses.

Errors are this module's ``HttpError`` subclasses (or ``TimeoutError``); the T24 client maps
them to its own exceptions (``_wire.map_transport_error``).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

__all__ = [
    "Answer",
    "ConnectTimeout",
    "ConnectionFailed",
    "Disconnected",
    "HttpClient",
    "HttpError",
    "MalformedAnswer",
    "PoolTimeout",
    "ReadTimeout",
    "SentRequest",
    "UnreadableBody",
    "valid_target",
]


#: A kept-alive connection that ends, with nothing read, this soon after the request was sent was
#: closed by the server while idle (its FIN or RST was in flight): the request is sent once more.
_STALE_WINDOW = 0.25
#: RFC 9110: a request target we send (origin-form, percent-encoded), header names (tokens) and
#: values (visible latin-1 characters, spaces and tabs; no CR, LF or other controls).
_TARGET = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/%?]*")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


class HttpError(Exception):
    """No usable answer came back (the request may or may not have reached the server)."""


class ConnectionFailed(HttpError):
    """The TCP/TLS connection could not be made (refused, unreachable, TLS failure)."""


class Disconnected(HttpError):
    """The connection was closed or reset before the answer was complete."""


class MalformedAnswer(HttpError):
    """The bytes that came back are not a valid HTTP/1.1 answer."""


class UnreadableBody(HttpError):
    """A well-framed answer whose body is bigger than ``max_body`` or does not decode."""


class ConnectTimeout(TimeoutError):
    """No connection within ``connect_timeout``."""


class PoolTimeout(TimeoutError):
    """No free connection slot within ``pool_timeout``."""


class ReadTimeout(TimeoutError):
    """The answer was not complete within ``read_timeout`` of sending the request."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete answer: status, headers (names lower-cased), decoded body."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes


@dataclass(frozen=True, slots=True)
class SentRequest:
    """A request as it is sent, for tests (``on_request``): the URL holds the customer id, so
    it is not for logs; an ``Authorization`` header is shown as ``***``."""

    method: str
    url: str
    headers: Mapping[str, str]


class _Connection(asyncio.Protocol):
    """One TCP connection; at most one request at a time (no pipelining)."""

    __slots__ = (
        "_body", "_body_size", "_headers", "_headers_done", "_parser", "_waiter", "closed",
        "idle_since", "max_body", "received", "sent_at", "transport",
    )  # fmt: skip

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.received = False  # any byte of the current answer
        self.sent_at = 0.0  # time.monotonic() when the current request was written
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Answer] | None = None
        self._headers: dict[str, str] = {}
        self._headers_done = False
        self._body: list[bytes] = []
        self._body_size = 0

    # --- driven by ``HttpClient`` ---

    def send(self, request: bytes, waiter: asyncio.Future[Answer]) -> None:
        self.received = False
        self.sent_at = time.monotonic()
        if self.closed or self.transport is None or self.transport.is_closing():
            raise Disconnected("connection closed before the request was sent")
        self._waiter = waiter
        self._body = []
        self._body_size = 0
        self.transport.write(request)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def expire(self) -> None:
        """The read timeout fired: fail the request, drop the connection."""
        self._fail(ReadTimeout("no complete answer within the read timeout"))
        self.close()

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: the connection is unusable
            self.close()
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(MalformedAnswer("protocol upgrade in an answer"))
            self.close()
        except httptools.HttpParserCallbackError as exc:
            # Raised in one of our callbacks: on purpose after failing the request (_Stop), or a
            # bug, which the caller sees as it is (not as a bad answer to retry).
            cause = exc.__context__
            if not isinstance(cause, _Stop):
                self._fail(cause if isinstance(cause, Exception) else exc)
            self.close()
        except httptools.HttpParserError as exc:
            self._fail(MalformedAnswer(f"malformed HTTP answer: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        # An answer without Content-Length or chunked framing ends when the server closes.
        if exc is None and self._waiter is not None and self._ends_at_close():
            self._complete()
        self._fail(Disconnected("connection closed before the answer was complete"))

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # More bytes after a complete answer (a wrong Content-Length, a confused gateway):
            # they must never become the next request's answer. Drop the connection.
            self.close()
            raise _Stop
        self._headers = {}  # a fresh dict: an answer handed out is never written to again
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:  # a chunked answer's trailer fields: not headers
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.max_body:
            self._fail(UnreadableBody(f"answer body over {self.max_body} bytes"))
            self.close()
            raise _Stop
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (e.g. 100 Continue): the real one follows
            return  # (on_message_begin starts the next one afresh)
        self._complete()

    # --- internals ---

    def _ends_at_close(self) -> bool:
        return (
            self._headers_done
            and self._parser.get_status_code() >= 200
            and "content-length" not in self._headers
            and "chunked" not in self._headers.get("transfer-encoding", "").lower()
        )

    def _complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        body = b"".join(self._body)
        encoding = self._headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            try:
                body = _decode_body(body, encoding, self.max_body)
            except (zlib.error, ValueError) as exc:
                self.close()
                waiter.set_exception(UnreadableBody(f"undecodable body: {exc}"))
                return
        if not self._parser.should_keep_alive():
            self.close()
        waiter.set_result(Answer(self._parser.get_status_code(), self._headers, body))

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class _Stop(Exception):
    """Raised in a parser callback to stop parsing (the request was already failed)."""


def _decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ValueError(f"unsupported content encoding {encoding!r}")
    # wbits 47 reads gzip and zlib headers; a raw deflate stream (some servers) needs -15.
    try:
        decoder = zlib.decompressobj(47)
        out = decoder.decompress(body, limit + 1)
    except zlib.error:
        if encoding != "deflate":
            raise
        decoder = zlib.decompressobj(-15)
        out = decoder.decompress(body, limit + 1)
    if len(out) > limit:
        raise ValueError("decoded body too large")
    if not decoder.eof or decoder.unused_data:
        raise ValueError("truncated or trailing data in a compressed body")
    return out


class HttpClient:
    """Keep-alive GETs to the origin of ``base_url``; see the module docstring."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        max_connections: int = 100,
        connect_timeout: float = 2.0,
        pool_timeout: float = 2.0,
        read_timeout: float = 5.0,
        keepalive: float = 5.0,
        max_body: int = 8 * 1024 * 1024,
        ssl_context: ssl.SSLContext | None = None,
        on_request: Callable[[SentRequest], None] | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be an http:// or https:// URL with a host")
        if "@" in parts.netloc:
            raise ValueError("base_url must not carry credentials (use the Authorization header)")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        host_header = parts.netloc  # host[:port], IPv6 in brackets
        self._origin = f"{parts.scheme}://{host_header}"
        self._ssl = (ssl_context or ssl.create_default_context()) if self._tls else None
        fixed = {"Host": host_header, "User-Agent": "regstream", "Accept-Encoding": "identity"}
        fixed.update(headers)
        for name, value in fixed.items():
            _check_header(name, value)
        self._fixed_headers = fixed
        self._fixed = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in fixed.items())
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: deque[_Connection] = deque()  # oldest first
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout
        self._read_timeout = read_timeout
        self._keepalive = keepalive
        self._max_body = max_body
        self._on_request = on_request
        self._closed = False

    async def get(self, target: str, headers: Mapping[str, str]) -> Answer:
        """GET ``target`` (a path with its query, already percent-encoded) with ``headers``
        added to the fixed ones. Raises ``HttpError`` or ``TimeoutError``."""
        if self._closed:
            raise RuntimeError("HttpClient is closed")
        if not valid_target(target):
            raise ValueError("target must be a percent-encoded absolute path (and query)")
        for name, value in headers.items():
            _check_header(name, value)
        request = (
            b"GET " + target.encode("ascii") + b" HTTP/1.1\r\n" + self._fixed
            + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items())
            + b"\r\n"
        )  # fmt: skip
        if self._slots.locked():
            try:
                async with asyncio.timeout(self._pool_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise PoolTimeout("no free connection within the pool timeout") from None
        else:
            await self._slots.acquire()  # a free slot: returns at once
        try:
            if self._closed:  # closed while this request waited for a slot
                raise RuntimeError("HttpClient is closed")
            self._record(target, headers)
            connection = self._idle_connection()
            if connection is not None:
                try:
                    return await self._exchange(connection, request)
                except Disconnected:
                    # Stale: the server had closed the kept-alive connection as we sent (nothing
                    # came back, at once). Anything else is an answer to report, not to retry.
                    sent_ago = time.monotonic() - connection.sent_at
                    if connection.received or sent_ago > _STALE_WINDOW:
                        raise
                self._record(target, headers)  # once more, on a new connection
            return await self._exchange(await self._connect(), request)
        finally:
            self._slots.release()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close idle connections; requests in flight finish, their connections then close."""
        self._closed = True
        idle, self._idle = self._idle, deque()
        for connection in idle:
            connection.close()

    # --- internals ---

    def _record(self, target: str, headers: Mapping[str, str]) -> None:
        if self._on_request is not None:
            sent = {**self._fixed_headers, **headers}
            if "Authorization" in sent:
                sent["Authorization"] = "***"
            self._on_request(SentRequest("GET", self._origin + target, sent))

    def _idle_connection(self) -> _Connection | None:
        idle = self._idle
        expired = time.monotonic() - self._keepalive
        while idle and idle[0].idle_since <= expired:  # idle too long: the server may drop it
            idle.popleft().close()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely stale
            transport = connection.transport
            if not connection.closed and transport is not None and not transport.is_closing():
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        max_body = self._max_body
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(max_body), self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._tls else None,
                )  # fmt: skip
        except TimeoutError:
            raise ConnectTimeout("no connection within the connect timeout") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionFailed(f"cannot connect: {type(exc).__name__}") from exc
        return connection

    async def _exchange(self, connection: _Connection, request: bytes) -> Answer:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Answer] = loop.create_future()
        timer = loop.call_later(self._read_timeout, connection.expire)
        reusable = False
        try:
            connection.send(request, waiter)
            answer = await waiter
            reusable = not connection.closed
            return answer
        finally:
            timer.cancel()
            if reusable and not self._closed:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
            else:  # error, timeout, cancellation or "Connection: close": never reused
                connection.close()


def valid_target(target: str) -> bool:
    """Whether ``target`` is a request target this client sends: an absolute path (and query),
    percent-encoded, nothing else."""
    return _TARGET.fullmatch(target) is not None


def _check_header(name: str, value: str) -> None:
    if not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
        raise ValueError(f"invalid header {name!r}")
