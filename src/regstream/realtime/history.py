"""Reading the update history kept in the Redis Stream (for resume and for broker catch-up)."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from regstream.realtime import messages
from regstream.realtime.messages import EventKey, Parsed


@dataclass(frozen=True, slots=True)
class Replay:
    """``complete`` is False when the history cannot prove it holds everything after the id."""

    complete: bool
    entries: list[Parsed]
    epoch: str | None


class History:
    def __init__(self, redis: Redis, *, channel: str, max_entries: int = 10_000) -> None:
        self._redis = redis
        self.key = channel + messages.HISTORY_SUFFIX
        self.epoch_key = channel + messages.EPOCH_SUFFIX
        self._max_entries = max_entries

    async def epoch(self) -> str | None:
        value = await self._redis.get(self.epoch_key)
        if not value:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def since(self, after: EventKey | None) -> Replay:
        """Entries strictly after ``after`` (all entries of the epoch when None)."""
        epoch = await self.epoch()
        if epoch is None:
            return Replay(complete=after is None, entries=[], epoch=None)
        if after is not None and after.epoch != epoch:
            return Replay(complete=False, entries=[], epoch=epoch)
        if after is not None:
            if await self._trimmed_after(epoch, after):
                # Updates after `after` may have been trimmed away: the caller sends a snapshot.
                return Replay(complete=False, entries=[], epoch=epoch)
            start = "(" + after.stream_id
        else:
            start = "-"
        rows = await self._rows(
            self._redis.xrange(self.key, start, "+", count=self._max_entries + 1)
        )
        if len(rows) > self._max_entries:
            return Replay(complete=False, entries=[], epoch=epoch)
        entries = []
        for stream_id, fields in rows:
            key = _key(epoch, stream_id)
            parsed = messages.parse_message(messages.with_event_id(bytes(fields[b"m"]), key))
            if parsed is not None:
                entries.append(parsed)
        return Replay(complete=True, entries=entries, epoch=epoch)

    async def position(self) -> EventKey:
        """Where a new stream starts: the newest update, or ``<epoch>_0-0`` for an empty history
        (creating the epoch if nothing was ever published, as the publish script would)."""
        epoch = await self.epoch()
        if epoch is None:
            seconds, micros = await self._redis.time()
            await self._redis.set(self.epoch_key, f"{seconds}{micros:06d}", nx=True)
            epoch = await self.epoch()
            assert epoch is not None
        rows = await self._rows(self._redis.xrevrange(self.key, "+", "-", count=1))
        return _key(epoch, rows[0][0]) if rows else EventKey(epoch, 0, 0)

    async def _trimmed_after(self, epoch: str, after: EventKey) -> bool:
        """Whether trimming may have removed entries newer than ``after``.

        Trimming removes the oldest entries, so that happened iff something was trimmed at all
        (``entries-added`` > ``length``) and ``after`` is older than the first entry kept.
        """
        try:
            info = await self._redis.xinfo_stream(self.key)
        except ResponseError:  # no stream yet: nothing was ever trimmed
            return False
        info = {(k.decode() if isinstance(k, bytes) else k): v for k, v in info.items()}
        added, length = info.get("entries-added"), info.get("length")
        first = info.get("first-entry")
        if added is None or length is None or added > length:
            if not first:
                return True
            first_key = _key(epoch, first[0])
            return (first_key.ms, first_key.n) > (after.ms, after.n)
        return False

    async def latest(self) -> EventKey | None:
        epoch = await self.epoch()
        if epoch is None:
            return None
        rows = await self._rows(self._redis.xrevrange(self.key, "+", "-", count=1))
        return _key(epoch, rows[0][0]) if rows else None

    @staticmethod
    async def _rows(pending: Awaitable[Any]) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Stream entries as redis-py returns them with ``decode_responses=False``."""
        return list(await pending or [])


def _key(epoch: str, stream_id: bytes | str) -> EventKey:
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, n = text.partition("-")
    return EventKey(epoch, int(ms), int(n))
