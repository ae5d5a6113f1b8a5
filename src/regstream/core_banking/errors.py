"""Exceptions raised by the core-banking adapter.

The pipeline catches ``CoreBankingError`` and nothing lower: every transport error
and every non-success T24 answer is translated once, in ``regstream.core_banking.client``, into
one of these (with ``raise ... from exc`` so the cause stays in the traceback for operators).

Our exception hierarchy::

    CoreBankingError            code                 retryable
    ├── CustomerNotFound        CUSTOMER_NOT_FOUND   no
    ├── CoreTimeout             CORE_TIMEOUT         yes
    ├── CoreUnavailable         CORE_UNAVAILABLE     yes
    │   └── CircuitOpen         CORE_UNAVAILABLE     yes   (call not attempted)
    ├── CoreMaintenance         CORE_MAINTENANCE     yes   (COB / maintenance window)
    ├── CoreAuthError           CORE_AUTH_ERROR      no    (alert an operator)
    ├── CoreRequestError        CORE_REQUEST_ERROR   no    (our bug: bad query, bad id)
    ├── CoreProtocolError       CORE_BAD_RESPONSE    no    (non-JSON, missing ``body``)
    └── CoreTlsError            CORE_TLS_ERROR       no    (certificates: alert an operator)

``retryable`` tells whether the *outcome* may be re-validated later (it becomes
``details.retryable`` of a FAILED run). Whether the client retries *within* one call is a
narrower decision taken from ``http_status``/``t24_code`` (see the client module).

Messages are fixed templates from ``regstream.domain.errors.ERROR_MESSAGES`` (or a fixed
string chosen by the client): never a customer id, never a request or response body, never a
T24 error *message* (those can quote record ids). ``http_status`` and ``t24_code``
(``TGVCP-001``...) are safe to log and are kept as attributes.
"""

from __future__ import annotations

from typing import ClassVar

from regstream.domain.errors import ERROR_MESSAGES, ErrorCode

__all__ = [
    "CircuitOpen",
    "CoreAuthError",
    "CoreBankingError",
    "CoreMaintenance",
    "CoreProtocolError",
    "CoreRequestError",
    "CoreTimeout",
    "CoreTlsError",
    "CoreUnavailable",
    "CustomerNotFound",
]


class CoreBankingError(Exception):
    """Base class of every core-banking adapter error.

    ``code`` is the stable outcome code, ``retryable`` whether a later re-validation may
    succeed. ``http_status`` and ``t24_code`` describe the wire answer when there was one.
    """

    code: ClassVar[ErrorCode] = ErrorCode.CORE_UNAVAILABLE
    retryable: ClassVar[bool] = True

    def __init__(
        self,
        message: str | None = None,
        *,
        http_status: int | None = None,
        t24_code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message or ERROR_MESSAGES[self.code])
        self.http_status = http_status
        self.t24_code = t24_code
        #: Seconds the server asked us to wait (``Retry-After``), if it said so.
        self.retry_after = retry_after

    @property
    def message(self) -> str:
        return str(self.args[0])


class CustomerNotFound(CoreBankingError):
    """The core has no such customer (404 / ``TGVCP-002`` RECORD MISSING)."""

    code = ErrorCode.CUSTOMER_NOT_FOUND
    retryable = False


class CoreTimeout(CoreBankingError):
    """No answer within the per-request timeout or the per-call deadline."""

    code = ErrorCode.CORE_TIMEOUT
    retryable = True


class CoreUnavailable(CoreBankingError):
    """The core refused the connection or answered with a server error (5xx)."""

    code = ErrorCode.CORE_UNAVAILABLE
    retryable = True


class CircuitOpen(CoreUnavailable):
    """The circuit breaker is open: the call was not attempted."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or "Core banking circuit breaker is open; call not attempted")


class CoreMaintenance(CoreBankingError):
    """The core is in close of business / maintenance (503 + ``Retry-After``, COB ``TGVCP-001``)."""

    code = ErrorCode.CORE_MAINTENANCE
    retryable = True


class CoreAuthError(CoreBankingError):
    """The core refused our credentials or company (401, 403)."""

    code = ErrorCode.CORE_AUTH_ERROR
    retryable = False


class CoreRequestError(CoreBankingError):
    """The core rejected our request as malformed (400); a bug on our side."""

    code = ErrorCode.CORE_REQUEST_ERROR
    retryable = False


class CoreProtocolError(CoreBankingError):
    """The answer could not be understood (non-JSON, missing ``body``, schema drift)."""

    code = ErrorCode.CORE_BAD_RESPONSE
    retryable = False


class CoreTlsError(CoreBankingError):
    """The TLS connection to the core failed: its certificate is not trusted (``T24_CA_BUNDLE``),
    or it refused ours (``T24_CLIENT_CERT``/``T24_CLIENT_KEY`` missing or not signed by a CA it
    trusts). A configuration problem: not retried, does not open the breaker."""

    code = ErrorCode.CORE_TLS_ERROR
    retryable = False

    def __init__(self, message: str | None = None, *, detail: str | None = None) -> None:
        super().__init__(message)
        #: What TLS said, for the log line (e.g. ``CERTIFICATE_VERIFY_FAILED: certificate has
        #: expired``, ``TLSV13_ALERT_CERTIFICATE_REQUIRED``): no personal data, never published.
        self.detail = detail
