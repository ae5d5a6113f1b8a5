"""``realtime/messages.py`` builds every update message: the fields of each kind, and the
statuses it refuses (issue 17)."""

from __future__ import annotations

from typing import Any

import pytest

from regstream.realtime import messages


def test_a_stage_update_has_the_stage_fields_and_details_only_when_given() -> None:
    plain = messages.stage_update(42, "duplicate_check", "started", "started: duplicate_check",
                                  seq=1, timestamp=7)  # fmt: skip
    assert plain == {
        "registrationId": 42, "status": "PENDING", "timestamp": 7, "stage": "duplicate_check",
        "stageStatus": "started", "message": "started: duplicate_check", "seq": 1,
    }  # fmt: skip
    found = messages.stage_update(42, "t24_lookup", "completed", "Found 2 accounts", seq=4,
                                  timestamp=7, details={"accountsFound": 2})  # fmt: skip
    assert found["details"] == {"accountsFound": 2}
    assert next(iter(found)) == "registrationId"  # the publish script reads it first


def test_a_final_has_details_always_and_never_a_stage() -> None:
    final = messages.final_update(42, "DUPLICATE", "User already exists", seq=9, timestamp=7,
                                  process_log=[])  # fmt: skip
    assert final == {
        "registrationId": 42, "status": "DUPLICATE", "timestamp": 7,
        "message": "User already exists", "details": {}, "processLog": [], "seq": 9, "final": True,
    }  # fmt: skip


def test_without_a_seq_the_message_has_none() -> None:
    """The publish script gives it the registration's next seq."""
    assert "seq" not in messages.stage_update(42, "test_stage", "started", "started: test_stage")
    assert "seq" not in messages.final_update(42, "APPROVED", "ok")


@pytest.mark.parametrize(
    ("build", "bad", "allowed"),
    [
        pytest.param(lambda: messages.stage_update(1, "t24_lookup", "done", "m"), "'done'",
                     "started, completed, failed", id="stage-status"),
        pytest.param(lambda: messages.final_update(1, "PENDING", "m"), "'PENDING'",
                     "APPROVED, COMPLETED, DUPLICATE, FAILED", id="final-pending"),
        pytest.param(lambda: messages.final_update(1, "approved", "m"), "'approved'",
                     "APPROVED, COMPLETED, DUPLICATE, FAILED", id="final-lower-case"),
        pytest.param(lambda: messages.check_update({"registrationId": 1, "status": "APPROVED",
                                                    "stage": "t24_lookup", "message": "m"}),
                     "'APPROVED'", "PENDING", id="stage-update-with-a-final-status"),
        pytest.param(lambda: messages.check_update({"registrationId": 1, "status": "PENDING",
                                                    "stage": "t24_lookup", "stageStatus": "ok"}),
                     "'ok'", "started, completed, failed", id="update-stage-status"),
        pytest.param(lambda: messages.check_update({"registrationId": 1, "status": "DONE"}),
                     "'DONE'", "APPROVED, COMPLETED, DUPLICATE, FAILED", id="update-final"),
    ],
)  # fmt: skip
def test_unknown_statuses_are_refused_naming_the_allowed(
    build: Any, bad: str, allowed: str
) -> None:
    with pytest.raises(ValueError, match="is not one of") as raised:
        build()
    assert bad in str(raised.value) and str(raised.value).endswith(allowed)


@pytest.mark.parametrize(
    "update",
    [
        pytest.param({"registrationId": "42", "status": "APPROVED"}, id="id-as-text"),
        pytest.param({"registrationId": True, "status": "APPROVED"}, id="id-as-bool"),
        pytest.param({"status": "APPROVED"}, id="no-id"),
    ],
)
def test_an_update_without_an_integer_registration_id_is_refused(update: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="registrationId must be an int"):
        messages.check_update(update)


def test_the_updates_the_builders_make_pass_the_check() -> None:
    messages.check_update(messages.stage_update(1, "status_update", "failed", "m", seq=3))
    messages.check_update(messages.final_update(1, "FAILED", "m", details={"error": "X"}))


@pytest.mark.parametrize("value", ["1_1-²", "1²_1-1", "1_1-1~²", "1_١-1", "1_1-1~١٢"])
def test_ids_with_digits_int_refuses_are_unknown_not_an_error(value: str) -> None:
    """``str.isdigit`` takes ``²`` and Arabic-Indic digits; ``int`` refuses ``²``: such an id
    (a Last-Event-ID header read as latin-1) is unknown (a snapshot), never an exception after
    the response head (the browser would reconnect with it forever)."""
    assert messages.parse_resume_id(value) == (None, 0)
    if "~" not in value:
        assert messages.parse_event_id(value) is None
