"""The credential validity rule on every path that reads it, on SQLite and PostgreSQL.

A request's bearer token or session cookie (``from_api_token``/``from_session``), an open
stream's re-check (``live_credentials``) and a stream ticket (``from_ticket``) must agree on
every credential: not revoked, not expired (an API token may have no expiry), its operator not
disabled. One table of cases, every path asked about each, so the paths cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from regstream.auth import credentials, tokens
from regstream.db import accounts
from regstream.db.engine import create_engine, create_session_factory, migrate

NOW = 1_900_000_000_000
LATER = NOW + 60_000


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "token" or "session"
    expires_ms: int | None
    revoked: bool
    disabled: bool
    valid: bool


CASES = [
    Case("token without expiry", "token", None, revoked=False, disabled=False, valid=True),
    Case("token expiring later", "token", LATER, revoked=False, disabled=False, valid=True),
    Case("token expiring a ms later", "token", NOW + 1, revoked=False, disabled=False, valid=True),
    Case("token expiring now", "token", NOW, revoked=False, disabled=False, valid=False),
    Case("token expired", "token", NOW - 1, revoked=False, disabled=False, valid=False),
    Case("token revoked", "token", None, revoked=True, disabled=False, valid=False),
    Case("token of a disabled user", "token", None, revoked=False, disabled=True, valid=False),
    Case("session expiring later", "session", LATER, revoked=False, disabled=False, valid=True),
    Case("session expiring now", "session", NOW, revoked=False, disabled=False, valid=False),
    Case("session revoked", "session", LATER, revoked=True, disabled=False, valid=False),
    Case("session of a disabled user", "session", LATER, revoked=False, disabled=True, valid=False),
]


async def _credential(session: AsyncSession, case: Case, number: int) -> tuple[str, int]:
    """Store ``case``'s credential for a fresh operator: ``(secret, credential id)``."""
    operator = await accounts.create(
        session, username=f"user{number}", role="admin", password_hash=None
    )
    if case.kind == "token":
        secret, hashed, prefix = tokens.new_api_token()
        token = await accounts.create_token(
            session, operator_id=operator.id, token_hash=hashed, prefix=prefix,
            expires_ms=case.expires_ms,
        )  # fmt: skip
        row_id = token.id
        if case.revoked:
            await accounts.revoke_token(
                session, operator_id=operator.id, token_id=row_id, now_ms=NOW - 5
            )
    else:
        assert case.expires_ms is not None
        secret = tokens.new_session_id()
        row = await accounts.create_session(
            session, operator_id=operator.id, session_hash=tokens.digest(secret),
            csrf_token=tokens.new_csrf_token(), expires_ms=case.expires_ms,
        )  # fmt: skip
        row_id = row.id
        if case.revoked:
            await accounts.revoke_session(
                session, session_hash=tokens.digest(secret), now_ms=NOW - 5
            )
    if case.disabled:
        await accounts.update_operator(session, operator=operator, disabled=True)
    await accounts.create_ticket(
        session, ticket_hash=tokens.digest(f"{tokens.TICKET_PREFIX}case{number:08d}"),
        operator_id=operator.id, credential_kind=case.kind, credential_id=row_id,
        registration_id=None, expires_ms=LATER,
    )  # fmt: skip
    return secret, row_id


async def test_every_path_applies_the_same_validity_rule(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        sessions = create_session_factory(engine)
        stored: list[tuple[Case, str, int]] = []
        async with sessions.begin() as session:
            for number, case in enumerate(CASES):
                secret, row_id = await _credential(session, case, number)
                stored.append((case, secret, row_id))

        async with sessions.begin() as session:
            live = await accounts.live_credentials(
                session,
                token_ids=[i for c, _, i in stored if c.kind == "token"],
                session_ids=[i for c, _, i in stored if c.kind == "session"],
                now_ms=NOW,
            )
            seen: dict[str, tuple[bool, bool, bool]] = {}
            for number, (case, secret, row_id) in enumerate(stored):
                if case.kind == "token":
                    request = await credentials.from_api_token(session, secret, at_ms=NOW)
                else:
                    request = await credentials.from_session(session, secret, at_ms=NOW)
                ticket = await credentials.from_ticket(
                    session, f"{tokens.TICKET_PREFIX}case{number:08d}", at_ms=NOW
                )
                found = (request is not None, (case.kind, row_id) in live, ticket is not None)
                seen[case.name] = found
                for principal in (request, ticket.principal if ticket else None):
                    if principal is not None:
                        assert principal.credential == (case.kind, row_id), case.name
                        assert principal.expires_ms == case.expires_ms, case.name
        assert seen == {c.name: (c.valid, c.valid, c.valid) for c in CASES}
    finally:
        await engine.dispose()
