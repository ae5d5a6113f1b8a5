"""Outcome codes of a validation run.

Every FAILED run carries exactly one of these codes in ``details.error``; the codes are
stable (clients and dashboards match on them) and never carry personal data.

``ValidationFailure`` is raised by pipeline stages for rule outcomes (KYC mismatch, no active
accounts, ...). Core-banking adapter errors carry the same codes (see
``regstream.core_banking.errors``); anything else is reported as ``INTERNAL_ERROR``.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    PHONE_ALREADY_ENROLLED = "PHONE_ALREADY_ENROLLED"
    ID_ALREADY_ENROLLED = "ID_ALREADY_ENROLLED"
    IDENTITY_MISMATCH = "IDENTITY_MISMATCH"
    CUSTOMER_NOT_FOUND = "CUSTOMER_NOT_FOUND"
    CUSTOMER_RESTRICTED = "CUSTOMER_RESTRICTED"
    KYC_MISMATCH = "KYC_MISMATCH"
    NO_ACTIVE_ACCOUNTS = "NO_ACTIVE_ACCOUNTS"
    ACCOUNT_NOT_OWNED = "ACCOUNT_NOT_OWNED"
    ACCOUNT_INACTIVE = "ACCOUNT_INACTIVE"
    CORE_TIMEOUT = "CORE_TIMEOUT"
    CORE_UNAVAILABLE = "CORE_UNAVAILABLE"
    CORE_MAINTENANCE = "CORE_MAINTENANCE"
    CORE_AUTH_ERROR = "CORE_AUTH_ERROR"
    CORE_REQUEST_ERROR = "CORE_REQUEST_ERROR"
    CORE_BAD_RESPONSE = "CORE_BAD_RESPONSE"
    CORE_TLS_ERROR = "CORE_TLS_ERROR"
    INTERRUPTED = "INTERRUPTED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


#: Fixed, PII-free messages for each code (published and shown to operators).
ERROR_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.PHONE_ALREADY_ENROLLED: "Phone number is already enrolled by another customer",
    ErrorCode.ID_ALREADY_ENROLLED: "National id is already enrolled by another customer",
    ErrorCode.IDENTITY_MISMATCH: "Identity details do not match the enrolled user",
    ErrorCode.CUSTOMER_NOT_FOUND: "Customer not found in core banking",
    ErrorCode.CUSTOMER_RESTRICTED: "Customer is inactive or has a posting restriction",
    ErrorCode.KYC_MISMATCH: "Applicant details do not match the core banking record",
    ErrorCode.NO_ACTIVE_ACCOUNTS: "Customer has no active accounts",
    ErrorCode.ACCOUNT_NOT_OWNED: "Account does not belong to the customer",
    ErrorCode.ACCOUNT_INACTIVE: "Account is not active",
    ErrorCode.CORE_TIMEOUT: "Core banking did not answer in time",
    ErrorCode.CORE_UNAVAILABLE: "Core banking is unavailable",
    ErrorCode.CORE_MAINTENANCE: "Core banking is in maintenance (close of business)",
    ErrorCode.CORE_AUTH_ERROR: "Core banking refused our credentials",
    ErrorCode.CORE_REQUEST_ERROR: "Core banking rejected the request",
    ErrorCode.CORE_BAD_RESPONSE: "Core banking sent an unreadable response",
    ErrorCode.CORE_TLS_ERROR: "TLS connection to core banking failed (certificates)",
    ErrorCode.INTERRUPTED: "Validation was interrupted by a server restart; please validate again",
    ErrorCode.INTERNAL_ERROR: "Internal error during validation",
}

RETRYABLE: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.CORE_TIMEOUT,
        ErrorCode.CORE_UNAVAILABLE,
        ErrorCode.CORE_MAINTENANCE,
        ErrorCode.INTERRUPTED,
        ErrorCode.INTERNAL_ERROR,
    }
)


class ValidationFailure(Exception):
    """A rule said no. ``fields`` names the offending fields (never their values)."""

    def __init__(self, code: ErrorCode, fields: list[str] | None = None) -> None:
        super().__init__(ERROR_MESSAGES[code])
        self.code = code
        self.fields = fields or []

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE
