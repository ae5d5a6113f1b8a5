"""Personal-data helpers: masked forms for the UI and logs, keyed hash for national ids.

Masks follow DOMAIN.md section 6: phone ``+254*******78``, national id ``****1236``, account
``****5929``, e-mail ``m***@example.com``, CIF ``****31``.
"""

from __future__ import annotations

import hashlib
import hmac


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
