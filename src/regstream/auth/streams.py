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

The per-user cap is fleet-wide: each admitted stream takes a slot in Redis
(``auth/stream_slots.py``), renewed by ``watch`` every ``interval`` and freed when the stream
ends; while Redis does not answer, this process's streams are counted instead, at the same cap.
The total ``SSE_MAX_STREAMS`` stays per process (it protects this process's memory and files).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import weakref
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from regstream.auth.principal import Principal, Role
from regstream.auth.stream_slots import StreamSlots
from regstream.db import accounts
from regstream.realtime import messages
from regstream.realtime.hub import Hub, Stream

log = logging.getLogger(__name__)


class StreamGuard:
    def __init__(self, *, per_user: int, interval: float, slots: StreamSlots | None = None) -> None:
        self.per_user = per_user
        self.interval = interval
        self.slots = slots
        self._open: dict[int, weakref.WeakSet[Principal]] = {}
        # the Redis slot of each admitted stream's principal, and every slot this process holds
        self._slot_of: weakref.WeakKeyDictionary[Principal, str] = weakref.WeakKeyDictionary()
        self._held: dict[str, tuple[int, float]] = {}  # slot -> (operator id, admitted at)
        self._instance = f"{os.getpid()}-{os.urandom(4).hex()}"
        self._next = itertools.count(1)

    # --- admission -----------------------------------------------------------------------------
    async def admit(self, principal: Principal, hub: Hub) -> bool:
        """Count one more stream for this user, or refuse (``False``) at the cap."""
        if self.slots is not None:
            slot = f"{self._instance}:{next(self._next)}"
            taken = await self.slots.acquire(principal.operator_id, slot)
            if taken is False and await self._release_ended(hub, principal.operator_id):
                taken = await self.slots.acquire(principal.operator_id, slot)
            if taken is not None:
                if taken:  # also counted here, in case Redis goes out while it is open
                    self._open.setdefault(principal.operator_id, weakref.WeakSet()).add(principal)
                    self._slot_of[principal] = slot
                    self._held[slot] = (principal.operator_id, time.monotonic())
                return taken
        # no Redis (or it does not answer): this process's streams, at the same cap
        return self._admit_locally(principal, hub)

    def _admit_locally(self, principal: Principal, hub: Hub) -> bool:
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
        if self.slots is not None:  # Redis out: renewed into Redis once it answers again
            slot = f"{self._instance}:{next(self._next)}"
            self._slot_of[principal] = slot
            self._held[slot] = (principal.operator_id, time.monotonic())
        return True

    def _live_slots(self, hub: Hub) -> dict[int, list[str]]:
        live: dict[int, list[str]] = {}
        for stream in hub.streams():
            info = stream.info
            if isinstance(info, Principal) and not stream.closed:
                slot = self._slot_of.get(info)
                if slot is not None:
                    live.setdefault(info.operator_id, []).append(slot)
        return live

    async def _release_ended(self, hub: Hub, operator_id: int | None = None) -> int:
        """Free the slots this process holds for streams that ended (of one user, or all).

        A slot younger than one interval is kept: its stream may be between admission and
        attaching to the hub.
        """
        live = {slot for slots in self._live_slots(hub).values() for slot in slots}
        young = time.monotonic() - self.interval
        ended = [
            (owner, slot) for slot, (owner, at) in self._held.items()
            if slot not in live and at < young and (operator_id is None or owner == operator_id)
        ]  # fmt: skip
        if not ended or self.slots is None or not await self.slots.release(ended):
            return 0
        for _, slot in ended:
            self._held.pop(slot, None)
        return len(ended)

    async def renew(self, hub: Hub) -> None:
        """Free ended streams' slots and push live ones' expiry ahead (every ``interval``)."""
        if self.slots is None or not self._held:
            return
        await self._release_ended(hub)
        await self.slots.renew(self._live_slots(hub))

    async def release_all(self) -> None:
        """At shutdown: free every slot this process holds (its streams are closed)."""
        if self.slots is not None and self._held:
            await self.slots.release((owner, slot) for slot, (owner, _) in self._held.items())
            self._held.clear()

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
        """Run ``renew`` and ``check`` every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                # first: a slow database check must not let live slots expire
                await self.renew(hub)
                await self.check(hub, sessions)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep watching; streams stay as they are
                log.warning("checking open streams' credentials failed (%s)", type(exc).__name__)
