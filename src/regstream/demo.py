"""Demo data: one registration per simulator scenario, and the enrolled users some of them need.

Loaded by ``serve --demo`` into an empty database only (never touches existing data).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from regstream.core_banking.simulator.dataset import DEMO_APPLICANTS, DemoApplicant
from regstream.db import registrations, users
from regstream.db.tables import RegistrationRequest
from regstream.domain.pii import hash_national_id


@dataclass(frozen=True, slots=True)
class DemoRow:
    registration_id: int
    scenario: str
    expected_status: str


async def load_demo(sessions: async_sessionmaker[AsyncSession], key: bytes) -> list[DemoRow]:
    """Insert the demo set if there are no registrations yet; return what was inserted."""
    async with sessions.begin() as session:
        existing = await session.scalar(select(func.count()).select_from(RegistrationRequest))
        if existing:
            return []
        rows = []
        for applicant in DEMO_APPLICANTS:
            if getattr(applicant, "enrolled", False):
                await _enrol(session, applicant, key)
            row = await registrations.create(
                session,
                customer_number=applicant.customer_number,
                account_number=applicant.account_number,
                first_name=applicant.first_name,
                last_name=applicant.last_name,
                date_of_birth=date.fromisoformat(applicant.date_of_birth),
                national_id=applicant.national_id,
                id_type=applicant.id_type,
                phone=applicant.phone,
                email=applicant.email,
                device_id=applicant.device_id,
            )
            rows.append(DemoRow(row.id, applicant.scenario, applicant.expected_status))
        return rows


async def _enrol(session: AsyncSession, applicant: DemoApplicant, key: bytes) -> None:
    existing = await users.get_by_customer_number(
        session, customer_number=applicant.customer_number
    )
    if existing is not None:
        return
    await users.create(
        session,
        users.enrolment(
            customer_number=applicant.customer_number,
            first_name=applicant.first_name,
            last_name=applicant.last_name,
            phone=applicant.phone,
            email=getattr(applicant, "enrolled_email", None) or applicant.email,
            date_of_birth=date.fromisoformat(applicant.date_of_birth),
            national_id_hash=hash_national_id(key, applicant.id_type, applicant.national_id),
            national_id_last4=applicant.national_id[-4:],
            device_id=getattr(applicant, "enrolled_device_id", None) or applicant.device_id,
        ),
    )
