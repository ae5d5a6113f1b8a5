"""Pure ASGI middleware for the FastAPI part of the app (the stream path bypasses all of it).

* ``BodySizeLimit``: a declared ``Content-Length`` over the limit is answered 413 before the body
  is read; a chunked body is counted as it arrives: past the limit, reading it raises a 413
  ``HTTPException`` (answered by the app's error handler), and whatever the app answers instead
  is replaced by 413.
* ``CrossSiteGuard``: an unsafe request (POST/PUT/PATCH/DELETE) that the browser marks as coming
  from another site (``Sec-Fetch-Site``/``Origin``, see ``http.cross_site``) is refused with 403
  before routing: the first of our two CSRF defences (the second is the per-session token).
* ``SecurityHeaders``: ``nosniff``, no framing, no referrer to other origins (a stream ticket in
  a URL must not leak through ``Referer``), ``no-store`` on API answers.

None of them buffers a response body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.exceptions import HTTPException

from regstream.auth import http
from regstream.config import Settings

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _answer(send: Send, status: int, code: str, message: str) -> None:
    body = orjson.dumps({"error": code, "message": message})
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = http.header(scope, "content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _answer(send, 400, "BAD_REQUEST", "invalid Content-Length")
                return
            if int(declared) > self.max_bytes:
                await _answer(send, 413, "PAYLOAD_TOO_LARGE",
                              f"request body over {self.max_bytes} bytes")  # fmt: skip
                return
        seen = 0
        too_large = False
        replaced = False

        async def counting_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = True
                    # raised into whatever reads the body (FastAPI's parser, ``request.body()``
                    # in a route): the app's error handler answers it. A disconnect instead was
                    # a ``ClientDisconnect`` in routes that read the body themselves: a 500.
                    raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal replaced
            if too_large:
                if message["type"] == "http.response.start" and not replaced:
                    replaced = True
                    await _answer(send, 413, "PAYLOAD_TOO_LARGE",
                                  f"request body over {self.max_bytes} bytes")  # fmt: skip
                return
            await send(message)

        await self.app(scope, counting_receive, guarded_send)


class CrossSiteGuard:
    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] in http.UNSAFE_METHODS
            and http.cross_site(scope, self.settings)
        ):
            await _answer(send, 403, "CSRF_FAILED", "cross-site request refused")
            return
        await self.app(scope, receive, send)


_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


def security_headers(
    path: str, headers: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """``headers`` (a response head's) with the security headers it lacks added. Also used by
    the stream path (``api/stream.py``), which is served outside this middleware."""
    present = {k.lower() for k, _ in headers}
    extra = [(k, v) for k, v in _HEADERS if k not in present]
    if path.startswith("/api/") and b"cache-control" not in present:
        extra.append((b"cache-control", b"no-store"))
    return [*headers, *extra]


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = security_headers(path, list(message.get("headers", [])))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
