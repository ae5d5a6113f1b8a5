"""Data functions for enrolled mobile-banking users."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from regstream.db.tables import MobileUser


async def get_by_customer_number(
    session: AsyncSession, *, customer_number: str
) -> MobileUser | None:
    return await session.scalar(
        select(MobileUser).where(MobileUser.customer_number == customer_number)
    )


# prebuilt: the duplicate check runs once per validation (no statement construction per call)
_MATCHING = select(MobileUser).where(
    or_(
        MobileUser.customer_number == bindparam("cn"),
        MobileUser.phone == bindparam("phone"),
        MobileUser.national_id_hash == bindparam("nid"),
    )
)


async def find_matching(
    session: AsyncSession, *, customer_number: str, phone: str, national_id_hash: str
) -> list[MobileUser]:
    """Every enrolled user with this CIF, this phone or this national id (one query)."""
    params = {"cn": customer_number, "phone": phone, "nid": national_id_hash}
    return list(await session.scalars(_MATCHING, params))


async def create(session: AsyncSession, **fields: Any) -> MobileUser:
    user = MobileUser(status="ACTIVE", **fields)
    session.add(user)
    await session.flush()
    return user


async def update(session: AsyncSession, *, user: MobileUser, changes: dict[str, Any]) -> None:
    for name, value in changes.items():
        setattr(user, name, value)
    await session.flush()


async def count(session: AsyncSession) -> int:
    from sqlalchemy import func

    return int(await session.scalar(select(func.count()).select_from(MobileUser)) or 0)
