"""A run's log entries: what the pipeline writes to the process log, and how it goes on the wire.

``LogEntry`` is an entry before it is written (the database numbers it: ``seq``); once written it
is a ``db.registrations.LogEvent``, and ``to_update`` turns that into the published message
through ``realtime.messages`` (the one place that builds messages), ``log_entry_view`` into an
entry of a final's ``processLog`` (and of the API's).

Every run's log ends with the ``status_update`` stage and then the final entry (DOMAIN §3.4): a
run that failed in an earlier stage logs ``status_update`` started and completed ("Status set to
FAILED") after that stage's ``failed`` entry, as APPROVED, COMPLETED and DUPLICATE runs do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from regstream.db.registrations import Event, LogEvent
from regstream.domain.enums import RegistrationStatus, Stage, StageStatus
from regstream.domain.errors import ERROR_MESSAGES, ErrorCode
from regstream.realtime import messages

PENDING = RegistrationStatus.PENDING.value


@dataclass(frozen=True, slots=True)
class LogEntry:
    """A process-log entry to append: a stage's progress (``stage`` and ``stage_status`` set,
    ``status`` PENDING) or a run's final entry (no stage, a final status)."""

    stage: str | None
    stage_status: str | None
    status: str
    message: str
    details: dict[str, Any] | None = None

    def as_row(self) -> Event:
        """The data layer's form (``registrations.append_events``)."""
        return (self.stage, self.stage_status, self.status, self.message, self.details)


def rows(entries: Sequence[LogEntry]) -> list[Event]:
    return [entry.as_row() for entry in entries]


def started(stage: Stage) -> LogEntry:
    return LogEntry(stage.value, StageStatus.STARTED.value, PENDING, f"started: {stage.value}")


def completed(stage: Stage, message: str, details: dict[str, Any] | None = None) -> LogEntry:
    return LogEntry(stage.value, StageStatus.COMPLETED.value, PENDING, message, details)


def failed(stage: Stage, code: ErrorCode) -> LogEntry:
    return LogEntry(
        stage.value, StageStatus.FAILED.value, PENDING, ERROR_MESSAGES[code], {"error": code.value}
    )


def final(status: RegistrationStatus, message: str, details: dict[str, Any]) -> LogEntry:
    return LogEntry(None, None, status.value, message, details)


def status_set(status: RegistrationStatus) -> list[LogEntry]:
    """The ``status_update`` stage before a final entry."""
    return [
        started(Stage.STATUS_UPDATE),
        completed(Stage.STATUS_UPDATE, f"Status set to {status.value}"),
    ]


#: The duplicate check's common result, appended by its query's statement (``validation``).
NO_DUPLICATE: list[LogEntry] = [
    started(Stage.DUPLICATE_CHECK),
    completed(Stage.DUPLICATE_CHECK, "No duplicate found"),
    started(Stage.T24_LOOKUP),
]


def to_update(event: LogEvent, process_log: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The published message of a written entry; ``process_log`` goes with a final one."""
    if event.stage is None:
        return messages.final_update(
            event.registration_id, event.status, event.message, seq=event.seq,
            timestamp=event.timestamp_ms, details=event.details, process_log=process_log,
        )  # fmt: skip
    return messages.stage_update(
        event.registration_id, event.stage, event.stage_status or "", event.message,
        seq=event.seq, timestamp=event.timestamp_ms, details=event.details,
    )  # fmt: skip


def log_entry_view(event: LogEvent) -> dict[str, Any]:
    """An entry of a final's ``processLog`` (and of the API's)."""
    return messages.process_log_entry(
        seq=event.seq, stage=event.stage, status=event.stage_status or event.status,
        message=event.message, timestamp=event.timestamp_ms, details=event.details,
    )  # fmt: skip


def completed_lookup(entries: Sequence[Any]) -> int | None:
    """The account count of a T24 lookup the run completed already (a resumed run's log)."""
    for entry in entries:
        if (
            entry.stage == Stage.T24_LOOKUP.value
            and entry.stage_status == StageStatus.COMPLETED.value
        ):
            count = (entry.details or {}).get("accountsFound")
            if isinstance(count, int):
                return count
    return None
