"""The core-banking exception tree (regstream.core_banking.errors)."""

from __future__ import annotations

import pytest

from regstream.core_banking import errors
from regstream.core_banking.errors import (
    CircuitOpen,
    CoreAuthError,
    CoreBankingError,
    CoreMaintenance,
    CoreProtocolError,
    CoreRequestError,
    CoreTimeout,
    CoreTlsError,
    CoreUnavailable,
    CustomerNotFound,
)
from regstream.domain.errors import ERROR_MESSAGES, RETRYABLE, ErrorCode


@pytest.mark.parametrize(
    ("exc_type", "code", "retryable"),
    [
        pytest.param(CustomerNotFound, ErrorCode.CUSTOMER_NOT_FOUND, False, id="not-found"),
        pytest.param(CoreTimeout, ErrorCode.CORE_TIMEOUT, True, id="timeout"),
        pytest.param(CoreUnavailable, ErrorCode.CORE_UNAVAILABLE, True, id="unavailable"),
        pytest.param(CoreMaintenance, ErrorCode.CORE_MAINTENANCE, True, id="maintenance"),
        pytest.param(CoreAuthError, ErrorCode.CORE_AUTH_ERROR, False, id="auth"),
        pytest.param(CoreRequestError, ErrorCode.CORE_REQUEST_ERROR, False, id="request"),
        pytest.param(CoreProtocolError, ErrorCode.CORE_BAD_RESPONSE, False, id="protocol"),
        pytest.param(CoreTlsError, ErrorCode.CORE_TLS_ERROR, False, id="tls"),
        pytest.param(CircuitOpen, ErrorCode.CORE_UNAVAILABLE, True, id="circuit-open"),
    ],
)
def test_codes_and_retryable(
    exc_type: type[CoreBankingError], code: ErrorCode, retryable: bool
) -> None:
    exc = exc_type()
    assert isinstance(exc, CoreBankingError)
    assert isinstance(exc, Exception)
    assert exc.code is code
    assert exc.retryable is retryable
    assert exc.retryable is (code in RETRYABLE)


def test_circuit_open_is_unavailable() -> None:
    assert issubclass(CircuitOpen, CoreUnavailable)
    assert str(CircuitOpen()) == "Core banking circuit breaker is open; call not attempted"


def test_default_message_is_the_fixed_template() -> None:
    exc = CoreTimeout()
    assert str(exc) == ERROR_MESSAGES[ErrorCode.CORE_TIMEOUT]
    assert exc.message == ERROR_MESSAGES[ErrorCode.CORE_TIMEOUT]


def test_wire_details_are_kept() -> None:
    exc = CoreMaintenance(http_status=503, t24_code="TGVCP-001", retry_after=1.0)
    assert (exc.http_status, exc.t24_code, exc.retry_after) == (503, "TGVCP-001", 1.0)
    assert str(exc) == ERROR_MESSAGES[ErrorCode.CORE_MAINTENANCE]


def test_every_exported_name_is_in_the_tree() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), CoreBankingError)
    assert len(errors.__all__) == 10


def test_catching_the_base_catches_all() -> None:
    with pytest.raises(CoreBankingError):
        raise CustomerNotFound(http_status=404, t24_code="TGVCP-002")
