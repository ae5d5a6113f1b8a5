"""PII scan (issue 4, DOMAIN.md section 6): a full run of every demo outcome, and no raw national
id, full phone number, e-mail or date of birth of any demo applicant in any Redis message, any
Redis key, any SSE frame, any processLog entry, the audit trail, or any log line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import date
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
from redis.asyncio import Redis

from regstream.core_banking.simulator.dataset import DEMO_APPLICANTS
from regstream.demo import load_demo
from regstream.logs import RedactingFilter
from tests.conftest import SettingsFactory
from tests.support import LiveServer, StreamClient, auth_headers, in_fresh_loop, serve_app


def _forbidden() -> dict[str, str]:
    """Every raw value we must never see, with a label for the failure message."""
    values: dict[str, str] = {}
    for a in DEMO_APPLICANTS:
        dob = date.fromisoformat(a.date_of_birth)
        values[a.national_id] = f"national id of {a.scenario}"
        values[a.phone] = f"phone of {a.scenario}"
        values[a.phone.lstrip("+")] = f"phone (no +) of {a.scenario}"
        values[a.email] = f"e-mail of {a.scenario}"
        for text in (a.date_of_birth, dob.strftime("%Y%m%d"), dob.strftime("%d/%m/%Y")):
            values[text] = f"date of birth of {a.scenario}"
        for extra in (a.enrolled_email,):
            if extra:
                values[extra] = f"enrolled e-mail of {a.scenario}"
    return values


FORBIDDEN = _forbidden()


def _leaks(where: str, text: str) -> list[str]:
    return [f"{label} in {where}" for value, label in FORBIDDEN.items() if value in text]


class _Capture(logging.Handler):
    """Records log lines as production writes them (``logs.configure``: ``RedactingFilter``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(RedactingFilter())
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def captured_logs() -> Iterator[_Capture]:
    handler = _Capture()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # the production default (REGSTREAM_LOG_LEVEL)
    # and a successful T24 attempt's line too, which operators turn on with
    # REGSTREAM_LOG_LEVELS=regstream.core_banking.client=DEBUG: it is scanned like the rest
    t24 = logging.getLogger("regstream.core_banking.client")
    t24_level = t24.level
    t24.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        t24.setLevel(t24_level)


async def _redis_dump(redis: Redis) -> str:
    """Every key's content, whatever its type."""
    parts: list[str] = []
    async for key in redis.scan_iter(count=500):
        raw_kind: Any = await redis.type(key)
        kind = raw_kind.decode() if isinstance(raw_kind, bytes) else str(raw_kind)
        if kind == "string":
            parts.append(repr(await redis.get(key)))
        elif kind == "stream":
            parts.append(repr(await redis.xrange(key)))
        elif kind == "list":
            parts.append(repr(await redis.lrange(key, 0, -1)))
        elif kind == "hash":
            parts.append(repr(await redis.hgetall(key)))
        elif kind == "set":
            parts.append(repr(await redis.smembers(key)))
        elif kind == "zset":
            parts.append(repr(await redis.zrange(key, 0, -1)))
        parts.append(repr(key))
    return "\n".join(parts)


@pytest.fixture
def pii_live(make_settings: SettingsFactory, captured_logs: _Capture) -> Iterator[LiveServer]:
    with serve_app(make_settings()) as server:
        yield server


@pytest.mark.timeout(120)
async def test_no_raw_personal_data_anywhere_after_every_demo_outcome(
    pii_live: LiveServer, captured_logs: _Capture
) -> None:
    live = pii_live
    rows: list[Any] = _load_demo(live)
    assert len(rows) == len(DEMO_APPLICANTS)
    operator = auth_headers(live, "operator")
    admin = auth_headers(live, "admin")

    redis = Redis.from_url(live.settings.effective_redis_url or "")
    pubsub = redis.pubsub()
    await pubsub.psubscribe("*")
    raw_messages: list[bytes] = []

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "pmessage":
                raw_messages.append(bytes(message["data"]))

    listener = asyncio.create_task(listen())
    filtered = [StreamClient(live.url, registration_id=r.registration_id, headers=operator)
                for r in rows]  # fmt: skip
    try:
        async with StreamClient(live.url, headers=admin) as everything:
            readers = [await s.__aenter__() for s in filtered]
            async with httpx.AsyncClient(base_url=live.url, headers=operator) as client:
                for row in rows:
                    response = await client.post(
                        f"/api/registrations/{row.registration_id}/process"
                    )
                    assert response.status_code == 202, response.text
                finals = {
                    row.registration_id: await everything.wait_final(row.registration_id, 30)
                    for row in rows
                }
                outcomes = {rid: f["status"] for rid, f in finals.items()}
                assert outcomes == {r.registration_id: r.expected_status for r in rows}
                process_logs = []
                for row in rows:
                    detail = (await client.get(f"/api/registrations/{row.registration_id}")).json()
                    process_logs.append(repr(detail["processLog"]))
            for reader in readers:
                await reader.wait_for(_has_final, 10, "final update")
            await asyncio.sleep(0.2)  # the last published messages reach the listener
            stored = await _redis_dump(redis)
            sse = [bytes(everything.raw).decode()] + [bytes(r.raw).decode() for r in readers]
    finally:
        for stream in filtered:
            if stream.reader is not None:
                await stream.__aexit__(None, None, None)
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await pubsub.aclose()
        await redis.aclose()
    async with httpx.AsyncClient(base_url=live.url, headers=admin) as client:
        audit_text = (await client.get("/api/audit", params={"pageSize": 200})).text

    assert len(raw_messages) >= len(rows) * 3
    problems: list[str] = []
    for i, message in enumerate(raw_messages):
        problems += _leaks(f"redis message {i}", message.decode("utf-8", "replace"))
    problems += _leaks("redis keys", stored)
    for i, text in enumerate(sse):
        problems += _leaks(f"SSE stream {i}", text)
    for i, text in enumerate(process_logs):
        problems += _leaks(f"processLog of {rows[i].scenario}", text)
    problems += _leaks("audit trail", audit_text)
    assert len(captured_logs.lines) > 0
    # the successful T24 attempts' lines (DEBUG) are among those scanned
    assert any(line.startswith("DEBUG regstream.core_banking.client: t24 ") for line in
               captured_logs.lines)  # fmt: skip
    for line in captured_logs.lines:
        problems += _leaks(f"log line {line[:80]!r}", line)
    assert problems == []


def _has_final(frames: list[Any]) -> bool:
    return any(f.type == "update" and f.update.get("final") for f in frames)


def _load_demo(live: LiveServer) -> list[Any]:
    """``serve --demo``'s data (with the enrolled users some outcomes need) in ``live``'s DB."""
    from regstream.db.engine import create_engine, create_session_factory
    from regstream.stack import national_id_keys

    async def make() -> list[Any]:
        engine = create_engine(live.settings.effective_database_url)
        try:
            return await load_demo(create_session_factory(engine), national_id_keys(live.settings).current)
        finally:
            await engine.dispose()

    rows: list[Any] = in_fresh_loop(make)
    return rows


async def test_stream_snapshot_carries_no_raw_personal_data(live: LiveServer) -> None:
    """A resuming client gets a snapshot of the registration: masked values only, no DOB."""
    rows = _load_demo(live)
    headers = auth_headers(live, "viewer")
    for row in rows[:3]:
        async with StreamClient(
            live.url, registration_id=row.registration_id, headers=headers,
            last_event_id="0-0-0",
        ) as sse:  # fmt: skip
            await sse.wait_for(lambda fs: any(f.type == "snapshot" for f in fs), 10, "snapshot")
            assert _leaks("snapshot frame", bytes(sse.raw).decode()) == []


def _encoded_forms(value: str) -> set[str]:
    """How a value may appear in a request target: as is, percent-encoded (upper and lower case
    hex), form-encoded."""
    encoded = quote(value, safe="")
    return {value, encoded, encoded.lower(), quote_plus(value)}


async def test_access_log_lines_carry_no_personal_data_in_any_encoding(
    pii_live: LiveServer, captured_logs: _Capture
) -> None:
    """Searches by phone, e-mail, date of birth and name, and credentials in query parameters,
    sent percent-encoded as browsers do: uvicorn's access lines keep the path and parameter
    names, never those values (issue 16)."""
    live = pii_live
    # as in production: logs.configure() makes uvicorn's access logger propagate to the root
    # handler, after uvicorn's own set-up turned it off (so access lines ARE written there)
    access_logger = logging.getLogger("uvicorn.access")
    propagate = access_logger.propagate
    access_logger.propagate = True
    try:
        await _search_with_personal_data(live, captured_logs)
    finally:
        access_logger.propagate = propagate


async def _search_with_personal_data(live: LiveServer, captured_logs: _Capture) -> None:
    applicant = DEMO_APPLICANTS[0]
    dob = date.fromisoformat(applicant.date_of_birth)
    canaries = {
        applicant.phone, applicant.email, applicant.first_name, applicant.last_name,
        dob.strftime("%d/%m/%Y"), applicant.national_id, "rst_secrettoken123", "tk_ticket456",
    }  # fmt: skip
    headers = auth_headers(live, "viewer")
    async with httpx.AsyncClient(base_url=live.url, headers=headers) as client:
        for value in sorted(canaries):
            response = await client.get("/api/registrations", params={"q": value, "page": 1})
            assert response.status_code == 200
        for name in ("api_key", "ticket", "token", "access_token"):
            await client.get("/api/registrations", params={name: "rst_secrettoken123"})
        await client.get("/api/registrations", params={applicant.phone: "1"})
    access = [line for line in captured_logs.lines if "uvicorn.access" in line]
    assert len(access) >= len(canaries) + 5, "the access log is on in production (see logs.py)"
    assert any("page=1" in line and "q=***" in line for line in access)
    problems = [
        f"{form!r} in {line!r}"
        for line in access
        for value in canaries
        for form in _encoded_forms(value)
        if form in line
    ]
    assert problems == []
