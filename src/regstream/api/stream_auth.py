"""The stream path's access check: ``stream_authenticator`` builds ``Services.stream_auth``.

The stream is served outside FastAPI (``api/stream.py``), so it cannot use the dependencies of
``api/auth.py``; this is their counterpart. Credentials, in order: ``Authorization: Bearer
rst_…``, ``?ticket=rstk_…`` (single use, for one stream: ``api/tickets.py``), the session cookie.
The per-user stream cap is ``auth.guard``'s (``auth/streams.py``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from regstream.api.auth import record_bad_credentials, record_refusal
from regstream.api.deps import StreamAuth, StreamDecision
from regstream.auth import credentials, http
from regstream.auth.limits import retry_after
from regstream.auth.principal import Principal, Role
from regstream.auth.runtime import AuthRuntime
from regstream.config import Settings
from regstream.realtime.hub import Hub

#: seconds a user over the open-stream cap is told to wait (``Retry-After``, as every 429)
_STREAM_CAP_WAIT = 5.0


def stream_authenticator(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], hub: Hub, auth: AuthRuntime
) -> StreamAuth:
    """The stream endpoint's check: 401 without good credentials, 403 for the unfiltered stream
    unless admin (or a ticket for another stream), 429 over the per-user stream cap."""

    async def decide(
        scope: dict[str, Any], registration_id: int | tuple[int, ...] | None
    ) -> StreamDecision:
        at = credentials.now_ms()
        bearer = http.bearer_token(scope)
        ticket = http.query_param(scope, "ticket")
        session_id = http.session_cookie(scope)
        principal: Principal | None = None
        ticket_rid: int | None = None
        if bearer is None and ticket is None and session_id is None:
            return StreamDecision(
                401,
                "UNAUTHENTICATED",
                "sign in, or send an API token or a stream ticket",
                [(b"www-authenticate", b'Bearer realm="regstream"')],
            )
        if bearer is not None:
            if bearer:
                async with sessions() as session:
                    principal = await credentials.from_api_token(session, bearer, at_ms=at)
        elif ticket is not None:
            async with sessions.begin() as session:
                use = await credentials.from_ticket(session, ticket, at_ms=at)
            if use is not None:
                principal, ticket_rid = use.principal, use.registration_id
        else:
            assert session_id is not None
            async with sessions() as session:
                principal = await credentials.from_session(session, session_id, at_ms=at)
        if principal is None:
            await record_bad_credentials(sessions, settings, auth, scope, "invalid stream credentials")
            return StreamDecision(
                401,
                "UNAUTHENTICATED",
                "credentials invalid, expired, revoked or already used",
                [(b"www-authenticate", b'Bearer realm="regstream"')],
            )
        why = None
        if principal.via_ticket and ticket_rid != registration_id:
            why = "this stream ticket is for another stream"
        elif registration_id is None and not principal.allows(Role.ADMIN):
            why = "the unfiltered stream is for admins; pass registrationId"
        if why is not None:
            await record_refusal(sessions, settings, scope, principal, {"reason": why})
            return StreamDecision(403, "FORBIDDEN", why)
        if not await auth.guard.admit(principal, hub):
            return StreamDecision(
                429,
                "TOO_MANY_REQUESTS",
                f"at most {auth.guard.per_user} open streams per user; close one",
                [(b"retry-after", retry_after(_STREAM_CAP_WAIT).encode("ascii"))],
            )
        return StreamDecision(200, principal=principal)

    return decide
