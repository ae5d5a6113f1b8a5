"""Turning a presented credential into a ``Principal``, signing in, minting stream tickets.

Every function takes an open ``AsyncSession`` (the caller owns the transaction) and the current
time in epoch milliseconds; none logs a secret.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from regstream.auth import passwords, tokens
from regstream.auth.principal import CredentialKind, Principal, Role
from regstream.db import accounts
from regstream.db.tables import Operator

USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,62}$")


def now_ms() -> int:
    return int(time.time() * 1000)


def check_username(value: str) -> str:
    """Normalise (lower-case) and validate an operator name; ``ValueError`` when it is bad."""
    name = value.strip().lower()
    if not USERNAME.match(name):
        raise ValueError(
            "user name must be 2-63 characters: lower-case letters, digits, '.', '_' or '-'"
        )
    return name


def parse_role(value: str) -> Role:
    try:
        return Role(value.strip().lower())
    except ValueError:
        raise ValueError("role must be viewer, operator or admin") from None


def _principal(
    operator: Operator | accounts.Owner, kind: CredentialKind, credential_id: int, expires_ms: int | None,
    csrf: str | None = None,
) -> Principal | None:  # fmt: skip
    try:
        role = Role(operator.role)
    except ValueError:
        return None
    return Principal(
        operator_id=operator.id, username=operator.username, role=role, credential_kind=kind,
        credential_id=credential_id, expires_ms=expires_ms, csrf_token=csrf,
    )  # fmt: skip


# Whether a credential is valid (not revoked, not expired, operator not disabled) is decided in
# one place, the SQL of ``accounts._valid``: the lookups below and ``live_credentials`` (open
# streams, tickets) only return valid credentials, so nothing here checks any of it again.


async def from_api_token(session: AsyncSession, token: str, *, at_ms: int) -> Principal | None:
    if not tokens.is_api_token(token):
        return None
    found = await accounts.get_token_by_hash(session, token_hash=tokens.digest(token), now_ms=at_ms)
    if found is None:
        return None
    row, operator = found
    return _principal(operator, "token", row.id, row.expires_ms)


async def from_session(session: AsyncSession, session_id: str, *, at_ms: int) -> Principal | None:
    if not tokens.plausible_session_id(session_id):
        return None
    found = await accounts.get_session_by_hash(
        session, session_hash=tokens.digest(session_id), now_ms=at_ms
    )
    if found is None:
        return None
    row, operator = found
    return _principal(operator, "session", row.id, row.expires_ms, row.csrf_token)


@dataclass(frozen=True, slots=True)
class TicketUse:
    principal: Principal
    registration_id: int | None


async def from_ticket(session: AsyncSession, ticket: str, *, at_ms: int) -> TicketUse | None:
    """Consume a stream ticket (single use) and resolve the credential it was minted from."""
    if not tokens.is_ticket(ticket):
        return None
    row = await accounts.consume_ticket(session, ticket_hash=tokens.digest(ticket), now_ms=at_ms)
    if row is None:
        return None
    live = await accounts.live_credentials(
        session,
        token_ids=[row.credential_id] if row.credential_kind == "token" else [],
        session_ids=[row.credential_id] if row.credential_kind == "session" else [],
        now_ms=at_ms,
    )
    state = live.get((row.credential_kind, row.credential_id))
    operator = await accounts.get(session, operator_id=row.operator_id)
    if state is None or operator is None:
        return None
    kind: CredentialKind = "session" if row.credential_kind == "session" else "token"
    principal = _principal(operator, kind, row.credential_id, state.expires_ms)
    if principal is None:
        return None
    principal.via_ticket = True
    return TicketUse(principal, row.registration_id)


async def mint_ticket(
    session: AsyncSession, principal: Principal, *, registration_id: int | None, ttl: float,
    at_ms: int,
) -> str:  # fmt: skip
    ticket = tokens.new_ticket()
    expires = at_ms + int(ttl * 1000)
    if principal.expires_ms is not None:
        expires = min(expires, principal.expires_ms)
    await accounts.purge_expired(session, now_ms=at_ms)
    await accounts.create_ticket(
        session, ticket_hash=tokens.digest(ticket), operator_id=principal.operator_id,
        credential_kind=principal.credential_kind, credential_id=principal.credential_id,
        registration_id=registration_id, expires_ms=expires,
    )  # fmt: skip
    return ticket


@dataclass(frozen=True, slots=True)
class SignIn:
    principal: Principal
    session_id: str  # the cookie value: returned once, stored only as a hash


async def sign_in(
    session: AsyncSession, username: str, password: str, *, lifetime: float, at_ms: int,
    previous_session_id: str | None = None,
) -> SignIn | None:  # fmt: skip
    """Check the password and open a fresh session (revoking the one the browser had)."""
    try:
        name = check_username(username)
    except ValueError:
        name = None
    operator = await accounts.get_by_username(session, username=name) if name else None
    usable = operator is not None and not operator.disabled
    stored = operator.password_hash if operator is not None and usable else None
    if not await passwords.verify_password_async(stored, password) or operator is None:
        return None
    if previous_session_id and tokens.plausible_session_id(previous_session_id):
        await accounts.revoke_session(
            session, session_hash=tokens.digest(previous_session_id), now_ms=at_ms
        )
    if stored is not None and passwords.needs_rehash(stored):
        fresh = await passwords.hash_password_async(password)
        await accounts.update_operator(session, operator=operator, password_hash=fresh)
    session_id = tokens.new_session_id()
    csrf = tokens.new_csrf_token()
    expires = at_ms + int(lifetime * 1000)
    row = await accounts.create_session(
        session, operator_id=operator.id, session_hash=tokens.digest(session_id),
        csrf_token=csrf, expires_ms=expires,
    )  # fmt: skip
    await accounts.purge_expired(session, now_ms=at_ms)
    principal = _principal(operator, "session", row.id, expires, csrf)
    if principal is None:
        return None
    return SignIn(principal, session_id)


async def create_operator(
    session: AsyncSession, *, username: str, role: Role, password: str | None,
) -> Operator:  # fmt: skip
    """Create an operator (``ValueError`` for a bad name/password or a taken name)."""
    name = check_username(username)
    if password is not None:
        passwords.check_strength(password)
    if await accounts.get_by_username(session, username=name) is not None:
        raise ValueError(f"user {name!r} already exists")
    hashed = await passwords.hash_password_async(password) if password is not None else None
    return await accounts.create(session, username=name, role=role.value, password_hash=hashed)


async def issue_api_token(
    session: AsyncSession, *, operator: Operator, label: str | None = None,
    expires_ms: int | None = None,
) -> tuple[str, int]:  # fmt: skip
    """A new API token for ``operator``: ``(token shown once, token id)``."""
    token, hashed, prefix = tokens.new_api_token()
    row = await accounts.create_token(
        session, operator_id=operator.id, token_hash=hashed, prefix=prefix, label=label,
        expires_ms=expires_ms,
    )  # fmt: skip
    return token, row.id
