"""KYC rules of the t24_lookup stage (regstream.domain.kyc)."""

from __future__ import annotations

import unicodedata
from dataclasses import replace
from datetime import date

import pytest

from regstream.domain import kyc
from regstream.domain.core_records import CoreAccount, CoreCustomer, LegalId
from regstream.domain.errors import ErrorCode, ValidationFailure
from regstream.domain.kyc import (
    check_customer,
    count_active_accounts,
    normalize_account_number,
    normalize_name,
    normalize_phone,
)
from regstream.domain.models import Applicant

APPLICANT = Applicant(
    customer_number="100231",
    first_name="Maria",
    last_name="Santos",
    date_of_birth=date(1988, 4, 2),
    national_id="27841236",
    id_type="NATIONAL.ID",
    phone="+254712345678",
)

CUSTOMER = CoreCustomer(
    customer_id="100231",
    names=("Maria Santos",),
    date_of_birth=date(1988, 4, 2),
    customer_status="1",
    posting_restrict="",
    kyc_complete=True,
    legal_ids=(
        LegalId(legal_id="X1234567", document_name="PASSPORT"),
        LegalId(legal_id="27841236", document_name="NATIONAL.ID"),
    ),
    phones=("+254 712 345 678",),
)


# --- normalize_phone -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("+254712345678", "+254712345678", id="already-e164"),
        pytest.param("+254 712 345 678", "+254712345678", id="spaces"),
        pytest.param("+254-712-345-678", "+254712345678", id="dashes"),
        pytest.param("+1 (415) 555-0100", "+14155550100", id="parentheses"),
        pytest.param("00254712345678", "+254712345678", id="double-zero-prefix"),
        pytest.param("0044 20 7946 0000", "+442079460000", id="double-zero-with-spaces"),
        pytest.param("\t+254712345678 ", "+254712345678", id="surrounding-whitespace"),
        pytest.param("+12", "+12", id="shortest"),
        pytest.param("+123456789012345", "+123456789012345", id="longest-15-digits"),
    ],
)
def test_normalize_phone(raw: str, expected: str) -> None:
    assert normalize_phone(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("0712345678", id="national-form"),
        pytest.param("254712345678", id="no-plus"),
        pytest.param("+0712345678", id="leading-zero-country"),
        pytest.param("+1", id="too-short"),
        pytest.param("+1234567890123456", id="sixteen-digits"),
        pytest.param("+25471234567a", id="letter"),
        pytest.param("+254.712.345.678", id="dots"),
        pytest.param("", id="empty"),
    ],
)
def test_normalize_phone_rejects(raw: str) -> None:
    with pytest.raises(ValueError, match="E.164") as info:
        normalize_phone(raw)
    if raw:
        assert raw not in str(info.value)


def test_normalize_phone_rejects_non_string() -> None:
    with pytest.raises(TypeError):
        normalize_phone(254712345678)  # type: ignore[arg-type]


# --- normalize_name ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("Maria Santos", ("maria", "santos"), id="plain"),
        pytest.param("  MARIA   santos ", ("maria", "santos"), id="case-and-whitespace"),
        pytest.param("José Müller", ("jose", "muller"), id="accents"),
        pytest.param("Zoë Brontë-Kariuki", ("zoe", "bronte", "kariuki"), id="hyphen-splits"),
        pytest.param("O'Brien", ("obrien",), id="apostrophe-dropped"),
        pytest.param("Søren Łukasz", ("soren", "lukasz"), id="non-decomposing-letters"),
        pytest.param("Straße", ("strasse",), id="casefold-sharp-s"),
        pytest.param("J. R.", ("j", "r"), id="initials"),
        pytest.param("   ", (), id="blank"),
    ],
)
def test_normalize_name(raw: str, expected: tuple[str, ...]) -> None:
    assert normalize_name(raw) == expected


def test_normalize_account_number() -> None:
    assert normalize_account_number("gb29 nwbk-6016.1331 9268 19") == "GB29NWBK60161331926819"


# --- check_customer ------------------------------------------------------------------------------


def test_check_customer_accepts_matching_record() -> None:
    check_customer(APPLICANT, CUSTOMER)  # does not raise


@pytest.mark.parametrize(
    ("applicant", "customer"),
    [
        pytest.param(APPLICANT, replace(CUSTOMER, names=("SANTOS MARIA",)), id="token-order"),
        pytest.param(APPLICANT, replace(CUSTOMER, names=("María  Sántos",)), id="accents-spaces"),
        pytest.param(
            APPLICANT,
            replace(CUSTOMER, names=("M SANTOS", "Maria Santos")),
            id="any-of-several-names",
        ),
        pytest.param(
            replace(APPLICANT, first_name="Ana Maria"),
            replace(CUSTOMER, names=("Santos Ana-Maria",)),
            id="hyphenated-vs-spaced",
        ),
        pytest.param(APPLICANT, replace(CUSTOMER, phones=("00254712345678",)), id="phone-00"),
        pytest.param(
            APPLICANT,
            replace(CUSTOMER, phones=("0712345678", "+254712345678")),
            id="one-of-several-phones-and-bad-core-phone-ignored",
        ),
        pytest.param(
            replace(APPLICANT, national_id="X1234567", id_type="PASSPORT"),
            CUSTOMER,
            id="passport",
        ),
        pytest.param(
            APPLICANT,
            replace(CUSTOMER, legal_ids=(LegalId("27841236", "national.id"),)),
            id="document-type-case",
        ),
    ],
)
def test_check_customer_tolerates(applicant: Applicant, customer: CoreCustomer) -> None:
    check_customer(applicant, customer)  # does not raise


@pytest.mark.parametrize(
    "customer",
    [
        pytest.param(replace(CUSTOMER, customer_status="2"), id="status-inactive"),
        pytest.param(replace(CUSTOMER, customer_status=""), id="status-missing"),
        pytest.param(replace(CUSTOMER, posting_restrict="1"), id="posting-restrict"),
        pytest.param(
            replace(CUSTOMER, posting_restrict="21", date_of_birth=date(1970, 1, 1)),
            id="restriction-wins-over-kyc",
        ),
    ],
)
def test_check_customer_restricted(customer: CoreCustomer) -> None:
    with pytest.raises(ValidationFailure) as info:
        check_customer(APPLICANT, customer)
    assert info.value.code is ErrorCode.CUSTOMER_RESTRICTED
    assert info.value.fields == []


@pytest.mark.parametrize(
    ("applicant", "customer", "fields"),
    [
        pytest.param(
            APPLICANT, replace(CUSTOMER, date_of_birth=date(1988, 4, 3)), ["dateOfBirth"], id="dob"
        ),
        pytest.param(
            APPLICANT, replace(CUSTOMER, date_of_birth=None), ["dateOfBirth"], id="dob-missing"
        ),
        pytest.param(
            replace(APPLICANT, national_id="27841237"), CUSTOMER, ["nationalId"], id="id-differs"
        ),
        pytest.param(
            replace(APPLICANT, national_id="X1234567"),
            CUSTOMER,
            ["nationalId"],
            id="id-of-other-document-type",
        ),
        pytest.param(
            replace(APPLICANT, national_id="2784123"),
            CUSTOMER,
            ["nationalId"],
            id="id-prefix-is-not-enough",
        ),
        pytest.param(APPLICANT, replace(CUSTOMER, legal_ids=()), ["nationalId"], id="no-legal-ids"),
        pytest.param(
            replace(APPLICANT, phone="+254712345679"), CUSTOMER, ["phone"], id="phone-differs"
        ),
        pytest.param(
            APPLICANT, replace(CUSTOMER, phones=("0712345678",)), ["phone"], id="core-phone-local"
        ),
        pytest.param(APPLICANT, replace(CUSTOMER, phones=()), ["phone"], id="no-core-phone"),
        pytest.param(
            replace(APPLICANT, phone="0712345678"), CUSTOMER, ["phone"], id="applicant-phone-bad"
        ),
        pytest.param(
            replace(APPLICANT, first_name="Mario"), CUSTOMER, ["firstName"], id="first-name"
        ),
        pytest.param(replace(APPLICANT, last_name="Santo"), CUSTOMER, ["lastName"], id="last-name"),
        pytest.param(
            APPLICANT,
            replace(CUSTOMER, names=("Maria Jose Santos",)),
            ["firstName", "lastName"],
            id="unsubmitted-middle-name",
        ),
        pytest.param(
            APPLICANT, replace(CUSTOMER, names=()), ["firstName", "lastName"], id="no-core-name"
        ),
        pytest.param(
            replace(APPLICANT, first_name=" ", last_name="Santos"),
            CUSTOMER,
            ["firstName"],
            id="blank-first-name",
        ),
        pytest.param(
            replace(APPLICANT, first_name="Mario", national_id="1", phone="+254700000000"),
            replace(CUSTOMER, date_of_birth=date(1999, 9, 9)),
            ["firstName", "dateOfBirth", "nationalId", "phone"],
            id="all-fields-in-order",
        ),
    ],
)
def test_check_customer_kyc_mismatch(
    applicant: Applicant, customer: CoreCustomer, fields: list[str]
) -> None:
    with pytest.raises(ValidationFailure) as info:
        check_customer(applicant, customer)
    assert info.value.code is ErrorCode.KYC_MISMATCH
    assert info.value.fields == fields
    assert info.value.retryable is False


def test_kyc_mismatch_message_carries_no_values() -> None:
    applicant = replace(APPLICANT, first_name="Canaryname", national_id="99887766")
    with pytest.raises(ValidationFailure) as info:
        check_customer(applicant, CUSTOMER)
    text = str(info.value) + repr(info.value.fields)
    for value in ("Canaryname", "99887766", "+254712345678", "1988"):
        assert value not in text


# --- count_active_accounts -----------------------------------------------------------------------


def _account(
    account_id: str, status: str = "AUTH", dormancy: str = "", iban: str = ""
) -> CoreAccount:
    return CoreAccount(
        account_id=account_id,
        arrangement_id=f"AA{account_id}",
        arrangement_status=status,
        dormancy_status=dormancy,
        iban=iban,
    )


ACCOUNTS = [
    _account("105929", iban="KE00SIMB00000000105929"),
    _account("105930"),
    _account("104417", dormancy="DORMANT"),
    _account("104418", status="CLOSE"),
    _account("104419", status="UNAUTH"),
    _account("104420", dormancy="UNCLAIMED"),
]


@pytest.mark.parametrize(
    ("accounts", "account_number", "expected"),
    [
        pytest.param(ACCOUNTS, None, 2, id="no-account-number"),
        pytest.param(ACCOUNTS, "", 2, id="blank-account-number"),
        pytest.param(ACCOUNTS, "105929", 2, id="account-id"),
        pytest.param(ACCOUNTS, " 105-930 ", 2, id="account-id-with-noise"),
        pytest.param(ACCOUNTS, "ke00 simb 0000 0000 1059 29", 2, id="iban-grouped-lowercase"),
        pytest.param(ACCOUNTS + [_account("105929")], None, 2, id="duplicate-rows-counted-once"),
        pytest.param([_account(str(n)) for n in range(60)], None, 60, id="many"),
    ],
)
def test_count_active_accounts(
    accounts: list[CoreAccount], account_number: str | None, expected: int
) -> None:
    assert count_active_accounts(accounts, account_number) == expected


@pytest.mark.parametrize(
    ("accounts", "account_number", "code"),
    [
        pytest.param([], None, ErrorCode.NO_ACTIVE_ACCOUNTS, id="no-accounts"),
        pytest.param(ACCOUNTS[2:], None, ErrorCode.NO_ACTIVE_ACCOUNTS, id="only-excluded"),
        pytest.param(
            ACCOUNTS[2:], "104417", ErrorCode.NO_ACTIVE_ACCOUNTS, id="no-active-wins-over-account"
        ),
        pytest.param(ACCOUNTS, "999999", ErrorCode.ACCOUNT_NOT_OWNED, id="not-listed"),
        pytest.param(ACCOUNTS, "0105929", ErrorCode.ACCOUNT_NOT_OWNED, id="leading-zero-differs"),
        pytest.param(ACCOUNTS, "104417", ErrorCode.ACCOUNT_INACTIVE, id="dormant"),
        pytest.param(ACCOUNTS, "104418", ErrorCode.ACCOUNT_INACTIVE, id="closed"),
        pytest.param(ACCOUNTS, "104419", ErrorCode.ACCOUNT_INACTIVE, id="unauthorised"),
        pytest.param(ACCOUNTS, "104420", ErrorCode.ACCOUNT_INACTIVE, id="unclaimed"),
    ],
)
def test_count_active_accounts_fails(
    accounts: list[CoreAccount], account_number: str | None, code: ErrorCode
) -> None:
    with pytest.raises(ValidationFailure) as info:
        count_active_accounts(accounts, account_number)
    assert info.value.code is code


def test_normalize_name_ascii_shortcut_is_the_full_fold() -> None:
    """ASCII names skip NFKD and the combining-mark filter (nothing to strip): the tokens must
    be those of the full path, for every ASCII character between letters and in every case."""
    reference_fold = kyc._NAME_FOLD  # the same table, applied after NFKD as before the shortcut

    def full_path(raw: str) -> tuple[str, ...]:
        folded = unicodedata.normalize("NFKD", raw.casefold())
        stripped = "".join(ch for ch in folded if not unicodedata.combining(ch))
        cleaned = kyc._NAME_DROPPED.sub("", stripped.translate(reference_fold))
        return tuple(token for token in kyc._NAME_SEPARATORS.split(cleaned) if token)

    for code in range(128):
        for raw in (f"Ab{chr(code)}Cd", f"{chr(code)} x{chr(code)}Y "):
            assert kyc.normalize_name(raw) == full_path(raw), repr(raw)
