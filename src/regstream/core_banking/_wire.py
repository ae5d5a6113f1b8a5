"""T24 (IRIS) wire format: envelopes, error classification and record parsing.

Kept apart from the HTTP client so the mapping from an answer to an outcome is one table-like
function (``classify_error``) that reads top to bottom. Nothing here does I/O or logs.

Decisions:

- ``No records were found`` (IRIS's empty-enquiry message) wins over the HTTP status: it may
  come as a 200 with ``status: failed``, a 400 or a 404. For arrangements it means "no
  accounts", for a customer "not found".
- A 404 counts as ``CustomerNotFound`` only when it carries a T24 error envelope. A bare 404
  (HTML from a proxy) means our base URL or path is wrong: ``CoreRequestError``, so a
  misconfiguration is not reported as thousands of unknown customers.
- 500 ``TGVCP-001`` ("no response from Transact") is maintenance when the gateway says so:
  a ``Retry-After`` header or a message mentioning COB / close of business / batch /
  maintenance. Otherwise it is ``CoreUnavailable``. Any 503 with ``Retry-After`` is maintenance.
- Only 500 ``TGVCP-001``, 502, 503, 504, timeouts and connection errors are retried within a
  call (``is_transient``); other 5xx fail fast but stay ``retryable`` for a later re-run.
- A customer body whose ``customerId`` differs from the one asked for is a protocol error:
  validating the wrong person is worse than failing.
- The functions read an answer through ``Response`` (status, headers looked up by lower-cased
  name, body bytes): the client hands over an ``Answer`` built from the aiohttp response.
- Transport failures (aiohttp's ``ClientError`` tree and ``ssl.SSLError``) are translated in
  one place, ``map_transport_error``:
  timeouts are ``CoreTimeout``; refused, reset or dropped connections and proxy failures
  ``CoreUnavailable``; a body past the size cap or that does not decompress
  ``CoreProtocolError``; a request aiohttp cannot send ``CoreRequestError``.
- TLS failures are ``CoreTlsError`` (``CORE_TLS_ERROR``): the server's certificate not trusted
  (or not for that host), a TLS alert from the core (it refused our client certificate, or
  none was sent), or a handshake the core broke off. Some servers refuse a client certificate
  without an alert, by closing the connection right after the TLS 1.3 handshake (Python's
  asyncio servers, our simulator included): a *new* TLS connection that ends with no answer is
  counted as a TLS failure too (``fresh_tls``). A server that crashes at that very moment is
  reported as a TLS failure for that one call: the price of a clear code for the common case.
- Holdings v4 (``../shared/t24-spec/holdings-v4.openapi.json``): ``body`` is a list of
  holdings, each with a ``products`` list of accounts carrying the same field names as an
  arrangement. ``parse_accounts`` reads both shapes, item by item: an item with ``products``
  and no ``accountId`` is a holding, its products are the accounts. Paging counts ``body``
  items (``total_size`` counts holdings in v4, arrangements otherwise).
"""

from __future__ import annotations

import email.utils
import json
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Protocol

import aiohttp

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
from regstream.domain.core_records import CoreAccount, CoreCustomer, LegalId

NO_RECORDS_MARKER = "no records were found"
_MAINTENANCE_WORDS = re.compile(r"\b(cob|close of business|batch|maintenance)\b", re.IGNORECASE)
_TRANSIENT_STATUSES = frozenset({502, 503, 504})


class Response(Protocol):
    """What the classification reads of an HTTP answer (header names lower-cased)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete answer as the client read it (``headers`` looked up by lower-cased name)."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes


class BodyTooLarge(Exception):
    """The answer's body passed the client's size cap (reading stopped there)."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded T24 answer: the ``header`` object and the raw JSON document."""

    header: dict[str, Any]
    document: dict[str, Any]

    @property
    def error(self) -> dict[str, Any]:
        error = self.document.get("error")
        return error if isinstance(error, dict) else {}

    @property
    def t24_code(self) -> str | None:
        code = self.error.get("code")
        return code if isinstance(code, str) and code else None

    @property
    def t24_message(self) -> str:
        message = self.error.get("message")
        return message if isinstance(message, str) else ""

    @property
    def failed(self) -> bool:
        return self.header.get("status") == "failed" or bool(self.error)

    @property
    def no_records(self) -> bool:
        return NO_RECORDS_MARKER in self.t24_message.casefold()


def decode(response: Response) -> Envelope | None:
    """The response as a T24 envelope, or ``None`` when it is not a JSON object."""
    # json, not orjson: orjson reads an integer past 64 bits as a float (a long account or
    # customer number sent unquoted would come back rounded); json keeps it exact.
    try:
        document = json.loads(response.content)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: nested deeper than the parser's recursion limit (a hostile or broken
        # answer); it is a bad response like any other, never an internal error
        return None
    if not isinstance(document, dict):
        return None
    header = document.get("header")
    return Envelope(header=header if isinstance(header, dict) else {}, document=document)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date); ``None`` if absent."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def classify_error(response: Response, envelope: Envelope | None) -> CoreBankingError:
    """Map a non-success answer to our exception (``NoRecords`` is handled before this)."""
    status = response.status_code
    t24_code = envelope.t24_code if envelope else None
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    fields: dict[str, Any] = {"http_status": status, "t24_code": t24_code}

    if status in (401, 403):
        return CoreAuthError(**fields)
    if status == 404 or (t24_code == "TGVCP-002" and 200 <= status < 500):
        if envelope is None:
            return CoreRequestError(
                "Core banking endpoint not found (check the base URL)", **fields
            )
        return CustomerNotFound(**fields)
    if status == 503 and retry_after is not None:
        return CoreMaintenance(retry_after=retry_after, **fields)
    if status == 500 and t24_code == "TGVCP-001":
        message = envelope.t24_message if envelope else ""
        if retry_after is not None or _MAINTENANCE_WORDS.search(message):
            return CoreMaintenance(retry_after=retry_after, **fields)
        return CoreUnavailable(**fields)
    if 500 <= status < 600:
        return CoreUnavailable(retry_after=retry_after, **fields)
    if 400 <= status < 500:
        return CoreRequestError(**fields)
    # 1xx/3xx, or a 2xx that says "failed": not an answer we understand.
    return CoreProtocolError(**fields)


def is_transient(exc: CoreBankingError) -> bool:
    """Whether retrying the same request within this call may help."""
    if isinstance(exc, CoreTimeout):
        return True
    if not isinstance(exc, CoreUnavailable | CoreMaintenance):
        return False
    status = exc.http_status
    if status is None:  # connection refused / reset / dropped before an answer
        return True
    return status in _TRANSIENT_STATUSES or (status == 500 and exc.t24_code == "TGVCP-001")


def map_transport_error(exc: BaseException, *, fresh_tls: bool = False) -> CoreBankingError:
    """Translate a transport exception (no usable answer received) into ours.

    ``fresh_tls``: this attempt opened a new TLS connection (so a connection that ends with no
    answer is the core refusing the TLS session, not a kept-alive connection gone stale).
    """
    if isinstance(exc, TimeoutError):  # aiohttp's connect, pool and read timeouts are ones too
        return CoreTimeout()
    if isinstance(exc, BodyTooLarge):
        return CoreProtocolError()
    if isinstance(exc, aiohttp.ClientPayloadError):
        # a body that does not decompress is not a T24 answer; one cut short is a dropped line
        undecodable = "content-encoding" in str(exc).lower()
        return CoreProtocolError() if undecodable else CoreUnavailable()
    if (tls_error := _tls_failure(exc)) is not None:
        return CoreTlsError(detail=_tls_detail(tls_error))
    if fresh_tls and isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return CoreTlsError(detail="closed after the handshake, no answer")
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return CoreRequestError()  # an URL we cannot send: our configuration
    if isinstance(exc, aiohttp.ClientError | ssl.SSLError | OSError):
        # refused / unreachable, the proxy refused the tunnel, the server hung up or reset, or
        # a malformed status line, headers or framing (a broken gateway: may work next time)
        return CoreUnavailable()
    return CoreRequestError()  # anything else: our configuration or code


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc`` when it is a TLS failure other than a plain hang-up."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error = exc.certificate_error
        return error if isinstance(error, ssl.SSLError) else ssl.SSLError(str(error))
    in_connect = isinstance(exc, aiohttp.ClientConnectorError)
    cause: BaseException | None = exc
    for _ in range(8):  # a cause chain is short; bounded all the same
        if cause is None:
            return None
        if isinstance(cause, ssl.SSLError):
            # During connect, any TLS error (an EOF in the handshake: the core broke it off);
            # after it, a bare EOF or close_notify is the connection ending, not TLS refusing.
            hang_up = isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError)
            return cause if in_connect or not hang_up else None
        cause = cause.__cause__ or cause.__context__
    return None


def _tls_detail(error: ssl.SSLError) -> str:
    """OpenSSL's reason (and the verification's message): names and codes, no data of ours."""
    # (the ssl module sets both attributes on the errors it raises; getattr for any other)
    reason = getattr(error, "reason", None) or type(error).__name__
    verify_message = getattr(error, "verify_message", None)
    if verify_message:
        reason = f"{reason}: {verify_message}"
    return str(reason)[:160]


def interpret(response: Response) -> Envelope | None:
    """The envelope of a good answer, ``None`` for "No records were found", else raise."""
    envelope = decode(response)
    status = response.status_code
    if envelope is not None and envelope.no_records and 200 <= status < 500:
        return None
    if 200 <= status < 300 and envelope is not None and not envelope.failed:
        if "body" not in envelope.document:
            raise CoreProtocolError(http_status=status)
        return envelope
    if 200 <= status < 300 and envelope is None:
        raise CoreProtocolError(http_status=status)
    raise classify_error(response, envelope)


def should_retry(exc: BaseException) -> bool:
    return (
        isinstance(exc, CoreBankingError) and not isinstance(exc, CircuitOpen) and is_transient(exc)
    )


# --- records ------------------------------------------------------------------------------------


def parse_customer(body: Any, customer_id: str) -> CoreCustomer:
    if not isinstance(body, dict):
        raise CoreProtocolError("Core banking customer body is not an object")
    found_id = body.get("customerId")
    if found_id is not None and str(found_id) != customer_id:
        raise CoreProtocolError("Core banking answered with another customer's record")
    names = tuple(
        name
        for item in _list_of_dicts(body.get("customerNames"), "customerNames")
        if isinstance(name := item.get("customerName"), str) and name.strip()
    )
    legal_ids = tuple(
        LegalId(
            legal_id=str(item.get("legalId", "")),
            document_name=str(item.get("legalDocumentName", "")),
        )
        for item in _list_of_dicts(body.get("legalDetails"), "legalDetails")
        if item.get("legalId")
    )
    devices = _list_of_dicts(body.get("communicationDevices"), "communicationDevices")
    phones = tuple(
        str(value)
        for item in devices
        for key in ("phoneNumber", "smsNumber", "mobileNumber")
        if (value := item.get(key))
    )
    emails = tuple(str(item["email"]) for item in devices if item.get("email"))
    return CoreCustomer(
        customer_id=customer_id,
        names=names,
        date_of_birth=_parse_date(body.get("dateOfBirth")),
        customer_status=_text(body.get("customerStatus")),
        posting_restrict=_text(body.get("postingRestrict")),
        kyc_complete=_text(body.get("kycComplete")).upper() in {"Y", "YES", "TRUE"},
        legal_ids=legal_ids,
        phones=phones,
        emails=emails,
    )


def parse_accounts(body: Any) -> list[CoreAccount]:
    """The accounts of an arrangements list or of a holdings v4 list (see the module notes)."""
    accounts: list[CoreAccount] = []
    for item in _list_of_dicts(body, "body"):
        if "products" in item and "accountId" not in item:  # a holdings v4 holding
            accounts.extend(
                _account(product) for product in _list_of_dicts(item["products"], "products")
            )
        else:
            accounts.append(_account(item))
    return accounts


def page_rows(body: Any) -> int:
    """How many rows of ``total_size`` a page's ``body`` holds (holdings or arrangements)."""
    return len(body) if isinstance(body, list) else 0


def _account(item: dict[str, Any]) -> CoreAccount:
    account_id = item.get("accountId")
    if not isinstance(account_id, str | int) or isinstance(account_id, bool) or not str(account_id):
        raise CoreProtocolError("Core banking account without accountId")
    return CoreAccount(
        account_id=str(account_id),
        arrangement_id=_text(item.get("arrangementId")),
        arrangement_status=_text(item.get("arrangementStatus")).upper(),
        dormancy_status=_text(item.get("dormancyStatus")),
        iban=_text(item.get("accountIBAN")),
        product_id=_text(item.get("productId")),
        currency_id=_text(item.get("currencyId")),
    )


def _list_of_dicts(value: Any, name: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise CoreProtocolError(f"Core banking field {name} is not a list of objects")
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value).strip()
    raise CoreProtocolError("Core banking sent a non-scalar where text was expected")


def _parse_date(value: Any) -> date | None:
    """ISO ``YYYY-MM-DD`` (REST) or T24's native ``YYYYMMDD``."""
    text = _text(value)
    if not text:
        return None
    if len(text) == 10 and text[4] == text[7] == "-" and text.replace("-", "").isdigit():
        # the usual shape, without strptime (~10x the CPU; two dates per customer record)
        try:
            return date(int(text[:4]), int(text[5:7]), int(text[8:]))
        except ValueError:
            raise CoreProtocolError("Core banking sent an unreadable date") from None
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise CoreProtocolError("Core banking sent an unreadable date")
