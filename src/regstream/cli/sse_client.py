"""The CLI's stream reader: httpx-sse, reconnecting as a browser's EventSource does.

``follow`` yields every JSON ``data:`` frame of the stream. When the stream ends or the
connection drops (a rolling restart closes streams with a ``retry:`` hint; a proxy may cut an
idle one), it waits the last ``retry:`` the server sent and reconnects with ``Last-Event-ID``,
so the service replays what was missed (or sends a snapshot). An answer the client cannot fix by
waiting (401, 403, 404, 422) ends it with ``StreamRefused``; 429/503 are waited out
(``Retry-After``). ``max_failures`` consecutive failed attempts end it with the last error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from httpx_sse import connect_sse

#: a server's ``retry:`` hint is honoured within these bounds (ms)
_RETRY_BOUNDS = (100, 60_000)


class StreamRefused(Exception):
    """The service answered the stream request with an error a retry cannot fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"stream answered {status}: {message}")
        self.status = status


def follow(
    client: httpx.Client,
    url: str,
    *,
    retry_ms: int = 3000,
    max_failures: int = 5,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[dict[str, Any]]:
    """Yield the stream's JSON frames, across reconnects, until the caller stops."""
    last_event_id: str | None = None
    failures = 0
    while True:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        wait_s: float | None = None
        try:
            with connect_sse(client, "GET", url, headers=headers) as source:
                response = source.response
                if response.status_code in (429, 503):
                    wait_s = _retry_after(response, retry_ms)
                elif response.status_code != 200:
                    response.read()
                    raise StreamRefused(response.status_code, _message(response))
                else:
                    for event in source.iter_sse():
                        failures = 0
                        if event.retry is not None:
                            retry_ms = min(max(event.retry, _RETRY_BOUNDS[0]), _RETRY_BOUNDS[1])
                        if event.id:
                            last_event_id = event.id
                        if not event.data:
                            continue
                        try:
                            frame = json.loads(event.data)
                        except json.JSONDecodeError:
                            continue
                        if isinstance(frame, dict):
                            yield frame
        except httpx.TransportError:
            failures += 1
            if failures >= max_failures:
                raise
        if wait_s is not None:
            failures += 1
            if failures >= max_failures:
                raise StreamRefused(503, "the service stayed busy")
        sleep(wait_s if wait_s is not None else retry_ms / 1000)


def _retry_after(response: httpx.Response, retry_ms: int) -> float:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else retry_ms / 1000


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("message", body)) if isinstance(body, dict) else str(body)[:200]
