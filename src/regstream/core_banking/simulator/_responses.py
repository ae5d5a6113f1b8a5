"""IRIS-shaped responses of the simulator: success envelopes, paging headers and errors.

Shapes follow DOMAIN.md section 4 and the holdings v4 OpenAPI document (``QueryHeader``,
``QueryHeaderAudit``, ``QueryErrorResponse``): ``{"header": {"status", "audit", paging...},
"body": ...}`` on success, ``{"header": {"status": "failed", "audit"}, "error": {"type",
"code", "message"}}`` on failure. ``type`` is ``BUSINESS`` for 4xx and ``SYSTEM`` for 5xx.
"""

from __future__ import annotations

import time

from starlette.responses import HTMLResponse, JSONResponse, Response

BUSINESS = "BUSINESS"
SYSTEM = "SYSTEM"

RECORD_MISSING = "RECORD MISSING"
NO_RECORDS = "No records were found that matched the selection criteria"
NO_RESPONSE = "No response from Transact"
COB_IN_PROGRESS = "No response from Transact: close of business (COB) in progress"


def audit(started: float, *, version: str | None = None) -> dict[str, object]:
    """``header.audit``; ``T24_time`` is the simulated core time in milliseconds."""
    values: dict[str, object] = {
        "T24_time": int((time.perf_counter() - started) * 1000),
        "requestParse_time": 0.2,
        "responseParse_time": 0.4,
    }
    if version is not None:
        values["versionNumber"] = version
    return values


def success(body: object, started: float, **header: object) -> JSONResponse:
    return JSONResponse(
        {"header": {"status": "success", **header, "audit": audit(started)}, "body": body}
    )


def record(body: object, started: float) -> JSONResponse:
    """One record (``GET .../{id}``): the audit carries the record's version number."""
    return JSONResponse(
        {"header": {"status": "success", "audit": audit(started, version="3")}, "body": body}
    )


def error(
    status: int, code: str, message: str, started: float, *, retry_after: int | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": 'Basic realm="T24"'}
    return JSONResponse(
        {
            "header": {"status": "failed", "audit": audit(started)},
            "error": {
                "type": SYSTEM if status >= 500 else BUSINESS,
                "code": code,
                "message": message,
            },
        },
        status_code=status,
        headers=headers,
    )


def gateway_error(status: int) -> HTMLResponse:
    """What a reverse proxy in front of IRIS answers (HTML, not a T24 envelope)."""
    reason = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}[status]
    return HTMLResponse(
        f"<html><head><title>{status} {reason}</title></head>"
        f"<body><h1>{status} {reason}</h1></body></html>",
        status_code=status,
    )


def garbage() -> HTMLResponse:
    """A 200 that is not JSON (a login page or error page served by mistake)."""
    return HTMLResponse("<html><body><form action='/login'>Sign in</form></body></html>")


def gone() -> Response:
    """Placeholder answer when the client has already disconnected (nobody reads it)."""
    return Response(status_code=503)
