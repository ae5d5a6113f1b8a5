"""User management (admin): ``GET|POST /api/users``, ``PATCH /api/users/{username}``.

A user has a role (viewer < operator < admin) and signs in with a password, with API tokens
(``api/tokens.py``), or both. Disabling a user revokes its sessions and tokens and closes its
open streams; an admin cannot disable or demote itself.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path
from pydantic import Field
from sqlalchemy.ext.asyncio import AsyncSession

from regstream.api.auth import AdminPrincipal, CallerAuditTrail
from regstream.api.deps import AuthDep, HubDep, SessionDep, SessionsDep
from regstream.api.schemas import CamelModel
from regstream.auth import credentials
from regstream.auth.principal import Role
from regstream.db import accounts
from regstream.db.tables import Operator

router = APIRouter(tags=["auth", "users"])

UserName = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


class UserCreate(CamelModel):
    username: str = Field(min_length=2, max_length=63)
    role: Role
    password: str | None = Field(None, min_length=1, max_length=1024)


class UserUpdate(CamelModel):
    role: Role | None = None
    disabled: bool | None = None


class UserRead(CamelModel):
    username: str
    role: str
    disabled: bool
    has_password: bool
    created_at: str
    last_login_at: str | None


def _user_read(operator: Operator) -> UserRead:
    return UserRead(
        username=operator.username,
        role=operator.role,
        disabled=operator.disabled,
        has_password=operator.password_hash is not None,
        created_at=operator.created_at.isoformat() if operator.created_at else "",
        last_login_at=operator.last_login_at.isoformat() if operator.last_login_at else None,
    )


async def operator_or_404(session: AsyncSession, username: str) -> Operator:
    operator = await accounts.get_by_username(session, username=username.lower())
    if operator is None:
        raise HTTPException(404, f"no user {username.lower()!r}")
    return operator


@router.get("/api/users", response_model=list[UserRead])
async def list_users(_: AdminPrincipal, session: SessionDep) -> list[UserRead]:
    return [_user_read(o) for o in await accounts.list_all(session)]


@router.post("/api/users", status_code=201, response_model=UserRead,
             responses={409: {"description": "the name is taken"}})  # fmt: skip
async def create_user(
    body: UserCreate, _: AdminPrincipal, sessions: SessionsDep, trail: CallerAuditTrail
) -> UserRead:
    """Create a user; without ``password`` it can only use API tokens."""
    try:
        name = credentials.check_username(body.username)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    async with sessions.begin() as session:
        if await accounts.get_by_username(session, username=name) is not None:
            raise HTTPException(409, f"user {name!r} already exists")
        try:
            operator = await credentials.create_operator(
                session, username=name, role=body.role, password=body.password
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        read = _user_read(operator)
    await trail.record("user.create", target=f"user:{name}", details={"role": body.role.value})
    return read


@router.patch(
    "/api/users/{username}",
    response_model=UserRead,
    responses={404: {}, 409: {"description": "cannot lock yourself out"}},
)
async def update_user(
    username: UserName, body: UserUpdate, principal: AdminPrincipal, sessions: SessionsDep,
    hub: HubDep, auth: AuthDep, trail: CallerAuditTrail,
) -> UserRead:  # fmt: skip
    """Change a user's role or disable/enable it (disabling revokes its sessions and tokens)."""
    async with sessions.begin() as session:
        operator = await operator_or_404(session, username)
        if operator.id == principal.operator_id and (
            body.disabled or (body.role is not None and body.role != Role.ADMIN)
        ):
            raise HTTPException(409, "you cannot disable or demote yourself")
        await accounts.update_operator(
            session,
            operator=operator,
            role=body.role.value if body.role else None,
            disabled=body.disabled,
        )
        if body.disabled:
            await accounts.revoke_all(session, operator_id=operator.id, now_ms=credentials.now_ms())
        read = _user_read(operator)
        operator_id = operator.id
    if body.disabled:
        auth.guard.revoke(hub, lambda p: p.operator_id == operator_id)
    changes = body.model_dump(mode="json", exclude_none=True)
    await trail.record("user.update", target=f"user:{read.username}", details=changes)
    return read
