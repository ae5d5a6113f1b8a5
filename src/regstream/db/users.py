"""Data functions for enrolled mobile-banking users."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from regstream.db.tables import MobileUser


async def get_by_customer_number(
    session: AsyncSession, *, customer_number: str
) -> MobileUser | None:
    return await session.scalar(
        select(MobileUser).where(MobileUser.customer_number == customer_number)
    )


async def get_by_phone(session: AsyncSession, *, phone: str) -> MobileUser | None:
    return await session.scalar(select(MobileUser).where(MobileUser.phone == phone))


async def get_by_national_id_hash(
    session: AsyncSession, *, national_id_hash: str
) -> MobileUser | None:
    return await session.scalar(
        select(MobileUser).where(MobileUser.national_id_hash == national_id_hash)
    )


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
