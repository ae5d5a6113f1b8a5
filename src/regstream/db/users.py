"""Data functions for enrolled mobile-banking users."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import fields
from datetime import date
from typing import Any, NamedTuple

from sqlalchemy import Select, String, Table, bindparam, func, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from regstream.db.registrations import Bound
from regstream.db.tables import MobileUser
from regstream.domain.models import Applicant


async def get_by_customer_number(
    session: AsyncSession, *, customer_number: str
) -> MobileUser | None:
    """``find`` in an ``AsyncSession``."""
    return await session.run_sync(find, customer_number=customer_number)


def find(session: Session, *, customer_number: str) -> MobileUser | None:
    """The enrolled user with this CIF, in a sync session (a group-commit step's)."""
    return session.scalar(select(MobileUser).where(MobileUser.customer_number == customer_number))


class Match(NamedTuple):
    """What the duplicate check needs of an enrolled user."""

    id: int
    customer_number: str
    phone: str
    national_id_hash: str


_USERS: Table = MobileUser.__table__  # type: ignore[assignment]
_u = _USERS.c


# The duplicate check and the enrolment run once per validation, each with the append of the
# step's log entries (``registrations.append_events``; on PostgreSQL in its statement); built
# once, like those.
@functools.cache
def _matching(hashes: int) -> Select[tuple[int, str, str, str]]:
    """The query for ``hashes`` national-id hashes (one per key, ``NationalIdKeys.hashes``), one
    parameter each: a statement compiled once needs a fixed number (``db/compiled.py``)."""
    return select(_u.id, _u.customer_number, _u.phone, _u.national_id_hash).where(
        or_(
            _u.customer_number == bindparam("match_customer_number", type_=String()),
            _u.phone == bindparam("match_phone", type_=String()),
            _u.national_id_hash.in_(
                [bindparam(f"match_hash_{i}", type_=String()) for i in range(hashes)]
            ),
        )
    )


_ENROLLED = (
    "customer_number", "first_name", "last_name", "phone", "email", "date_of_birth",
    "national_id_hash", "national_id_last4", "device_id", "registration_id",
)  # fmt: skip
# named values (not per-call ones), so it can be a member of the append's statement
# (``log_append.postgres``), where no Python-side column default is filled in: status given.
# Parameter names must not be column names of the tables the append updates: SQLAlchemy turns
# an execution parameter named like a column into a SET of that column in an UPDATE (of the
# append's ``run`` CTE too), hence the ``match_``/``new_`` prefixes.
_CREATE = (
    insert(_USERS)
    .values(
        {
            **{name: bindparam(f"new_{name}", type_=_u[name].type) for name in _ENROLLED},
            "status": "ACTIVE",
        }
    )
    .returning(_u.id)
)


def matching(*, customer_number: str, phone: str, national_id_hashes: Sequence[str]) -> Bound:
    """The query for every enrolled user with this CIF, this phone or this national id (its hash
    under any of the keys, ``NationalIdKeys.hashes``); its rows make ``Match``es."""
    if not national_id_hashes:
        raise ValueError("at least one national-id hash is needed")
    params = {"match_customer_number": customer_number, "match_phone": phone}
    params.update((f"match_hash_{i}", h) for i, h in enumerate(national_id_hashes))
    return Bound(_matching(len(national_id_hashes)), params)


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
        "new_customer_number": customer_number, "new_first_name": first_name,
        "new_last_name": last_name, "new_phone": phone, "new_email": email,
        "new_date_of_birth": date_of_birth, "new_national_id_hash": national_id_hash,
        "new_national_id_last4": national_id_last4, "new_device_id": device_id,
        "new_registration_id": registration_id,
    }  # fmt: skip
    return Bound(_CREATE, params)


def enrolment_of(
    applicant: Applicant, *, national_id_hash: str, registration_id: int | None = None
) -> Bound:
    """The ``enrolment`` of what ``applicant`` submitted (its national id as ``national_id_hash``
    and its last four characters)."""
    return enrolment(
        **{name: getattr(applicant, name) for name in _FROM_APPLICANT},
        national_id_hash=national_id_hash, national_id_last4=applicant.national_id[-4:],
        registration_id=registration_id,
    )  # fmt: skip


#: the enrolment's values an ``Applicant`` has under the same name
_FROM_APPLICANT = tuple(n for n in _ENROLLED if n in {f.name for f in fields(Applicant)})


async def create(session: AsyncSession, insert: Bound) -> int:
    """Run an ``enrolment``; returns the new user's id."""
    return int((await session.execute(insert.statement, insert.params)).scalar_one())


def update(session: Session, *, user: MobileUser, changes: dict[str, Any]) -> None:
    for name, value in changes.items():
        setattr(user, name, value)
    session.flush()


async def count(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(MobileUser)) or 0)
