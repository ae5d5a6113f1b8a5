"""A small SSE reader for the CLI (httpx streaming + the event-stream line protocol)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx


def read_events(response: httpx.Response) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """Yield ``(id, data)`` for every event whose data is JSON."""
    event_id: str | None = None
    data: list[str] = []
    for line in response.iter_lines():
        if line == "":
            if data:
                try:
                    yield event_id, json.loads("\n".join(data))
                except json.JSONDecodeError:
                    pass
            event_id, data = None, []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif line.startswith("id:"):
            event_id = line[3:].strip()
