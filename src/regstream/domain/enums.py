"""Statuses, stages and stage states shared by every layer."""

from __future__ import annotations

from enum import StrEnum


class RegistrationStatus(StrEnum):
    PENDING = "PENDING"
    APPROVED = "APPROVED"
    COMPLETED = "COMPLETED"
    DUPLICATE = "DUPLICATE"
    FAILED = "FAILED"

    @property
    def is_terminal(self) -> bool:
        return self is not RegistrationStatus.PENDING


class Stage(StrEnum):
    DUPLICATE_CHECK = "duplicate_check"
    UPDATE_USER_INFO = "update_user_info"
    T24_LOOKUP = "t24_lookup"
    STATUS_UPDATE = "status_update"


class StageStatus(StrEnum):
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"


class UserStatus(StrEnum):
    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    CLOSED = "CLOSED"


class IdType(StrEnum):
    NATIONAL_ID = "NATIONAL.ID"
    PASSPORT = "PASSPORT"
    DRIVING_LICENCE = "DRIVING.LICENCE"
    ALIEN_ID = "ALIEN.ID"
