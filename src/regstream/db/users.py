"""Data functions for enrolled mobile-banking users."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import date
from typing import Any, NamedTuple

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from regstream.db import driver
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


# The duplicate check and the enrolment run once per validation: hand-written on the driver
# (``db.driver`` says why, with the numbers). Through SQLAlchemy they were, with the log appends,
# most of a validation's database CPU (profiled). The runner has each run inside the statement
# that appends the step's log entries (``registrations.append_events``), so each step is one
# round trip to PostgreSQL.
@functools.cache
def _matching(hashes: int) -> driver.Sql:
    # One placeholder per key (current and previous, key rotation): the same statement text for
    # every run of a process, so PostgreSQL's prepared-statement cache and ``_statement``'s keep
    # working; with one key it is the plain ``= $3`` it always was.
    ids = " OR ".join(f"national_id_hash = ${3 + n}" for n in range(hashes))
    return driver.sql(
        "SELECT id, customer_number, phone, national_id_hash FROM mobile_users "
        f"WHERE customer_number = $1 OR phone = $2 OR {ids}"
    )


def matching(
    *, customer_number: str, phone: str, national_id_hashes: Sequence[str]
) -> driver.Bound:
    """The query for every enrolled user with this CIF, this phone or this national id (its hash
    under any of the keys, ``NationalIdKeys.hashes``); its rows make ``Match``es."""
    if not national_id_hashes:
        raise ValueError("at least one national-id hash is needed")
    return driver.Bound(
        _matching(len(national_id_hashes)), (customer_number, phone, *national_id_hashes)
    )


# The date of birth goes as ISO text to both drivers: how SQLAlchemy's Date type keeps it in
# SQLite, cast on PostgreSQL (asyncpg takes only ``date`` objects for a date parameter).
_INSERT = (
    "INSERT INTO mobile_users (customer_number, first_name, last_name, phone, email, "
    "date_of_birth, national_id_hash, national_id_last4, device_id, registration_id, status) "
    "VALUES ($1, $2, $3, $4, $5, {dob}, $7, $8, $9, $10, 'ACTIVE') RETURNING id"
)
_CREATE = driver.Sql(
    _INSERT.format(dob="$6::text::date"), driver.sql(_INSERT.format(dob="$6")).sqlite
)


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
) -> driver.Bound:
    """The insert that enrols a user (returns its id); it raises ``IntegrityError`` when the
    CIF, phone or national id is enrolled already."""
    return driver.Bound(
        _CREATE,
        (
            customer_number, first_name, last_name, phone, email, date_of_birth.isoformat(),
            national_id_hash, national_id_last4, device_id, registration_id,
        ),
    )  # fmt: skip


async def create(session: AsyncSession, insert: driver.Bound) -> int:
    """Run an ``enrolment``; returns the new user's id."""
    db = await driver.of(session)
    row = await db.fetch_one(insert.statement, insert.args)
    assert row is not None  # RETURNING of an insert that did not raise
    return int(row[0])


async def update(session: AsyncSession, *, user: MobileUser, changes: dict[str, Any]) -> None:
    for name, value in changes.items():
        setattr(user, name, value)
    await session.flush()


async def count(session: AsyncSession) -> int:
    from sqlalchemy import func

    return int(await session.scalar(select(func.count()).select_from(MobileUser)) or 0)
