"""Value objects the pipeline works on (plain data, no ORM)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date


@dataclass(frozen=True, slots=True)
class Applicant:
    """What a person submitted in a registration request (normalised)."""

    customer_number: str
    first_name: str
    last_name: str
    date_of_birth: date
    national_id: str
    id_type: str
    phone: str  # E.164
    email: str | None = None
    account_number: str | None = None
    device_id: str | None = None
