"""Data functions for enrolled mobile-banking users."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any, NamedTuple

from sqlalchemy import String, Table, bindparam, func, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from regstream.db.registrations import Bound
from regstream.db.tables import MobileUser


async def get_by_customer_number(
    session: AsyncSession, *, customer_number: str
) -> MobileUser | None:
    return await session.scalar(
        select(MobileUser).where(MobileUser.customer_number == customer_number)
    )


class Match(NamedTuple):
    """What the duplicate check needs of an enrolled user."""

    id: int
    customer_number: str
    phone: str
    national_id_hash: str


_USERS: Table = MobileUser.__table__  # type: ignore[assignment]
_u = _USERS.c
# The duplicate check and the enrolment run once per validation, each in the transaction that
# appends the step's log entries (``registrations.append_events``); built once, like those.
_MATCHING = select(_u.id, _u.customer_number, _u.phone, _u.national_id_hash).where(
    or_(
        _u.customer_number == bindparam("customer_number", String()),
        _u.phone == bindparam("phone", String()),
        # one per key (current and previous, key rotation: ``NationalIdKeys.hashes``)
        _u.national_id_hash.in_(bindparam("hashes", expanding=True)),
    )
)
_CREATE = insert(_USERS).returning(_u.id)  # status: the column's default, ACTIVE


def matching(
    *, customer_number: str, phone: str, national_id_hashes: Sequence[str]
) -> Bound:
    """The query for every enrolled user with this CIF, this phone or this national id (its hash
    under any of the keys, ``NationalIdKeys.hashes``); its rows make ``Match``es."""
    if not national_id_hashes:
        raise ValueError("at least one national-id hash is needed")
    params = {"customer_number": customer_number, "phone": phone,
              "hashes": list(national_id_hashes)}  # fmt: skip
    return Bound(_MATCHING, params)


def enrolment(
    *,
    customer_number: str,
    first_name: str,
    last_name: str,
    phone: str,
    email: str | None,
    date_of_birth: date,
    national_id_hash: str,
    national_id_last4: str,
    device_id: str | None,
    registration_id: int | None = None,
) -> Bound:
    """The insert that enrols a user (returns its id); it raises ``IntegrityError`` when the
    CIF, phone or national id is enrolled already."""
    params = {
        "customer_number": customer_number, "first_name": first_name, "last_name": last_name,
        "phone": phone, "email": email, "date_of_birth": date_of_birth,
        "national_id_hash": national_id_hash, "national_id_last4": national_id_last4,
        "device_id": device_id, "registration_id": registration_id,
    }  # fmt: skip
    return Bound(_CREATE, params)


async def create(session: AsyncSession, insert: Bound) -> int:
    """Run an ``enrolment``; returns the new user's id."""
    return int((await session.execute(insert.statement, insert.params)).scalar_one())


async def update(session: AsyncSession, *, user: MobileUser, changes: dict[str, Any]) -> None:
    for name, value in changes.items():
        setattr(user, name, value)
    await session.flush()


async def count(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(MobileUser)) or 0)
