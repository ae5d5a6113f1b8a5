"""``POST /api/auth/stream-ticket``: a single-use ticket for browsers' ``EventSource``.

``EventSource`` cannot send headers, so a page asks for a ticket with its session (or a client
with its token) and opens the stream with ``?ticket=rstk_…``; ``api/stream_auth.py`` takes it.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from pydantic import Field

from regstream.api.auth import ViewerPrincipal
from regstream.api.deps import SessionsDep, SettingsDep
from regstream.api.schemas import CamelModel
from regstream.api.stream import STREAM_PATH
from regstream.auth import credentials
from regstream.auth.principal import Role

router = APIRouter(tags=["auth"])


class StreamTicketCreate(CamelModel):
    registration_id: int | None = Field(None, ge=1, le=2**53)


class StreamTicketRead(CamelModel):
    ticket: str
    expires_in: float
    stream_url: str


@router.post(
    "/api/auth/stream-ticket",
    status_code=201,
    response_model=StreamTicketRead,
    responses={403: {"description": "the unfiltered stream is for admins"}},
)
async def stream_ticket(
    body: StreamTicketCreate,
    principal: ViewerPrincipal,
    sessions: SessionsDep,
    settings: SettingsDep,
) -> StreamTicketRead:
    """A single-use ticket for ``?ticket=`` on the stream path (EventSource without headers).

    It opens one stream, within ``expiresIn`` seconds, for the ``registrationId`` given here
    (none = the unfiltered stream, admins only); the stream then lives as long as the session or
    token that minted it.
    """
    rid = body.registration_id
    if rid is None and not principal.allows(Role.ADMIN):
        raise HTTPException(403, "the unfiltered stream is for admins; pass registrationId")
    ttl = settings.stream_ticket_ttl
    async with sessions.begin() as session:
        ticket = await credentials.mint_ticket(
            session, principal, registration_id=rid, ttl=ttl, at_ms=credentials.now_ms()
        )
    query = f"ticket={ticket}" + (f"&registrationId={rid}" if rid is not None else "")
    return StreamTicketRead(ticket=ticket, expires_in=ttl, stream_url=f"{STREAM_PATH}?{query}")
