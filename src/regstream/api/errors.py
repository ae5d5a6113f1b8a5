"""One place that turns exceptions into HTTP answers.

* invalid input → 422 ``VALIDATION_ERROR`` naming each bad field (never echoing its value);
* ``HTTPException`` → its status with ``{error, message}``;
* the database unreachable, timing out or cut off → 503 ``UNAVAILABLE`` with ``Retry-After``,
  logged once per outage (``DatabaseOutage``), not a traceback per request;
* anything else → 500 ``INTERNAL_ERROR`` with a request id; the traceback goes to the log only
  (like Starlette's ``ServerErrorMiddleware``), never to the client.
"""

from __future__ import annotations

import html
import logging
import random
import time
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from regstream.auth.limits import retry_after
from regstream.db.engine import unavailable as database_unavailable

log = logging.getLogger(__name__)

_CODES = {
    400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "FORBIDDEN", 404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED", 409: "CONFLICT", 413: "PAYLOAD_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE",
    422: "VALIDATION_ERROR", 429: "TOO_MANY_REQUESTS", 503: "UNAVAILABLE",
}  # fmt: skip


def request_id(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = uuid.uuid4().hex[:16]
        request.state.request_id = rid
    return str(rid)


def error_response(
    request: Request, status: int, message: str, *, code: str | None = None,
    headers: dict[str, str] | None = None, **extra: Any,
) -> JSONResponse:  # fmt: skip
    body: dict[str, Any] = {
        "error": code or _CODES.get(status, "ERROR"),
        "message": message,
        "requestId": request_id(request),
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, headers=headers)


def too_many_requests(message: str, wait: float) -> HTTPException:
    """What a request over a rate limit gets, to ``raise``: 429 with ``{error, message}`` and
    ``Retry-After`` (``wait`` seconds rounded up, at least 1; ``wait`` as ``RateLimit.hit``
    returns it). Every limit of the API answers through here."""
    return HTTPException(429, message, {"Retry-After": retry_after(wait)})


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "cookie")]
    return ".".join(parts) or "body"


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    fields = []
    for err in exc.errors():
        msg = str(err.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        fields.append({"field": _field_name(tuple(err.get("loc", ()))), "message": msg})
    names = ", ".join(sorted({f["field"] for f in fields}))
    return error_response(request, 422, f"invalid input: {names}", fields=fields)


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else _CODES.get(exc.status_code, "error")
    headers = getattr(exc, "headers", None)
    if not request.url.path.startswith("/api/") and "text/html" in request.headers.get(
        "accept", ""
    ):
        # A page, opened by a person: a readable page, not JSON.
        page = (
            "<!doctype html><html lang=en><meta charset=utf-8><title>regstream</title>"
            f"<main><h1>{exc.status_code}</h1><p id=page-error>{html.escape(message)}</p>"
            "<p><a href=/registrations>Registrations</a> · <a href=/login>Sign in</a></p></main>"
        )
        return HTMLResponse(page, status_code=exc.status_code, headers=headers)
    return error_response(request, exc.status_code, message, headers=headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    rid = request_id(request)
    # Type and place only: exception texts from drivers can quote personal data.
    log.error("request %s failed with %s", rid, type(exc).__name__, exc_info=False)
    return error_response(request, 500, "internal error; quote the request id to support")


class DatabaseOutage:
    """One log line when requests start failing on the database, one when it answers again.

    ``recovered`` is called by readiness when its ping succeeds; without a prober, a failure
    30 s after the last one counts as a new outage (logged again)."""

    NEW_OUTAGE_AFTER = 30.0

    def __init__(self) -> None:
        self.since: float | None = None
        self.last = 0.0
        self.refused = 0

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.since is not None and now - self.last > self.NEW_OUTAGE_AFTER:
            self.since = None
        self.refused = self.refused + 1 if self.since is not None else 1
        self.last = now
        if self.since is None:
            self.since = now
            log.warning(
                "database unavailable (%s); answering 503 until it is back", type(exc).__name__
            )

    def recovered(self) -> None:
        if self.since is not None:
            log.warning(
                "database reachable again after %.1f s; %d requests were answered 503",
                time.monotonic() - self.since, self.refused,
            )  # fmt: skip
            self.since = None


#: this process's outage state (readiness calls ``recovered`` when its ping succeeds)
DATABASE_OUTAGE = DatabaseOutage()


def database_retry_after() -> str:
    """Seconds to wait, jittered so refused clients do not all come back in the same second."""
    return str(random.randint(2, 6))


async def _database(request: Request, exc: Exception) -> Response:
    if not database_unavailable(exc):
        return await _unexpected(request, exc)
    DATABASE_OUTAGE.failed(exc)
    return error_response(
        request, 503, "the database is unavailable; retry later",
        headers={"Retry-After": database_retry_after()},
    )  # fmt: skip


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    # Specific classes are answered by Starlette's ExceptionMiddleware; the ``Exception`` handler
    # runs in ServerErrorMiddleware, which logs a traceback and re-raises after answering.
    app.add_exception_handler(SQLAlchemyError, _database)
    app.add_exception_handler(OSError, _database)
    app.add_exception_handler(Exception, _unexpected)
