"""Request and response schemas (camelCase JSON, like the seed).

``RegistrationCreate`` validates every field with the rules of DOMAIN.md section 2; a bad
request gets a 422 naming each bad field. Responses never carry a national id, full phone number
or e-mail in clear: ``RegistrationRead`` holds their masked forms; the date of birth is only in
``RegistrationDetail`` (the detail view).
"""

from __future__ import annotations

import re
import unicodedata
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from regstream.domain import kyc
from regstream.domain.enums import IdType, RegistrationStatus

# ASCII only: ``\d`` also matches other scripts' digits, and ``$`` matches before a final "\n"
_DIGITS = re.compile(r"[0-9]+")
_IBAN = re.compile(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}")
# An address a mail system and a T24 record accept: ASCII, no spaces, quotes, angle brackets or
# control/bidi characters (U+202E would show the address reversed to the operator).
_EMAIL = re.compile(
    r"[a-z0-9!#$%&*+/=?^_`{|}~.-]{1,64}@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}"
)


def storable(value: str) -> str:
    """Text every supported database stores as given: PostgreSQL refuses NUL and unpaired
    surrogates (SQLite would store them), so they are invalid input (422), never a 500."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must not contain unpaired surrogates") from None
    return value


#: A query parameter that reaches the database: ``Annotated[str | None, Query(...), Storable]``.
Storable = AfterValidator(lambda value: value if value is None else storable(value))


class StorableModel(BaseModel):
    """A request body whose every text field (also in lists) is checked by ``storable`` before
    the field's own rules."""

    @field_validator("*", mode="before")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        if isinstance(value, str):
            return storable(value)
        if isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    storable(item)
        return value


class CamelModel(StorableModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


def _clean_name(value: str) -> str:
    value = unicodedata.normalize("NFC", value).strip()
    value = re.sub(r"\s+", " ", value)
    if not value:
        raise ValueError("must not be empty")
    for ch in value:
        cat = unicodedata.category(ch)
        if cat.startswith("C") or cat in {"Zl", "Zp"}:
            raise ValueError("must not contain control or invisible characters")
        if not (cat.startswith("L") or cat.startswith("M") or ch in " -'.’"):
            raise ValueError("may contain letters, spaces, hyphens, apostrophes and dots only")
    return value


class RegistrationCreate(CamelModel):
    customer_number: str = Field(min_length=1, max_length=10, examples=["100231"])
    account_number: str | None = Field(None, max_length=34, examples=["105929"])
    first_name: str = Field(min_length=1, max_length=100)
    last_name: str = Field(min_length=1, max_length=100)
    date_of_birth: date
    national_id: str = Field(min_length=4, max_length=40)
    id_type: IdType = IdType.NATIONAL_ID
    phone: str = Field(min_length=3, max_length=24, examples=["+254712345678"])
    email: str | None = Field(None, max_length=254)
    device_id: str | None = Field(None, max_length=128)

    @field_validator("customer_number")
    @classmethod
    def _cif(cls, value: str) -> str:
        if not _DIGITS.fullmatch(value):
            raise ValueError("must be 1-10 digits")
        return value

    @field_validator("account_number")
    @classmethod
    def _account(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        compact = value.replace(" ", "").upper()
        if _DIGITS.fullmatch(compact) and 5 <= len(compact) <= 16:
            return compact
        if _IBAN.fullmatch(compact):
            return compact
        raise ValueError("must be 5-16 digits or an IBAN")

    @field_validator("first_name", "last_name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _clean_name(value)

    @field_validator("date_of_birth")
    @classmethod
    def _dob(cls, value: date) -> date:
        if value >= date.today() or value.year < 1900:
            raise ValueError("must be a past date after 1900")
        return value

    @field_validator("national_id")
    @classmethod
    def _national_id(cls, value: str) -> str:
        value = value.strip().upper()
        if not re.fullmatch(r"[A-Z0-9-]{4,40}", value):
            raise ValueError("must be 4-40 letters, digits or hyphens")
        return value

    @field_validator("phone")
    @classmethod
    def _phone(cls, value: str) -> str:
        try:
            return kyc.normalize_phone(value)
        except ValueError:
            raise ValueError("must be an E.164 number: + then 2-15 digits") from None

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        value = value.strip().lower()
        if not _EMAIL.fullmatch(value):
            raise ValueError("must be an e-mail address")
        return value

    @field_validator("device_id")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", value):
            raise ValueError("may contain letters, digits and . _ : - only")
        return value


class ProcessLogItem(CamelModel):
    seq: int
    stage: str | None
    status: str
    message: str
    timestamp: int
    details: dict[str, Any] | None = None


class RegistrationResult(CamelModel):
    message: str
    details: dict[str, Any]


class RegistrationRead(CamelModel):
    id: int
    status: RegistrationStatus
    current_stage: str | None
    in_progress: bool
    customer_number: str | None = Field(description="masked: ****31")
    account_number: str | None = Field(description="masked: ****5929")
    first_name: str
    last_name: str
    id_type: str
    national_id: str | None = Field(description="masked: ****1236")
    phone: str | None = Field(description="masked: +254*******78")
    email: str | None = Field(description="masked: m***@example.com")
    seq: int
    result: RegistrationResult | None
    retryable: bool
    created_at: str
    updated_at: str


class RegistrationDetail(RegistrationRead):
    date_of_birth: date
    process_log: list[ProcessLogItem]


class RegistrationPage(CamelModel):
    items: list[RegistrationRead]
    total: int
    page: int
    page_size: int


class ProcessAccepted(CamelModel):
    registration_id: int
    status: Literal["PENDING"] = "PENDING"
    accepted: bool = True


class BulkProcessRequest(CamelModel):
    """Bulk validation: the registrations to validate (each at most once; up to 500)."""

    registration_ids: list[Annotated[int, Field(ge=1, le=2**53)]] = Field(
        min_length=1, max_length=500
    )


class BulkConflict(CamelModel):
    registration_id: int
    status: str
    in_progress: bool
    message: str


class BulkProcessResult(CamelModel):
    """``accepted``: started now (updates follow on the stream); ``conflicts``: running already or
    final; ``notFound``: no such registration."""

    accepted: list[int]
    conflicts: list[BulkConflict]
    not_found: list[int]


class ErrorBody(BaseModel):
    """Every error answer: a stable ``error`` code, a human ``message`` and the request id."""

    error: str
    message: str
    request_id: str | None = Field(None, alias="requestId")
    fields: list[dict[str, str]] | None = None
    registration: RegistrationRead | None = None

    model_config = ConfigDict(populate_by_name=True)
