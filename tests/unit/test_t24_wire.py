"""T24 answers mapped to outcomes and records (regstream.core_banking._wire)."""

from __future__ import annotations

import json
import ssl
from datetime import date
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from aiohttp.client_reqrep import ConnectionKey

from regstream.core_banking import _wire
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
from regstream.domain.core_records import LegalId


def _error(code: str, message: str, type_: str = "BUSINESS") -> dict[str, Any]:
    return {
        "header": {"status": "failed", "audit": {"T24_time": 35}},
        "error": {"type": type_, "code": code, "message": message},
    }


def _response(status: int, document: Any = None, **headers: str) -> _wire.Answer:
    """An answer as the client builds it (header names lower-cased, as the transport has them)."""
    content = document if isinstance(document, bytes) else json.dumps(document).encode()
    return _wire.Answer(status, {k.lower(): v for k, v in headers.items()}, content)


OK = {"header": {"status": "success"}, "body": {"customerId": "1"}}


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        pytest.param(_response(404, _error("TGVCP-002", "RECORD MISSING")), CustomerNotFound,
                     id="404-record-missing"),
        pytest.param(_response(200, _error("TGVCP-002", "RECORD MISSING")), CustomerNotFound,
                     id="200-failed-record-missing"),
        pytest.param(_response(404, b"<html>Not Found</html>"), CoreRequestError,
                     id="bare-404-is-our-url"),
        pytest.param(_response(401, _error("TGVCP-011", "INVALID SIGN ON")), CoreAuthError,
                     id="401"),
        pytest.param(_response(403, _error("TGVCP-002", "SECURITY VIOLATION")), CoreAuthError,
                     id="403-security-violation"),
        pytest.param(_response(400, _error("TGVCP-003", "bad")), CoreRequestError, id="400"),
        pytest.param(_response(400, _error("TGVCP-017", "dup")), CoreRequestError,
                     id="400-duplicate-param"),
        pytest.param(_response(429, b""), CoreRequestError, id="other-4xx"),
        pytest.param(_response(500, _error("TGVCP-001", "No response", "SYSTEM")),
                     CoreUnavailable, id="500-tgvcp-001"),
        pytest.param(_response(500, _error("TGVCP-001", "COB in progress", "SYSTEM")),
                     CoreMaintenance, id="500-tgvcp-001-cob"),
        pytest.param(_response(500, _error("TGVCP-001", "x", "SYSTEM"), **{"Retry-After": "5"}),
                     CoreMaintenance, id="500-tgvcp-001-retry-after"),
        pytest.param(_response(500, _error("TGVCP-006", "parser", "SYSTEM")), CoreUnavailable,
                     id="500-other"),
        pytest.param(_response(502, b"<html>Bad Gateway</html>"), CoreUnavailable, id="502"),
        pytest.param(_response(503, b""), CoreUnavailable, id="503-without-retry-after"),
        pytest.param(_response(503, b"", **{"Retry-After": "1"}), CoreMaintenance,
                     id="503-retry-after"),
        pytest.param(_response(504, b""), CoreUnavailable, id="504"),
        pytest.param(_response(200, b"<html>login</html>"), CoreProtocolError, id="200-html"),
        pytest.param(_response(200, [1, 2]), CoreProtocolError, id="200-json-array"),
        pytest.param(_response(200, {"header": {"status": "success"}}), CoreProtocolError,
                     id="200-missing-body"),
        pytest.param(_response(200, _error("TGVCP-006", "oops")), CoreProtocolError,
                     id="200-failed-other"),
        pytest.param(_response(302, b"", Location="/login"), CoreProtocolError, id="redirect"),
    ],
)  # fmt: skip
def test_interpret_errors(response: _wire.Answer, expected: type[CoreBankingError]) -> None:
    with pytest.raises(expected) as info:
        _wire.interpret(response)
    assert type(info.value) is expected
    assert info.value.http_status == response.status_code


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(_response(404, _error("TGVCP-002", _wire.NO_RECORDS_MARKER)), id="404"),
        pytest.param(
            _response(400, _error("X", "No records were found that matched the selection")),
            id="400",
        ),
        pytest.param(_response(200, _error("", "NO RECORDS WERE FOUND")), id="200-failed"),
    ],
)
def test_interpret_no_records(response: _wire.Answer) -> None:
    assert _wire.interpret(response) is None


def test_interpret_success() -> None:
    envelope = _wire.interpret(_response(200, OK))
    assert envelope is not None
    assert envelope.document["body"] == {"customerId": "1"}
    assert envelope.header == {"status": "success"}


def test_retry_after_values() -> None:
    assert _wire.parse_retry_after(None) is None
    assert _wire.parse_retry_after(" 3 ") == 3.0
    assert _wire.parse_retry_after("soon") is None
    future = formatdate(1_000_030, usegmt=True)
    assert _wire.parse_retry_after(future, now=1_000_000) == pytest.approx(30.0)
    assert _wire.parse_retry_after(formatdate(10, usegmt=True), now=1_000) == 0.0


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        pytest.param(CoreTimeout(), True, id="timeout"),
        pytest.param(CoreUnavailable(), True, id="connection-error"),
        pytest.param(CoreUnavailable(http_status=500, t24_code="TGVCP-001"), True, id="500-001"),
        pytest.param(CoreUnavailable(http_status=500, t24_code="TGVCP-006"), False, id="500-006"),
        pytest.param(CoreUnavailable(http_status=502), True, id="502"),
        pytest.param(CoreUnavailable(http_status=504), True, id="504"),
        pytest.param(CoreUnavailable(http_status=501), False, id="501"),
        pytest.param(CoreMaintenance(http_status=503, retry_after=1), True, id="503"),
        pytest.param(CircuitOpen(), False, id="circuit-open"),
        pytest.param(CustomerNotFound(http_status=404), False, id="404"),
        pytest.param(CoreAuthError(http_status=401), False, id="401"),
        pytest.param(CoreRequestError(http_status=400), False, id="400"),
        pytest.param(CoreProtocolError(http_status=200), False, id="garbage"),
    ],
)
def test_should_retry(exc: CoreBankingError, transient: bool) -> None:
    assert _wire.should_retry(exc) is transient


def _caused_by(exc: Exception, cause: BaseException) -> Exception:
    exc.__cause__ = cause
    return exc


_KEY = ConnectionKey(
    host="t24.example", port=443, is_ssl=True, ssl=True, proxy=None, proxy_auth=None,
    proxy_headers_hash=None,
)  # fmt: skip


def _connector(error_type: type[aiohttp.ClientConnectorError], cause: OSError) -> Exception:
    return _caused_by(error_type(_KEY, cause), cause)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(aiohttp.SocketTimeoutError("read"), CoreTimeout, id="read-timeout"),
        pytest.param(aiohttp.ConnectionTimeoutError("connect"), CoreTimeout, id="connect-timeout"),
        pytest.param(TimeoutError(), CoreTimeout, id="other-timeout"),
        pytest.param(_connector(aiohttp.ClientConnectorError, ConnectionRefusedError(111, "no")),
                     CoreUnavailable, id="refused"),
        pytest.param(aiohttp.ClientOSError(104, "reset"), CoreUnavailable, id="reset"),
        pytest.param(aiohttp.ServerDisconnectedError(), CoreUnavailable, id="server-hung-up"),
        pytest.param(aiohttp.ClientPayloadError("Response payload is not completed"),
                     CoreUnavailable, id="body-cut-short"),
        pytest.param(_connector(aiohttp.ClientProxyConnectionError, ConnectionRefusedError()),
                     CoreUnavailable, id="proxy-unreachable"),
        pytest.param(ssl.SSLEOFError(8, "EOF"), CoreUnavailable, id="tls-eof-after-handshake"),
        pytest.param(aiohttp.ClientPayloadError("Can not decode content-encoding: gzip"),
                     CoreProtocolError, id="undecodable-body"),
        pytest.param(_wire.BodyTooLarge("big"), CoreProtocolError, id="body-too-large"),
        pytest.param(
            aiohttp.ClientConnectorCertificateError(_KEY, ssl.SSLCertVerificationError(1, "v")),
            CoreTlsError, id="server-certificate-not-trusted",
        ),
        pytest.param(_connector(aiohttp.ClientConnectorSSLError, ssl.SSLEOFError(8, "EOF")),
                     CoreTlsError, id="handshake-broken-off"),
        pytest.param(ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]"), CoreTlsError,
                     id="alert-certificate-required"),
        pytest.param(_caused_by(aiohttp.ClientOSError(1, "alert"), ssl.SSLError(1, "alert")),
                     CoreTlsError, id="alert-wrapped"),
        pytest.param(aiohttp.InvalidURL("ftp://x"), CoreRequestError, id="bad-url"),
        pytest.param(ValueError("bad target"), CoreRequestError, id="our-bug"),
    ],
)  # fmt: skip
def test_map_transport_error(error: BaseException, expected: type[CoreBankingError]) -> None:
    assert type(_wire.map_transport_error(error)) is expected


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        pytest.param(aiohttp.ServerDisconnectedError(), CoreTlsError, id="closed-after-handshake"),
        pytest.param(aiohttp.ClientOSError(104, "reset"), CoreTlsError, id="reset-after-handshake"),
        pytest.param(aiohttp.SocketTimeoutError("read"), CoreTimeout, id="slow-is-not-tls"),
        pytest.param(_wire.BodyTooLarge("big"), CoreProtocolError, id="an-answer-is-not-tls"),
    ],
)  # fmt: skip
def test_a_new_tls_connection_ending_without_answer_is_a_tls_failure(
    error: BaseException, expected: type[CoreBankingError]
) -> None:
    """What a server that refuses our client certificate without an alert looks like (uvicorn
    closes right after the TLS 1.3 handshake); on a kept-alive connection it is a stale close."""
    assert type(_wire.map_transport_error(error, fresh_tls=True)) is expected
    assert _wire.should_retry(_wire.map_transport_error(error, fresh_tls=True)) is (
        expected is CoreTimeout
    )


CUSTOMER_BODY = {
    "customerId": "100231",
    "customerMnemonic": "MSANTOS",
    "customerNames": [{"customerName": "Maria Santos"}, {"customerName": " "}],
    "dateOfBirth": "1988-04-02",
    "customerStatus": "1",
    "postingRestrict": "",
    "kycComplete": "YES",
    "legalDetails": [
        {"legalId": "27841236", "legalDocumentName": "NATIONAL.ID"},
        {"legalDocumentName": "PASSPORT"},
    ],
    "communicationDevices": [
        {"phoneNumber": "+254712345678", "email": "maria@example.com"},
        {"smsNumber": "+254712345679"},
    ],
}


def test_parse_customer() -> None:
    customer = _wire.parse_customer(CUSTOMER_BODY, "100231")
    assert customer.customer_id == "100231"
    assert customer.names == ("Maria Santos",)
    assert customer.date_of_birth == date(1988, 4, 2)
    assert customer.customer_status == "1"
    assert customer.posting_restrict == ""
    assert customer.kyc_complete is True
    assert customer.legal_ids == (LegalId("27841236", "NATIONAL.ID"),)
    assert customer.phones == ("+254712345678", "+254712345679")
    assert customer.emails == ("maria@example.com",)


def test_parse_customer_t24_native_date_and_missing_fields() -> None:
    customer = _wire.parse_customer({"dateOfBirth": "19880402", "customerStatus": 1}, "7")
    assert customer.date_of_birth == date(1988, 4, 2)
    assert customer.customer_status == "1"
    assert customer.names == ()
    assert customer.kyc_complete is False


@pytest.mark.parametrize(
    "body",
    [
        pytest.param([], id="list"),
        pytest.param({**CUSTOMER_BODY, "customerId": "100232"}, id="another-customer"),
        pytest.param({**CUSTOMER_BODY, "dateOfBirth": "02/04/1988"}, id="bad-date"),
        pytest.param({**CUSTOMER_BODY, "customerNames": "Maria"}, id="names-not-list"),
        pytest.param({**CUSTOMER_BODY, "customerStatus": {"a": 1}}, id="status-object"),
    ],
)
def test_parse_customer_rejects(body: Any) -> None:
    with pytest.raises(CoreProtocolError) as info:
        _wire.parse_customer(body, "100231")
    assert "100231" not in str(info.value)


def test_parse_accounts() -> None:
    accounts = _wire.parse_accounts(
        [
            {
                "arrangementId": "AA1",
                "accountId": "105929",
                "arrangementStatus": "auth",
                "dormancyStatus": "",
                "accountIBAN": "KE00X",
                "productId": "P",
                "currencyId": "KES",
            },
            {"accountId": 104417, "arrangementStatus": "AUTH", "dormancyStatus": "DORMANT"},
        ]
    )
    assert [(a.account_id, a.is_active, a.iban) for a in accounts] == [
        ("105929", True, "KE00X"),
        ("104417", False, ""),
    ]
    assert _wire.parse_accounts(None) == []


HOLDINGS_V4_BODY = [  # holdings v4 (../shared/t24-spec): holdings, each with its products
    {
        "productLineId": "ACCOUNTS",
        "totalAccountBalances": 1520.5,
        "products": [
            {
                "arrangementId": "AA23145XK9QZ",
                "accountId": "105929",
                "productId": "NEGOTIABLE.ACCOUNT",
                "currencyId": "KES",
                "accountIBAN": "KE00X",
                "arrangementStatus": "AUTH",
                "dormancyStatus": "",
                "customerIds": [{"customerId": "100231", "customerRole": "OWNER"}],
            },
            {"accountId": "104417", "arrangementStatus": "AUTH", "dormancyStatus": "DORMANT"},
        ],
    },
    {"productLineId": "DEPOSITS", "totalDepositBalances": 0, "products": []},
    {"productLineId": "LENDING", "products": [{"accountId": "3", "arrangementStatus": "CLOSE"}]},
]


SPEC_PATH = Path(__file__).resolve().parents[1] / "data" / "holdings-v4.openapi.json"


def test_parse_accounts_holdings_v4() -> None:
    accounts = _wire.parse_accounts(HOLDINGS_V4_BODY)
    assert [(a.account_id, a.arrangement_id, a.is_active, a.iban) for a in accounts] == [
        ("105929", "AA23145XK9QZ", True, "KE00X"),
        ("104417", "", False, ""),
        ("3", "", False, ""),
    ]
    assert accounts[0].product_id == "NEGOTIABLE.ACCOUNT"
    assert _wire.page_rows(HOLDINGS_V4_BODY) == 3  # total_size counts holdings


def test_the_holdings_v4_example_is_the_published_shape() -> None:
    """The body above validates against Temenos' holdings v4 document (tests/data holds a copy
    of ../shared/t24-spec/holdings-v4.openapi.json), so the parser reads the published shape."""
    spec = json.loads(SPEC_PATH.read_text())
    schema = {
        "$ref": "#/components/schemas/CustomerHoldingsResponse",
        "components": spec["components"],
    }
    document = {"header": {"status": "success", "total_size": 3}, "body": HOLDINGS_V4_BODY}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(document)) == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param([{"products": "105929"}], id="products-not-list"),
        pytest.param([{"products": [{"arrangementId": "AA1"}]}], id="product-without-account"),
        pytest.param([{"products": [{"accountId": True}]}], id="boolean-account-id"),
    ],
)
def test_parse_accounts_holdings_v4_rejects(body: Any) -> None:
    with pytest.raises(CoreProtocolError):
        _wire.parse_accounts(body)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"accountId": "1"}, id="object"),
        pytest.param([{"arrangementId": "AA1"}], id="no-account-id"),
        pytest.param(["105929"], id="not-objects"),
    ],
)
def test_parse_accounts_rejects(body: Any) -> None:
    with pytest.raises(CoreProtocolError):
        _wire.parse_accounts(body)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(b'{"header": {}, "body": {"n": NaN}}', "nan", id="nan"),
        pytest.param(
            b'{"header": {}, "body": {"n": 123456789012345678901234567890}}',
            123456789012345678901234567890,
            id="big-int-exact",
        ),  # fmt: skip
        pytest.param(b'{"header": {}, "body": {"n": 1}}', 1, id="small-int"),
    ],
)
def test_what_json_reads_is_read_exactly(content: bytes, expected: object) -> None:
    envelope = _wire.decode(_wire.Answer(200, {}, content))
    assert envelope is not None
    value = envelope.document["body"]["n"]
    assert (str(value) if expected == "nan" else value) == expected


@pytest.mark.parametrize("content", [b"[1]", b"not json", b"\xff\xfe"])
def test_non_objects_and_non_json_are_not_envelopes(content: bytes) -> None:
    assert _wire.decode(_wire.Answer(200, {}, content)) is None


@pytest.mark.parametrize("value", ["1988-02-30", "1988-13-01", "19880230", "1988/02/01"])
def test_impossible_dates_are_protocol_errors(value: str) -> None:
    with pytest.raises(CoreProtocolError):
        _wire.parse_customer({"customerId": "7", "dateOfBirth": value, "customerStatus": 1}, "7")


def test_an_answer_nested_past_the_parser_limit_is_a_bad_response() -> None:
    """100,000 nested arrays (a hostile or broken gateway): CORE_BAD_RESPONSE in the lookup, not
    an unexpected RecursionError that the pipeline reports as INTERNAL_ERROR at a later stage."""
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(CoreProtocolError):
        _wire.interpret(_response(200, deep))
    nested_body = b'{"header":{"status":"success"},"body":' + deep + b"}"
    with pytest.raises(CoreProtocolError):
        _wire.interpret(_response(200, nested_body))
