"""Writing the audit trail from the HTTP edge.

``record`` writes one entry in a transaction of its own and never fails the request (a refused
sign-in is audited even when the database is slow). ``AuditTrail`` is the trail as one signed-in
caller writes it, actor and client address filled in (routes get it as ``CallerAuditTrail``
from ``api/auth.py``): ``record`` likewise, or ``add``/``add_many`` in the route's own
transaction, so the entry commits or rolls back with the rows it speaks of.

Entries carry who, what, the outcome, the target and the client address; never a password, a
token or personal data (``docs/security.md``). ``GET /api/audit`` (``api/audit.py``) reads them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from regstream.db import audit

log = logging.getLogger(__name__)


async def record(
    sessions: async_sessionmaker[AsyncSession],
    *,
    action: str,
    outcome: str,
    actor: str | None = None,
    target: str | None = None,
    client_ip: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Write one audit entry; a failure is logged (type only) and never fails the request."""
    try:
        async with sessions.begin() as session:
            await audit.create(
                session, action=action, outcome=outcome, actor=actor, target=target,
                client_ip=client_ip, details=details,
            )  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        log.warning("could not write audit entry %s (%s)", action, type(exc).__name__)


@dataclass(frozen=True, slots=True)
class AuditTrail:
    """The audit trail as one caller writes it: ``await trail.record("user.create", ...)``."""

    sessions: async_sessionmaker[AsyncSession]
    actor: str
    client_ip: str | None

    async def record(
        self,
        action: str,
        *,
        outcome: str = "ok",
        target: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """One entry in a transaction of its own; never fails the request."""
        await record(
            self.sessions, action=action, outcome=outcome, actor=self.actor, target=target,
            client_ip=self.client_ip, details=details,
        )  # fmt: skip

    async def add(self, session: AsyncSession, action: str, *, target: str) -> None:
        """One ``ok`` entry in ``session``'s transaction: committed with the caller's rows."""
        await audit.create(
            session, action=action, outcome="ok", actor=self.actor, target=target,
            client_ip=self.client_ip,
        )  # fmt: skip

    async def add_many(self, session: AsyncSession, action: str, *, targets: list[str]) -> None:
        """One ``ok`` entry per target (a bulk action), in ``session``'s transaction."""
        await audit.create_many(
            session, action=action, outcome="ok", actor=self.actor, targets=targets,
            client_ip=self.client_ip,
        )  # fmt: skip
