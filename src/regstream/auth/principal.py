"""Roles and the principal: who is calling, through which credential."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

CredentialKind = Literal["session", "token"]


class Role(StrEnum):
    """``viewer`` reads and watches; ``operator`` also creates and validates; ``admin`` also
    watches the unfiltered stream and manages users."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def includes(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANK = {Role.VIEWER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}


@dataclass(slots=True, weakref_slot=True, eq=False)
class Principal:
    """An authenticated caller.

    ``credential_kind``/``credential_id`` name the session or API token behind the request (a
    stream ticket resolves to the credential it was minted from, so revoking that credential
    also ends the stream). ``revoked`` is set by the stream guard when an open stream must end.
    """

    operator_id: int
    username: str
    role: Role
    credential_kind: CredentialKind
    credential_id: int
    expires_ms: int | None = None
    csrf_token: str | None = None
    via_ticket: bool = False
    revoked: str | None = None

    def allows(self, needed: Role) -> bool:
        return self.role.includes(needed)

    @property
    def credential(self) -> tuple[str, int]:
        return (self.credential_kind, self.credential_id)
