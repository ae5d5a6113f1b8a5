"""``GET /api/audit`` (admin): the audit trail, newest first, a page at a time.

Entries are written by ``api/audit_trail.py`` (sign-ins, refusals, user and token changes) and,
committed with their rows, by ``api/registrations.py`` (registrations entered, runs started).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from regstream.api.auth import AdminPrincipal
from regstream.api.deps import SessionDep
from regstream.api.schemas import CamelModel, Storable
from regstream.db import audit

router = APIRouter(tags=["auth", "audit"])


class AuditRead(CamelModel):
    id: int
    at: str
    actor: str | None
    action: str
    outcome: str
    target: str | None
    client_ip: str | None
    details: dict[str, Any] | None


class AuditPage(CamelModel):
    items: list[AuditRead]
    total: int
    page: int
    page_size: int


@router.get("/api/audit", response_model=AuditPage)
async def list_audit(
    _: AdminPrincipal,
    session: SessionDep,
    actor: Annotated[str | None, Query(max_length=64), Storable] = None,
    action: Annotated[str | None, Query(max_length=40), Storable] = None,
    outcome: Annotated[Literal["ok", "refused"] | None, Query()] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    page_size: Annotated[int, Query(alias="pageSize", ge=1, le=200)] = 50,
) -> AuditPage:
    """The audit trail, newest first: sign-ins, runs started, refusals, user changes."""
    rows, total = await audit.list_page(
        session, actor=actor, action=action, outcome=outcome, page=page, page_size=page_size
    )
    items = [
        AuditRead(id=r.id, at=r.at.isoformat() if r.at else "", actor=r.actor, action=r.action,
                  outcome=r.outcome, target=r.target, client_ip=r.client_ip, details=r.details)
        for r in rows
    ]  # fmt: skip
    return AuditPage(items=items, total=total, page=page, page_size=page_size)
