"""One function per stage. Stages decide; the runner logs, publishes and persists.

``duplicate_check`` decides on the enrolled users the runner read for it; ``update_user_info``
writes in the session it is given (the runner's transaction); ``t24_lookup`` talks to the core only through the
``CoreBanking`` protocol and turns its errors into outcomes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from regstream.core_banking.client import CoreBanking
from regstream.db import users
from regstream.db.tables import MobileUser
from regstream.domain import kyc
from regstream.domain.errors import ErrorCode, ValidationFailure
from regstream.domain.models import Applicant


@dataclass(frozen=True, slots=True)
class DuplicateCheck:
    existing: users.Match | None


def duplicate_check(
    matches: list[users.Match], applicant: Applicant, national_id_hashes: Sequence[str]
) -> DuplicateCheck:
    """Decide on the enrolled users that share the applicant's CIF, phone or national id
    (``users.matching``; the runner queries them in the statement that logs the common result,
    no match). ``national_id_hashes``: the applicant's id under every key (current first; key
    rotation). Same CIF: an existing user. Phone or id held by another CIF: refuse (SIM-swap
    risk)."""
    by_cif = next((u for u in matches if u.customer_number == applicant.customer_number), None)
    others = [u for u in matches if u.customer_number != applicant.customer_number]
    if any(u.phone == applicant.phone for u in others):
        raise ValidationFailure(ErrorCode.PHONE_ALREADY_ENROLLED)
    if any(u.national_id_hash in national_id_hashes for u in others):
        raise ValidationFailure(ErrorCode.ID_ALREADY_ENROLLED)
    return DuplicateCheck(existing=by_cif)


#: Mutable fields an existing user may change by registering again (API names → columns).
MUTABLE_FIELDS: dict[str, str] = {
    "phone": "phone",
    "email": "email",
    "deviceId": "device_id",
    "firstName": "first_name",
    "lastName": "last_name",
}


def update_user_info(
    session: Session, user: MobileUser, applicant: Applicant, national_id_hashes: Sequence[str]
) -> list[str]:
    """Update the mutable fields that differ; return their API names (never their values).

    ``national_id_hashes``: the applicant's id under every key, the current key's first. A user
    whose hash was made with a previous key gets the current key's hash (key rotation); that is
    not an updated field (the person's data did not change)."""
    mismatched = []
    if user.date_of_birth != applicant.date_of_birth:
        mismatched.append("dateOfBirth")
    if user.national_id_hash not in national_id_hashes:
        mismatched.append("nationalId")
    if mismatched:
        raise ValidationFailure(ErrorCode.IDENTITY_MISMATCH, fields=mismatched)
    changes: dict[str, Any] = {}
    if user.national_id_hash != national_id_hashes[0]:
        changes["national_id_hash"] = national_id_hashes[0]
    updated: list[str] = []
    for api_name, column in MUTABLE_FIELDS.items():
        new = getattr(applicant, column)
        if new is None:
            continue
        if new != getattr(user, column):
            changes[column] = new
            updated.append(api_name)
    if changes:
        users.update(session, user=user, changes=changes)
    return sorted(updated)


async def t24_lookup(core: CoreBanking, applicant: Applicant) -> int:
    """KYC against the core record, then count active accounts. Returns the count."""
    customer = await core.get_customer(applicant.customer_number)
    kyc.check_customer(applicant, customer)
    accounts = await core.list_accounts(applicant.customer_number)
    return kyc.count_active_accounts(accounts, applicant.account_number)
