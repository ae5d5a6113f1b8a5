"""KYC rules of the ``t24_lookup`` stage: does the core's record back the applicant?

Pure functions, no I/O; they raise ``ValidationFailure`` with a stable code and, for
``KYC_MISMATCH``, the camelCase names of the applicant fields that differ (never values).

Decisions (DOMAIN.md section 3 leaves these to us):

- Order of checks: customer restriction first (status not ``"1"`` or a posting restriction),
  then every KYC field, so one answer names *all* mismatching fields.
- Names: applicant first + last name tokens must equal, as a multiset, the tokens of at least
  one of the customer's names (case-, accent- and whitespace-insensitive, order free). Hyphens
  separate tokens ("Bronte-Kariuki" == "Bronte Kariuki"); apostrophes and dots are dropped
  ("O'Brien" == "OBrien"). Extra tokens on the core side (an unsubmitted middle name) are a
  mismatch: the form asks for the names "as on the ID document". When no name matches we blame
  the part(s) whose tokens are missing from the closest core name, or both parts when every
  applicant token is present but the core name has more.
- Date of birth: exact. National id: exact (surrounding whitespace ignored) against the legal
  ids whose document type equals ``Applicant.id_type`` (type compared case-insensitively).
- Phone: both sides E.164-normalised; core phones that are not in international form are
  ignored (a bank data-quality issue, reported as a phone mismatch rather than guessed at).
- Accounts: the same account may be listed twice when T24's paging cache shifts; active
  accounts are counted once per ``account_id``. ``account_number`` is compared after removing
  spaces, dashes and dots and upper-casing (IBANs are printed in groups of four); leading zeros
  are significant.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

from regstream.domain.core_records import CoreAccount, CoreCustomer
from regstream.domain.errors import ErrorCode, ValidationFailure
from regstream.domain.models import Applicant

__all__ = [
    "ACTIVE_CUSTOMER_STATUS",
    "check_customer",
    "count_active_accounts",
    "normalize_account_number",
    "normalize_name",
    "normalize_phone",
]

#: ``CUSTOMER.STATUS`` value of an active customer in the model bank's code table.
ACTIVE_CUSTOMER_STATUS = "1"

_E164 = re.compile(r"^\+[1-9]\d{1,14}$")
_PHONE_NOISE = re.compile(r"[\s\-()]")
_ACCOUNT_NOISE = re.compile(r"[\s\-.]")
_NAME_SEPARATORS = re.compile(r"[\s\-‐‑‒–—]+")
_NAME_DROPPED = re.compile(r"['’`´.]")
# Letters that Unicode does not decompose into base letter + accent.
_NAME_FOLD = str.maketrans(
    {"ø": "o", "ł": "l", "đ": "d", "ħ": "h", "ı": "i", "æ": "ae", "œ": "oe", "þ": "th"}
)


def normalize_phone(raw: str) -> str:
    """Return ``raw`` in E.164 form (``+`` then 2-15 digits) or raise ``ValueError``.

    Spaces, dashes and parentheses are removed and a ``00`` international prefix becomes ``+``:
    ``normalize_phone("00254 (712) 345-678") == "+254712345678"``. National forms such as
    ``0712...`` are rejected: we do not guess the country.
    """
    if not isinstance(raw, str):
        raise TypeError("phone must be a string")
    phone = _PHONE_NOISE.sub("", raw)
    if phone.startswith("00"):
        phone = "+" + phone[2:]
    if not _E164.fullmatch(phone):
        # The value itself is personal data: keep it out of the message.
        raise ValueError("phone number must be in international E.164 form: + then 2-15 digits")
    return phone


def normalize_name(raw: str) -> tuple[str, ...]:
    """Split a name into comparable tokens: accents stripped, case-folded, punctuation-free.

    ``normalize_name("  José  Brontë-Kariuki ") == ("jose", "bronte", "kariuki")``.
    """
    if not isinstance(raw, str):
        raise TypeError("name must be a string")
    folded = raw.casefold()
    if not folded.isascii():  # ASCII has no accents to strip: NFKD would give it back unchanged
        decomposed = unicodedata.normalize("NFKD", folded)
        folded = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    cleaned = _NAME_DROPPED.sub("", folded.translate(_NAME_FOLD))
    return tuple(token for token in _NAME_SEPARATORS.split(cleaned) if token)


def normalize_account_number(raw: str) -> str:
    """Account number or IBAN without spaces, dashes or dots, upper-cased."""
    return _ACCOUNT_NOISE.sub("", raw).upper()


def check_customer(applicant: Applicant, customer: CoreCustomer) -> None:
    """Raise ``ValidationFailure`` unless ``customer`` is usable and matches ``applicant``.

    ``CUSTOMER_RESTRICTED`` when the customer is not active or has a posting restriction;
    ``KYC_MISMATCH`` with ``fields`` naming every differing applicant field otherwise.
    """
    if (
        customer.customer_status.strip() != ACTIVE_CUSTOMER_STATUS
        or customer.posting_restrict.strip()
    ):
        raise ValidationFailure(ErrorCode.CUSTOMER_RESTRICTED)

    mismatches = _name_mismatches(applicant, customer)
    if customer.date_of_birth is None or customer.date_of_birth != applicant.date_of_birth:
        mismatches.append("dateOfBirth")
    if not _national_id_matches(applicant, customer):
        mismatches.append("nationalId")
    if not _phone_matches(applicant, customer):
        mismatches.append("phone")
    if mismatches:
        raise ValidationFailure(ErrorCode.KYC_MISMATCH, fields=mismatches)


def count_active_accounts(accounts: Sequence[CoreAccount], account_number: str | None) -> int:
    """Count distinct active accounts; raise if none, or if ``account_number`` is unusable.

    Active means ``arrangementStatus == "AUTH"`` and an empty ``dormancyStatus``.
    ``NO_ACTIVE_ACCOUNTS`` comes first, then ``ACCOUNT_NOT_OWNED`` (number not listed for the
    customer), then ``ACCOUNT_INACTIVE`` (listed but excluded).
    """
    active_ids = {account.account_id for account in accounts if account.is_active}
    if not active_ids:
        raise ValidationFailure(ErrorCode.NO_ACTIVE_ACCOUNTS)
    if account_number is not None and account_number.strip():
        wanted = normalize_account_number(account_number)
        listed = [
            account
            for account in accounts
            if wanted
            in {
                normalize_account_number(account.account_id),
                normalize_account_number(account.iban),
            }
        ]
        if not listed:
            raise ValidationFailure(ErrorCode.ACCOUNT_NOT_OWNED)
        if not any(account.is_active for account in listed):
            raise ValidationFailure(ErrorCode.ACCOUNT_INACTIVE)
    return len(active_ids)


# --- helpers ------------------------------------------------------------------------------------


def _name_mismatches(applicant: Applicant, customer: CoreCustomer) -> list[str]:
    first = Counter(normalize_name(applicant.first_name))
    last = Counter(normalize_name(applicant.last_name))
    wanted = first + last
    candidates = [Counter(normalize_name(name)) for name in customer.names]
    candidates = [tokens for tokens in candidates if tokens]
    if not wanted or not candidates:
        return ["firstName", "lastName"]
    if any(tokens == wanted for tokens in candidates):
        return []
    # Blame against the closest core name (most shared tokens, fewest extra ones).
    closest = max(
        candidates,
        key=lambda tokens: (sum((tokens & wanted).values()), -sum((tokens - wanted).values())),
    )
    blamed = []
    if not first or first - closest:
        blamed.append("firstName")
    if not last or last - closest:
        blamed.append("lastName")
    return blamed or ["firstName", "lastName"]


def _national_id_matches(applicant: Applicant, customer: CoreCustomer) -> bool:
    wanted_type = applicant.id_type.strip().upper()
    wanted_id = applicant.national_id.strip()
    if not wanted_id:
        return False
    return any(
        legal.document_name.strip().upper() == wanted_type and legal.legal_id.strip() == wanted_id
        for legal in customer.legal_ids
    )


def _phone_matches(applicant: Applicant, customer: CoreCustomer) -> bool:
    try:
        wanted = normalize_phone(applicant.phone)
    except ValueError:
        return False
    for phone in customer.phones:
        try:
            if normalize_phone(phone) == wanted:
                return True
        except ValueError:
            continue
    return False
