"""REGSTREAM_LOG_JSON lines from a real validation: the T24 call's telemetry fields (operation,
HTTP status, correlation id …) arrive as JSON fields (issue 17: the old formatter dropped every
``extra=`` field), with the redaction filter applied."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from regstream.core_banking.simulator.dataset import DEMO_APPLICANTS
from regstream.logs import JsonFormatter, RedactingFilter
from tests.conftest import SettingsFactory
from tests.support import LiveServer, StreamClient, auth_headers, demo_payload, serve_app


class _JsonLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)  # the loggers' levels decide
        self.addFilter(RedactingFilter())
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def json_lines() -> Iterator[_JsonLines]:
    handler = _JsonLines()
    root = logging.getLogger()
    level = root.level
    # a successful T24 attempt is a DEBUG line: enabled for the client's logger only
    t24 = logging.getLogger("regstream.core_banking.client")
    t24_level = t24.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    t24.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        t24.setLevel(t24_level)


@pytest.fixture
def json_live(make_settings: SettingsFactory, json_lines: _JsonLines) -> Iterator[LiveServer]:
    with serve_app(make_settings()) as server:
        yield server


async def test_a_t24_call_is_one_json_line_with_its_fields(
    json_live: LiveServer, json_lines: _JsonLines
) -> None:
    live = json_live
    applicant = next(a for a in DEMO_APPLICANTS if a.expected_status == "APPROVED")
    headers = auth_headers(live, "operator")
    async with httpx.AsyncClient(base_url=live.url, headers=headers) as client:
        rid = (await client.post("/api/registrations", json=demo_payload(applicant))).json()["id"]
        async with StreamClient(live.url, registration_id=rid, headers=headers) as stream:
            assert (await client.post(f"/api/registrations/{rid}/process")).status_code == 202
            final = await stream.wait_final(rid, 20)
    assert final["status"] == "APPROVED"
    records = [json.loads(line) for line in json_lines.lines]
    calls = [r for r in records if "t24_operation" in r]
    assert calls, [r.get("message") for r in records]
    call = calls[0]
    assert call["http_status"] == 200
    assert call["outcome"] and call["correlation_id"] and call["duration_ms"] >= 0
    assert call["ts"].endswith("Z") and len(call["ts"]) == len("2026-01-01T00:00:00.000Z")
    text = "\n".join(json_lines.lines)
    for value in (applicant.national_id, applicant.phone, applicant.email):
        assert value not in text
