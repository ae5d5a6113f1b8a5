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
        self._ended: list[tuple[int, str]] = []  # (operator id, slot) of streams that left
        self._releaser: asyncio.Task[int] | None = None
        self._instance = f"{os.getpid()}-{os.urandom(4).hex()}"
        self._next = itertools.count(1)

    # --- admission -----------------------------------------------------------------------------
    async def admit(self, principal: Principal, hub: Hub) -> bool:
        """Count one more stream for this user, or refuse (``False``) at the cap."""
        if self.slots is not None:
            slot = f"{self._instance}:{next(self._next)}"
            taken = await self.slots.acquire(principal.operator_id, slot)
            if taken is False and (self._ended or self._releaser is not None):
                # streams of this process that just left may still hold slots: free them first
                if self._releaser is not None:
                    await asyncio.wait([self._releaser])  # (not cancelled if we are)
                if await self._release_ended():
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

    # --- slots in Redis ------------------------------------------------------------------------
    def on_detach(self, stream: Stream) -> None:
        """The hub's hook when a stream leaves: free its slot now (in a task of its own)."""
        info = stream.info
        if not isinstance(info, Principal):
            return
        slot = self._slot_of.pop(info, None)
        held = self._held.pop(slot, None) if slot is not None else None
        if slot is None or held is None:
            return
        self._ended.append((held[0], slot))
        if self._releaser is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a unit test's sync code): ``renew`` frees it
                return
            self._releaser = loop.create_task(self._release_ended(), name="stream-slots-free")
            self._releaser.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[int]) -> None:
        if self._releaser is task:
            self._releaser = None

    async def _release_ended(self) -> int:
        """Free the slots of streams that left (a few passes: more may leave meanwhile)."""
        released = 0
        for _ in range(4):
            if not self._ended or self.slots is None:
                break
            batch, self._ended = self._ended, []
            # if Redis does not answer they stay there until they expire (``ttl``)
            if not await self.slots.release(batch):
                break
            released += len(batch)
        return released

    def _live_slots(self, hub: Hub) -> dict[str, int]:
        """slot -> operator id, of this process's streams in the hub."""
        live: dict[str, int] = {}
        for stream in hub.streams():
            info = stream.info
            if isinstance(info, Principal) and not stream.closed:
                slot = self._slot_of.get(info)
                if slot is not None:
                    live[slot] = info.operator_id
        return live

    async def renew(self, hub: Hub) -> None:
        """Push live slots' expiry ``ttl`` ahead (every ``interval``); free what is left over."""
        if self.slots is None:
            return
        await self._release_ended()
        live = self._live_slots(hub)
        renewing: dict[int, list[str]] = {}
        expired = time.monotonic() - self.slots.ttl
        for slot, (owner, at) in list(self._held.items()):
            if slot in live:
                renewing.setdefault(owner, []).append(slot)
            elif at < expired:
                # its stream never reached the hub (refused after admission, or its client left
                # first): not renewed, it expired in Redis; forget it here too
                del self._held[slot]
        if renewing and await self.slots.renew(renewing):
            # a stream that left while the renewal was on its way may have been freed before
            # the renewal re-added its slot: free it again
            again = [(o, slot) for o, slots in renewing.items() for slot in slots
                     if slot not in self._held]  # fmt: skip
            if again:
                await self.slots.release(again)

    async def release_all(self) -> None:
        """At shutdown: free every slot this process holds (its streams are closed)."""
        if self.slots is not None and (self._held or self._ended):
            held = [(owner, slot) for slot, (owner, _) in self._held.items()]
            await self.slots.release([*self._ended, *held])
            self._held.clear()
            self._ended.clear()

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
