"""Personal-data helpers: masked forms for the UI and logs, keyed hash for national ids.

Masks follow DOMAIN.md section 6: phone ``+254*******78``, national id ``****1236``, account
``****5929``, e-mail ``m***@example.com``, CIF ``****31``.

National ids are stored only as an HMAC under the fleet's secret key (``NationalIdKeys``). Key
rotation (docs/operations.md): new enrolments hash with the current key, the duplicate check
matches a national id under the current and every previous key, and an enrolled user's hash moves
to the current key when the user is updated or by ``regstream rotate-secret``.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass


def mask_phone(phone: str | None) -> str | None:
    if not phone:
        return phone
    if len(phone) <= 6:
        return "*" * len(phone)
    return phone[:4] + "*" * (len(phone) - 6) + phone[-2:]


def mask_last4(value: str | None) -> str | None:
    if not value:
        return value
    return "****" + value[-4:]


def mask_cif(value: str | None) -> str | None:
    if not value:
        return value
    return "****" + value[-2:]


def mask_email(email: str | None) -> str | None:
    if not email or "@" not in email:
        return email
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain}"


def hash_national_id(key: bytes, id_type: str, national_id: str) -> str:
    """Keyed HMAC-SHA256 of the document type and number (hex); the key never leaves the server."""
    normalised = f"{id_type.strip().upper()}:{national_id.strip().upper()}".encode()
    return hmac.new(key, normalised, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True, repr=False)
class NationalIdKeys:
    """The HMAC keys for national ids: ``current`` hashes new enrolments; ``previous`` keys
    (being rotated out) still match hashes made with them.

    ``NationalIdKeys(b"new", previous=(b"old",)).hashes("NATIONAL.ID", "12345678")`` is the
    id's hash under ``b"new"``, then under ``b"old"``.
    """

    current: bytes
    previous: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if not self.current or not all(self.previous):
            raise ValueError("national-id keys must not be empty")
        if self.current in self.previous:
            raise ValueError("a previous national-id key repeats the current one")

    def hash(self, id_type: str, national_id: str) -> str:
        """The hash new enrolments store (current key)."""
        return hash_national_id(self.current, id_type, national_id)

    def hashes(self, id_type: str, national_id: str) -> tuple[str, ...]:
        """The id's hash under every key, the current key's first."""
        return tuple(
            hash_national_id(key, id_type, national_id) for key in (self.current, *self.previous)
        )

    def __repr__(self) -> str:  # the keys are secrets
        return f"NationalIdKeys(current=***, previous={len(self.previous)} keys)"
