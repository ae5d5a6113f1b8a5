"""Data functions for back-office accounts: operators, API tokens, sessions, stream tickets.

Every secret arrives here already hashed (``regstream.auth.tokens.digest``); instants are epoch
milliseconds. Callers own the transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    bindparam,
    delete,
    func,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from regstream.db.tables import ApiToken, AuthSession, Operator, StreamTicket

# --- operators ---------------------------------------------------------------------------------


async def get(session: AsyncSession, *, operator_id: int) -> Operator | None:
    return await session.get(Operator, operator_id)


async def get_by_username(session: AsyncSession, *, username: str) -> Operator | None:
    return await session.scalar(select(Operator).where(Operator.username == username))


async def list_all(session: AsyncSession) -> list[Operator]:
    return list(await session.scalars(select(Operator).order_by(Operator.username)))


async def count(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(Operator)) or 0)


async def create(
    session: AsyncSession, *, username: str, role: str, password_hash: str | None
) -> Operator:
    operator = Operator(username=username, role=role, password_hash=password_hash, disabled=False)
    session.add(operator)
    await session.flush()
    return operator


async def update_operator(
    session: AsyncSession, *, operator: Operator, role: str | None = None,
    disabled: bool | None = None, password_hash: str | None = None,
) -> None:  # fmt: skip
    if role is not None:
        operator.role = role
    if disabled is not None:
        operator.disabled = disabled
    if password_hash is not None:
        operator.password_hash = password_hash
    await session.flush()


async def revoke_all(session: AsyncSession, *, operator_id: int, now_ms: int) -> None:
    """Revoke every session and token of one operator (on disable)."""
    await session.execute(
        update(AuthSession)
        .where(AuthSession.operator_id == operator_id, AuthSession.revoked_ms.is_(None))
        .values(revoked_ms=now_ms)
    )
    await session.execute(
        update(ApiToken)
        .where(ApiToken.operator_id == operator_id, ApiToken.revoked_ms.is_(None))
        .values(revoked_ms=now_ms)
    )


# --- API tokens --------------------------------------------------------------------------------


async def create_token(
    session: AsyncSession, *, operator_id: int, token_hash: str, prefix: str,
    label: str | None = None, expires_ms: int | None = None,
) -> ApiToken:  # fmt: skip
    token = ApiToken(
        operator_id=operator_id, token_hash=token_hash, prefix=prefix, label=label,
        expires_ms=expires_ms,
    )  # fmt: skip
    session.add(token)
    await session.flush()
    return token


class Credential(NamedTuple):
    """A valid API token's or session's row, as authenticating a request reads it."""

    id: int
    expires_ms: int | None
    csrf_token: str | None  # sessions only


class Owner(NamedTuple):
    """The operator a credential belongs to, as authenticating a request reads it."""

    id: int
    username: str
    role: str
    disabled: bool


_OPERATOR: Table = Operator.__table__  # type: ignore[assignment]
_TOKEN: Table = ApiToken.__table__  # type: ignore[assignment]
_SESSION: Table = AuthSession.__table__  # type: ignore[assignment]
_CREDENTIALS: dict[str, Table] = {"token": _TOKEN, "session": _SESSION}


def _valid(kind: str, now: Any) -> tuple[ColumnElement[bool], ...]:
    """THE credential validity rule, the only one: a ``kind`` (``"token"``/``"session"``)
    credential joined to its operator is valid at ``now`` (epoch ms, or a bind parameter) while
    it is not revoked, not expired (an API token may have no expiry; sessions always expire)
    and its operator is not disabled.

    It lives here, in SQL, and nowhere else: the open streams' re-check
    (``live_credentials``) has to filter many credentials in one query, so the rule must be
    SQL there; authenticating a request (``get_token_by_hash``/``get_session_by_hash``) adds
    the same conditions to its lookup, so ``regstream.auth.credentials`` only ever sees valid
    credentials and repeats no part of the rule. Both kinds share the revoked/disabled
    conditions; they differ only in whether a missing expiry is allowed.
    """
    table = _CREDENTIALS[kind]
    expires = table.c.expires_ms
    not_expired = expires > now if kind == "session" else or_(expires.is_(None), expires > now)
    return table.c.revoked_ms.is_(None), not_expired, _OPERATOR.c.disabled.is_(False)


# Every API request reads one of these: prebuilt Core statements (no statement building, no
# cache-key walk and no ORM entity loading per request; they were ~10 % of a click's CPU).
_OWNER_COLUMNS = (_OPERATOR.c.id, _OPERATOR.c.username, _OPERATOR.c.role, _OPERATOR.c.disabled)
_TOKEN_BY_HASH = (
    select(_TOKEN.c.id, _TOKEN.c.expires_ms, null(), *_OWNER_COLUMNS)
    .join(_OPERATOR, _OPERATOR.c.id == _TOKEN.c.operator_id)
    .where(_TOKEN.c.token_hash == bindparam("hash"), *_valid("token", bindparam("now")))
)
_SESSION_BY_HASH = (
    select(_SESSION.c.id, _SESSION.c.expires_ms, _SESSION.c.csrf_token, *_OWNER_COLUMNS)
    .join(_OPERATOR, _OPERATOR.c.id == _SESSION.c.operator_id)
    .where(_SESSION.c.session_hash == bindparam("hash"), *_valid("session", bindparam("now")))
)


async def _credential(
    session: AsyncSession, statement: Select[Any], secret_hash: str, now_ms: int
) -> tuple[Credential, Owner] | None:
    row = (await session.execute(statement, {"hash": secret_hash, "now": now_ms})).first()
    return None if row is None else (Credential(*row[:3]), Owner(*row[3:]))


async def get_token_by_hash(
    session: AsyncSession, *, token_hash: str, now_ms: int
) -> tuple[Credential, Owner] | None:
    """The API token with this hash and its operator, if it is valid at ``now_ms`` (``_valid``)."""
    return await _credential(session, _TOKEN_BY_HASH, token_hash, now_ms)


async def list_tokens(session: AsyncSession, *, operator_id: int) -> list[ApiToken]:
    return list(
        await session.scalars(
            select(ApiToken).where(ApiToken.operator_id == operator_id).order_by(ApiToken.id)
        )
    )


async def revoke_token(
    session: AsyncSession, *, operator_id: int, token_id: int, now_ms: int
) -> bool:
    result = await session.execute(
        update(ApiToken)
        .where(
            ApiToken.id == token_id,
            ApiToken.operator_id == operator_id,
            ApiToken.revoked_ms.is_(None),
        )
        .values(revoked_ms=now_ms)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


# --- sessions ----------------------------------------------------------------------------------


async def create_session(
    session: AsyncSession, *, operator_id: int, session_hash: str, csrf_token: str,
    expires_ms: int,
) -> AuthSession:  # fmt: skip
    row = AuthSession(
        operator_id=operator_id, session_hash=session_hash, csrf_token=csrf_token,
        expires_ms=expires_ms,
    )  # fmt: skip
    session.add(row)
    await session.flush()
    return row


async def get_session_by_hash(
    session: AsyncSession, *, session_hash: str, now_ms: int
) -> tuple[Credential, Owner] | None:
    """The session with this hash and its operator, if it is valid at ``now_ms`` (``_valid``)."""
    return await _credential(session, _SESSION_BY_HASH, session_hash, now_ms)


async def revoke_session(session: AsyncSession, *, session_hash: str, now_ms: int) -> int | None:
    """Revoke one session; return its id (``None`` if there was no live one)."""
    row = await session.scalar(select(AuthSession).where(AuthSession.session_hash == session_hash))
    if row is None or row.revoked_ms is not None:
        return None
    row.revoked_ms = now_ms
    await session.flush()
    return row.id


async def purge_expired(session: AsyncSession, *, now_ms: int) -> None:
    """Delete sessions and tickets that can never be used again."""
    day = 24 * 3600 * 1000
    await session.execute(delete(AuthSession).where(AuthSession.expires_ms < now_ms - day))
    await session.execute(delete(StreamTicket).where(StreamTicket.expires_ms < now_ms))


# --- stream tickets ----------------------------------------------------------------------------


async def create_ticket(
    session: AsyncSession, *, ticket_hash: str, operator_id: int, credential_kind: str,
    credential_id: int, registration_id: int | None, expires_ms: int,
) -> None:  # fmt: skip
    session.add(
        StreamTicket(
            ticket_hash=ticket_hash,
            operator_id=operator_id,
            credential_kind=credential_kind,
            credential_id=credential_id,
            registration_id=registration_id,
            expires_ms=expires_ms,
        )  # fmt: skip
    )
    await session.flush()


async def consume_ticket(
    session: AsyncSession, *, ticket_hash: str, now_ms: int
) -> StreamTicket | None:
    """Mark a ticket used (atomically: one winner across processes) and return it."""
    result = await session.execute(
        update(StreamTicket)
        .where(
            StreamTicket.ticket_hash == ticket_hash,
            StreamTicket.used_ms.is_(None),
            StreamTicket.expires_ms > now_ms,
        )
        .values(used_ms=now_ms)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return None
    return await session.scalar(select(StreamTicket).where(StreamTicket.ticket_hash == ticket_hash))


# --- liveness of many credentials at once (open streams) ----------------------------------------


@dataclass(frozen=True, slots=True)
class CredentialState:
    """What an open stream needs to know about its credential: still good, and the role now."""

    role: str
    expires_ms: int | None


async def live_credentials(
    session: AsyncSession, *, token_ids: Iterable[int], session_ids: Iterable[int], now_ms: int
) -> dict[tuple[str, int], CredentialState]:
    """The credentials among those given that are still valid at ``now_ms`` (``_valid``)."""
    out: dict[tuple[str, int], CredentialState] = {}
    for kind, ids in (("token", token_ids), ("session", session_ids)):
        table = _CREDENTIALS[kind]
        wanted = sorted(set(ids))
        for start in range(0, len(wanted), 500):
            rows = await session.execute(
                select(table.c.id, table.c.expires_ms, _OPERATOR.c.role)
                .join(_OPERATOR, _OPERATOR.c.id == table.c.operator_id)
                .where(table.c.id.in_(wanted[start : start + 500]), *_valid(kind, now_ms))
            )
            for credential_id, expires_ms, role in rows:
                out[(kind, credential_id)] = CredentialState(role, expires_ms)
    return out
