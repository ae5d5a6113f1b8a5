"""API tokens (admin): ``/api/users/{username}/tokens`` to list, issue and revoke.

A token (``rst_…``) is shown once, when issued; the database keeps its digest and the first
eight characters, to tell tokens apart. Revoking one closes the streams opened with it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Response
from pydantic import Field

from regstream.api.auth import AdminPrincipal, CallerAuditTrail
from regstream.api.deps import AuthDep, HubDep, SessionDep, SessionsDep
from regstream.api.schemas import CamelModel
from regstream.api.users import UserName, operator_or_404
from regstream.auth import credentials
from regstream.db import accounts

router = APIRouter(tags=["auth", "users"])


class TokenCreate(CamelModel):
    label: str | None = Field(None, max_length=64)
    expires_in_days: int | None = Field(None, ge=1, le=3650)


class TokenCreated(CamelModel):
    id: int
    prefix: str
    token: str = Field(description="shown once; store it now")


class TokenRead(CamelModel):
    id: int
    prefix: str
    label: str | None
    expires_at: int | None
    revoked: bool


@router.get("/api/users/{username}/tokens", response_model=list[TokenRead], responses={404: {}})
async def list_tokens(
    username: UserName, _: AdminPrincipal, session: SessionDep
) -> list[TokenRead]:
    operator = await operator_or_404(session, username)
    rows = await accounts.list_tokens(session, operator_id=operator.id)
    return [
        TokenRead(
            id=t.id,
            prefix=t.prefix,
            label=t.label,
            expires_at=t.expires_ms,
            revoked=t.revoked_ms is not None,
        )
        for t in rows
    ]


@router.post(
    "/api/users/{username}/tokens",
    status_code=201,
    response_model=TokenCreated,
    responses={404: {}},
)
async def create_token(
    username: UserName,
    body: TokenCreate,
    _: AdminPrincipal,
    sessions: SessionsDep,
    trail: CallerAuditTrail,
) -> TokenCreated:
    """A new API token for the user, shown once in the answer."""
    expires = None
    if body.expires_in_days is not None:
        expires = credentials.now_ms() + body.expires_in_days * 86_400_000
    async with sessions.begin() as session:
        operator = await operator_or_404(session, username)
        token, token_id = await credentials.issue_api_token(
            session, operator=operator, label=body.label, expires_ms=expires
        )
        name = operator.username
    await trail.record("token.create", target=f"user:{name}", details={"tokenId": token_id})
    return TokenCreated(id=token_id, prefix=token[:8], token=token)


@router.delete("/api/users/{username}/tokens/{token_id}", status_code=204, responses={404: {}})
async def revoke_token(
    username: UserName,
    token_id: Annotated[int, Path(ge=1, le=2**53)],
    _: AdminPrincipal,
    sessions: SessionsDep,
    hub: HubDep,
    auth: AuthDep,
    trail: CallerAuditTrail,
) -> Response:
    """Revoke a token; streams opened with it are closed with an ``auth`` frame."""
    async with sessions.begin() as session:
        operator = await operator_or_404(session, username)
        done = await accounts.revoke_token(
            session, operator_id=operator.id, token_id=token_id, now_ms=credentials.now_ms()
        )
    if not done:
        raise HTTPException(404, f"no live token {token_id} for {operator.username!r}")
    auth.guard.revoke(hub, lambda p: p.credential == ("token", token_id))
    details = {"tokenId": token_id}
    await trail.record("token.revoke", target=f"user:{operator.username}", details=details)
    return Response(status_code=204)
