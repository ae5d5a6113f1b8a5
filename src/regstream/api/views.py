"""Turning rows into response schemas (masking personal fields)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from regstream.api.schemas import (
    ProcessLogItem,
    RegistrationDetail,
    RegistrationRead,
    RegistrationResult,
)
from regstream.db.registrations import to_log_event
from regstream.db.tables import ProcessLogEntry, RegistrationRequest
from regstream.domain.pii import mask_cif, mask_email, mask_last4, mask_phone
from regstream.pipeline.events import log_entry_view


def _iso(value: datetime | None) -> str:
    return value.isoformat() if value else ""


def _retryable(row: RegistrationRequest) -> bool:
    """Whether the operator may validate again: any FAILED run may be re-run."""
    return row.status == "FAILED" and not row.in_progress


def read_of(row: RegistrationRequest) -> RegistrationRead:
    return RegistrationRead(**_common(row))


def detail_of(row: RegistrationRequest, log: list[ProcessLogEntry]) -> RegistrationDetail:
    items = [ProcessLogItem(**log_entry_view(to_log_event(e))) for e in log]
    return RegistrationDetail(**_common(row), date_of_birth=row.date_of_birth, process_log=items)


def snapshot_of(row: RegistrationRequest, log: list[ProcessLogEntry]) -> dict[str, Any]:
    """The registration as a stream snapshot: the list view (masked, no date of birth; streams
    are not the detail view) plus the process log of the latest run."""
    data = read_of(row).model_dump(by_alias=True, mode="json")
    data["processLog"] = [
        ProcessLogItem(**log_entry_view(to_log_event(e))).model_dump(by_alias=True, mode="json")
        for e in log
    ]
    return data


def _common(row: RegistrationRequest) -> dict[str, Any]:
    result = RegistrationResult(**row.result) if row.result else None
    return {
        "id": row.id,
        "status": row.status,
        "current_stage": row.current_stage,
        "in_progress": row.in_progress,
        "customer_number": mask_cif(row.customer_number),
        "account_number": mask_last4(row.account_number),
        "first_name": row.first_name,
        "last_name": row.last_name,
        "id_type": row.id_type,
        "national_id": mask_last4(row.national_id),
        "phone": mask_phone(row.phone),
        "email": mask_email(row.email),
        "seq": row.seq,
        "result": result,
        "retryable": _retryable(row),
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
    }
