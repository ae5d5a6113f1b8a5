"""One place that turns exceptions into HTTP answers.

* invalid input → 422 ``VALIDATION_ERROR`` naming each bad field (never echoing its value);
* ``HTTPException`` → its status with ``{error, message}``;
* anything else → 500 ``INTERNAL_ERROR`` with a request id; the traceback goes to the log only
  (like Starlette's ``ServerErrorMiddleware``), never to the client.
"""

from __future__ import annotations

import html
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
