"""Random secrets and their stored form.

Every secret we hand out is 256 (tokens, sessions) or 192 (tickets) random bits from
``secrets``; we store only its SHA-256. A fast hash is right here (unlike passwords): the input
has full entropy, so there is nothing to brute-force, and lookups stay one indexed equality.
Prefixes make leaked values recognisable to secret scanners and people: ``rst_`` API token,
``rstk_`` stream ticket.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

TOKEN_PREFIX = "rst_"
TICKET_PREFIX = "rstk_"
_MAX_LEN = 200


def digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def same(a: str, b: str) -> bool:
    """Constant-time comparison."""
    return hmac.compare_digest(
        a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    )


def new_api_token() -> tuple[str, str, str]:
    """``(token, stored hash, display prefix)``; the token is shown once and never stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, digest(token), token[: len(TOKEN_PREFIX) + 4]


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def new_ticket() -> str:
    return TICKET_PREFIX + secrets.token_urlsafe(24)


def is_api_token(value: str) -> bool:
    return value.startswith(TOKEN_PREFIX) and 8 < len(value) <= _MAX_LEN


def is_ticket(value: str) -> bool:
    return value.startswith(TICKET_PREFIX) and 8 < len(value) <= _MAX_LEN


def plausible_session_id(value: str) -> bool:
    return 20 <= len(value) <= 100 and value.isascii()
