"""Data functions for the audit trail (who signed in, who started which run, who was refused).

Entries carry operator names, actions, targets like ``registration:42`` or ``GET /api/users``
(paths without query strings), client addresses and small code-only details: never personal data
of applicants, never secrets.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from regstream.db.tables import AuditEntry

_AUDIT: Table = AuditEntry.__table__  # type: ignore[assignment]
_INSERT = insert(_AUDIT)  # built once: every click writes an entry


async def create(
    session: AsyncSession, *, action: str, outcome: str, actor: str | None = None,
    target: str | None = None, client_ip: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    await session.execute(
        _INSERT,
        {
            "action": action[:40], "outcome": outcome[:16], "actor": actor[:64] if actor else None,
            "target": target[:200] if target else None,
            "client_ip": client_ip[:45] if client_ip else None, "details": details,
        },
    )  # fmt: skip


async def create_many(
    session: AsyncSession, *, action: str, outcome: str, actor: str | None, targets: list[str],
    client_ip: str | None = None,
) -> None:  # fmt: skip
    """One entry per target (a bulk action), in one statement."""
    if targets:
        await session.execute(
            _INSERT,
            [
                {"action": action[:40], "outcome": outcome[:16],
                 "actor": actor[:64] if actor else None, "target": t[:200],
                 "client_ip": client_ip[:45] if client_ip else None}
                for t in targets
            ],
        )  # fmt: skip


async def list_page(
    session: AsyncSession, *, actor: str | None = None, action: str | None = None,
    outcome: str | None = None, page: int = 1, page_size: int = 50,
) -> tuple[list[AuditEntry], int]:  # fmt: skip
    query = select(AuditEntry)
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    if outcome is not None:
        query = query.where(AuditEntry.outcome == outcome)
    total = int(await session.scalar(select(func.count()).select_from(query.subquery())) or 0)
    rows = await session.scalars(
        query.order_by(AuditEntry.id.desc()).offset((page - 1) * page_size).limit(page_size)
    )
    return list(rows), total
