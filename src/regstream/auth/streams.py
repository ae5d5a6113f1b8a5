"""Guarding open streams: per-user connection cap, and ending streams whose credential died.

An SSE connection outlives the request that authenticated it, so we check again while it is
open. Each stream's ``info`` is its ``Principal``; the guard

* marks principals whose session or token was revoked or expired, or whose user was disabled,
  by asking the database about every credential behind an open stream every ``interval`` seconds
  (one indexed query for all of them; ``interval`` is half the ping interval, at most 10 s), and
  at once when this process itself revokes something (``revoke``);
* in the hub's timer (``on_tick``, every second) closes a marked or expired stream after writing
  ``data: {"type":"auth","reason":…}``: the client must authenticate again. Never a silent
  downgrade to an empty stream.

The per-user cap counts this process's streams (like ``SSE_MAX_STREAMS``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from regstream.auth.principal import Principal, Role
from regstream.db import accounts
from regstream.realtime import messages
from regstream.realtime.hub import Hub, Stream

log = logging.getLogger(__name__)


class StreamGuard:
    def __init__(self, *, per_user: int, interval: float) -> None:
        self.per_user = per_user
        self.interval = interval
        self._open: dict[int, weakref.WeakSet[Principal]] = {}

    # --- admission -----------------------------------------------------------------------------
    def admit(self, principal: Principal, hub: Hub) -> bool:
        """Count one more stream for this user, or refuse (``False``) at the cap."""
        group = self._open.setdefault(principal.operator_id, weakref.WeakSet())
        if len(group) >= self.per_user:
            # The weak set may still hold principals of streams that just ended: recount exactly.
            live = [
                s.info for s in hub.streams()
                if isinstance(s.info, Principal) and s.info.operator_id == principal.operator_id
                and not s.closed
            ]  # fmt: skip
            group = weakref.WeakSet(live)
            self._open[principal.operator_id] = group
            if len(group) >= self.per_user:
                return False
        group.add(principal)
        return True

    # --- ending streams ------------------------------------------------------------------------
    def on_tick(self, stream: Stream, now: float) -> None:
        """The hub's per-stream timer hook: close a stream whose credential is no longer good."""
        info = stream.info
        if not isinstance(info, Principal) or stream.closed:
            return
        reason = info.revoked
        if reason is None and info.expires_ms is not None and time.time() * 1000 >= info.expires_ms:
            reason = "expired"
        if reason is not None:
            stream.close(messages.control_frame("auth", reason=reason))

    def revoke(self, hub: Hub, match: Callable[[Principal], bool], reason: str = "revoked") -> int:
        """Close, now, this process's streams whose principal ``match``es (returns the count)."""
        closed = 0
        for stream in list(hub.streams()):
            info = stream.info
            if isinstance(info, Principal) and not stream.closed and match(info):
                info.revoked = reason
                self.on_tick(stream, 0.0)
                closed += 1
        return closed

    async def check(self, hub: Hub, sessions: async_sessionmaker[AsyncSession]) -> int:
        """Mark streams whose credential is gone or whose role no longer allows them."""
        open_streams = [
            s for s in hub.streams()
            if isinstance(s.info, Principal) and not s.closed and s.info.revoked is None
        ]  # fmt: skip
        if not open_streams:
            return 0
        principals = [s.info for s in open_streams]
        token_ids = [p.credential_id for p in principals if p.credential_kind == "token"]
        session_ids = [p.credential_id for p in principals if p.credential_kind == "session"]
        at_ms = int(time.time() * 1000)
        async with sessions() as session:
            live = await accounts.live_credentials(
                session, token_ids=token_ids, session_ids=session_ids, now_ms=at_ms
            )
        marked = 0
        for stream in open_streams:
            principal: Principal = stream.info
            state = live.get(principal.credential)
            if state is None:
                expired = principal.expires_ms is not None and principal.expires_ms <= at_ms
                principal.revoked = "expired" if expired else "revoked"
            else:
                try:
                    principal.role = Role(state.role)
                except ValueError:
                    principal.revoked = "revoked"
                if stream.registration_id is None and not principal.allows(Role.ADMIN):
                    principal.revoked = "forbidden"
            if principal.revoked is not None:
                marked += 1
        return marked

    async def watch(self, hub: Hub, sessions: async_sessionmaker[AsyncSession]) -> None:
        """Run ``check`` every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check(hub, sessions)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep watching; streams stay as they are
                log.warning("checking open streams' credentials failed (%s)", type(exc).__name__)
