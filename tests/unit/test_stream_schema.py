"""The published schema of the stream (api/stream_schema.py) against what the service really
sends: the messages ``realtime.messages`` builds (for ``pipeline.events``) and the frames of
``realtime.messages`` validate against the models (closed: no unknown field), the copy in
clients/js/schema is current, and the JavaScript package's types agree with it
(clients/js/scripts/check-schema.mjs, run by tests/unit/test_js_client.py)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from regstream.api import views
from regstream.api.stream import MAX_IDS, STREAM_PATH
from regstream.api.stream_schema import (
    FRAME_ADAPTER,
    UPDATE_ADAPTER,
    RegistrationSnapshot,
    schema_bytes,
    stream_schema,
)
from regstream.db.registrations import LogEvent
from regstream.db.tables import ProcessLogEntry, RegistrationRequest
from regstream.pipeline.events import log_entry_view, to_update
from regstream.realtime import messages

COPY = Path(__file__).resolve().parents[2] / "clients" / "js" / "schema" / "stream.json"
KEY = messages.EventKey("17", 1_700_000_000_000, 3)


def frame_of(raw: bytes) -> Any:
    """The JSON of an SSE frame's ``data:`` line."""
    lines = [line for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert len(lines) == 1, raw
    return orjson.loads(lines[0][len("data: ") :])


def events() -> list[LogEvent]:
    common: dict[str, Any] = {"registration_id": 42, "run": 1, "timestamp_ms": 1_700_000_000_000}
    return [
        LogEvent(seq=1, status="PENDING", message="started: duplicate_check",
                 stage="duplicate_check", stage_status="started", **common),
        LogEvent(seq=2, status="PENDING", message="No duplicate found",
                 stage="duplicate_check", stage_status="completed", **common),
        LogEvent(seq=3, status="PENDING", message="Found 2 accounts", stage="t24_lookup",
                 stage_status="completed", details={"accountsFound": 2}, **common),
        LogEvent(seq=4, status="APPROVED", message="Customer validated successfully",
                 details={"accountsFound": 2}, **common),
    ]  # fmt: skip


def test_the_copy_in_the_js_package_is_current() -> None:
    assert COPY.read_bytes() == schema_bytes(), (
        "run: .venv/bin/python -m regstream.api.stream_schema clients/js/schema/stream.json "
        "&& (cd clients/js && npm run schema)"
    )


def test_the_schema_carries_the_servers_limits() -> None:
    assert stream_schema()["x-regstream"] == {"maxIdsPerStream": MAX_IDS, "streamPath": STREAM_PATH}


def test_published_updates_validate() -> None:
    log = events()
    process_log = [log_entry_view(e) for e in log[:-1]]
    for event in log:
        update = to_update(event, process_log if event.stage is None else None)
        UPDATE_ADAPTER.validate_python(update)
        raw = messages.with_event_id(messages.encode(update), KEY)
        parsed = messages.parse_message(raw)
        assert parsed is not None
        frame = frame_of(messages.update_frame(parsed))
        assert FRAME_ADAPTER.validate_python(frame)["data"]["eventId"] == str(KEY)
    stage = messages.stage_update(7, "t24_lookup", "started", "started: t24_lookup", seq=5,
                                  timestamp=1, details={"attempt": 2})  # fmt: skip
    final = messages.final_update(7, "FAILED", "Identity details do not match", seq=6,
                                  timestamp=2, details={"error": "KYC_MISMATCH"},
                                  process_log=process_log)  # fmt: skip
    for update in (stage, final):
        UPDATE_ADAPTER.validate_python(update)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(messages.control_frame("connected", lastEventId=str(KEY)), id="connected"),
        pytest.param(messages.control_frame("connected", lastEventId=None), id="connected-empty"),
        pytest.param(messages.control_frame("ping"), id="ping"),
        pytest.param(messages.control_frame("auth", reason="revoked"), id="auth"),
        pytest.param(messages.snapshot_frame(None, resync=True), id="resync"),
        pytest.param(
            messages.snapshot_frame({"registrationIds": [3, 4]}, resync=True), id="resync-ids"
        ),
    ],
)
def test_control_frames_validate(raw: bytes) -> None:
    FRAME_ADAPTER.validate_python(frame_of(raw))


def test_a_registration_snapshot_validates() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    row = RegistrationRequest(
        id=42, customer_number="100231", account_number="105929", first_name="Ann",
        last_name="Lee", date_of_birth=date(1990, 1, 1), national_id="12345678",
        id_type="NATIONAL.ID", phone="+254712345678", email="ann@example.com",
        status="APPROVED", current_stage=None, seq=4, in_progress=False,
        result={"message": "Customer validated successfully", "details": {"accountsFound": 2}},
        created_at=now, updated_at=now,
    )  # fmt: skip
    log = [
        ProcessLogEntry(registration_id=42, seq=e.seq, run=1, stage=e.stage,
                        stage_status=e.stage_status, status=e.status, message=e.message,
                        details=e.details, timestamp_ms=e.timestamp_ms)
        for e in events()
    ]  # fmt: skip
    data = views.snapshot_of(row, log)
    raw = messages.snapshot_frame(data, event_id=messages.snapshot_id(KEY, 4))
    frame = FRAME_ADAPTER.validate_python(frame_of(raw))
    assert isinstance(frame["data"], RegistrationSnapshot)
    assert frame["data"].process_log[2].details == {"accountsFound": 2}


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param({"type": "ping", "timestamp": 1, "extra": 1}, id="unknown-field"),
        pytest.param({"type": "pong", "timestamp": 1}, id="unknown-type"),
        pytest.param({"type": "auth", "timestamp": 1, "reason": "bored"}, id="unknown-reason"),
        pytest.param(
            {
                "type": "update",
                "data": {
                    "registrationId": 1,
                    "status": "PENDING",
                    "timestamp": 1,
                    "message": "m",
                    "seq": 1,
                    "stage": "coffee",
                },
            },
            id="unknown-stage",
        ),  # fmt: skip
    ],
)
def test_the_models_are_closed(frame: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        FRAME_ADAPTER.validate_python(frame)
