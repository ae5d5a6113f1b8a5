"""Reading the update history kept in Redis (for resume and for the broker's catch-up).

The history is one capped Redis Stream of every update (``<channel>:history``). A filtered
resume (``?registrationId=N``) used to read and parse all of it, whatever the filter: 5-9 ms of
instance CPU per 1,000 entries, per resume. So the publish script (``publisher.py``) also keeps a
small index: one capped list per registration and epoch (``<channel>:history:r:<epoch>:<id>``)
of the history's entry ids about that registration (its updates, and the resync messages that
name it), expiring after twice the history's span and at least 5 minutes (at most its age cap).
``since_for`` reads it with one script, atomically, taking the messages from the history by id:
a filtered resume costs what its own registration's entries cost. Ids, not copies: publishing
cost Redis 2.65x the CPU per update with a copy of each message in a stream per registration
(bench/RESULTS.md), and an index of ids can outlive the history's span cheaply.

The index is an optimisation, never a source of truth: where it cannot prove it holds every
entry of a registration (the registration's index list expired or was trimmed; entries added by
a publisher that does not index, such as an older version during a rolling upgrade: the index's
state hash names the newest of them, ``upto``, and the last entry it indexed, ``last``), the
script reads that part of the history itself, matching entries with the same Lua function that
built the index (``REGISTRATIONS_OF_LUA``). The rule stays the history's: a replay is complete
or the caller sends a snapshot (another epoch; history trimmed past the client's id or past an
entry the index names; an id ahead of the newest entry; more entries than ``max_entries``).
Entry ids only grow within an epoch (a history begun again gets a new epoch,
``publisher.check_primary``).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from regstream.realtime import messages
from regstream.realtime.connections import RedisClient
from regstream.realtime.messages import EventKey, Parsed, ServiceChannel
from regstream.realtime.partitions import Layout, Partition

#: Lua: the registrations a stored message is about, as decimal strings: its ``registrationId``
#: (read without decoding when it is the first key, as ``messages.encode`` writes it), or every
#: id a ``resync`` message names. The publish script indexes by it and the read script matches
#: with it, so what the index holds and what a scan finds cannot disagree.
REGISTRATIONS_OF_LUA = """
local function registrations_of(msg)
  local rid = string.match(msg, '^{"registrationId":(%d+)[,}]')
  if rid then return {rid} end
  local ok, obj = pcall(cjson.decode, msg)
  local out = {}
  if not ok or type(obj) ~= 'table' then return out end
  if type(obj.registrationId) == 'number' then
    out[1] = string.format('%d', obj.registrationId)
  elseif obj.type == 'resync' and type(obj.registrationIds) == 'table' then
    for _, r in ipairs(obj.registrationIds) do
      if type(r) == 'number' then out[#out + 1] = string.format('%d', r) end
    end
  end
  return out
end
"""

# KEYS: history, epoch, index state prefix, index key prefix.
# ARGV: the epoch of the client's id, the stream id after which to read, at most this many
# entries, then the registration ids. Returns {epoch or false, 1 if complete else 0, id, message,
# id, message, ...} (entries unordered, possibly twice: a resync naming two of the ids).
_READ_SCRIPT = (
    REGISTRATIONS_OF_LUA
    + """
local epoch = redis.call('GET', KEYS[2])
if not epoch then return {false, 0} end
if epoch ~= ARGV[1] then return {epoch, 0} end
local after, max = ARGV[2], tonumber(ARGV[3])
local function parse(id)
  local ms, n = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(n)
end
local function before(a, b)
  if a == '+' then return false end
  if b == '+' then return true end
  local am, an = parse(a)
  local bm, bn = parse(b)
  return am < bm or (am == bm and an < bn)
end
-- an id ahead of the newest entry was never handed out: nothing proves what follows it
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if before(#newest > 0 and newest[1][1] or '0-0', after) then return {epoch, 0} end
-- the history holds every entry after `from` (History._trimmed_after, the same rule)
local function covers(from)
  local info = redis.pcall('XINFO', 'STREAM', KEYS[1])
  if type(info) == 'table' and info.err then
    -- no stream yet: nothing was trimmed; refused (an ACL without XINFO): nothing is proved
    return string.find(string.lower(info.err), 'no such key', 1, true) ~= nil
  end
  local f = {}
  for i = 1, #info, 2 do f[info[i]] = info[i + 1] end
  local added, length, first = f['entries-added'], f['length'], f['first-entry']
  if added and length and added <= length then return true end
  if not first then return false end
  return not before(from, first[1])
end
local out, n, wanted = {epoch, 1}, 0, {}
for i = 4, #ARGV do wanted[ARGV[i]] = true end
local function take(id, msg)
  n = n + 1
  out[#out + 1] = id
  out[#out + 1] = msg
end
-- the history's entries in (from, to] about a wanted registration; false if it cannot prove it
-- still holds them all
local function scan(from, to)
  if not covers(from) then return false end
  local rows = redis.call('XRANGE', KEYS[1], '(' .. from, to, 'COUNT', max + 1)
  if #rows > max then return false end
  for _, row in ipairs(rows) do
    for _, rid in ipairs(registrations_of(row[2][2])) do
      if wanted[rid] then
        take(row[1], row[2][2])
        break
      end
    end
  end
  return true
end
local state = redis.call('HMGET', KEYS[3] .. epoch, 'last', 'upto')
local last, upto = state[1], state[2]
local prefix = KEYS[4] .. epoch .. ':'
-- Up to `edge` the index may miss entries of a registration: its list's first entry (expired,
-- trimmed or begun again before it), entries not indexed (up to `upto`), everything when its
-- list is gone (up to `last`) or nothing was indexed in this epoch.
local edge = after
for i = 4, #ARGV do
  local e = '+'
  if last then
    local first = redis.call('LINDEX', prefix .. ARGV[i], 0)
    if not first then
      e = last
    else
      e = first
      if upto and before(e, upto) then e = upto end
    end
  end
  if before(edge, e) then edge = e end
end
if before(after, edge) and not scan(after, edge) then return {epoch, 0} end
if edge ~= '+' then
  -- entries added after the last indexed one by a publisher that does not index
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  local from = last
  if before(from, after) then from = after end
  if #top > 0 and before(from, top[1][1]) and not scan(from, '+') then return {epoch, 0} end
  for i = 4, #ARGV do
    for _, id in ipairs(redis.call('LRANGE', prefix .. ARGV[i], 0, -1)) do
      if before(edge, id) then
        local row = redis.call('XRANGE', KEYS[1], id, id)
        -- trimmed from the history since: not complete (the index keeps ids, not messages)
        if #row == 0 then return {epoch, 0} end
        take(id, row[1][2][2])
        if n > max then return {epoch, 0} end
      end
    end
  end
end
if n > max then return {epoch, 0} end
return out
"""
)


@dataclass(frozen=True, slots=True)
class Replay:
    """``complete`` is False when the history cannot prove it holds everything after the id."""

    complete: bool
    entries: list[Parsed]
    epoch: str | None


class History:
    """One partition's history (``partitions.py``; one Redis: the only one, the seed's channel's).
    In a cluster every call reads one slot: the partition's shard."""

    def __init__(
        self, redis: RedisClient, *, channel: str = ServiceChannel.REGISTRATION_UPDATES,
        partition: Partition | None = None, max_entries: int = 10_000,
    ) -> None:  # fmt: skip
        self.redis = redis
        self.partition = partition if partition is not None else Layout.single(channel).partitions[0]
        self.key = self.partition.history_key
        self.epoch_key = self.partition.epoch_key
        self._max_entries = max_entries
        self._index_keys = [self.partition.index_state_prefix, self.partition.index_key_prefix]
        self._read = redis.register_script(_READ_SCRIPT)

    async def epoch(self) -> str | None:
        value = await self.redis.get(self.epoch_key)
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
            self.redis.xrange(self.key, start, "+", count=self._max_entries + 1)
        )
        if len(rows) > self._max_entries:
            return Replay(complete=False, entries=[], epoch=epoch)
        if after is not None and not rows and await self._ahead(epoch, after):
            return Replay(complete=False, entries=[], epoch=epoch)
        entries = []
        for stream_id, fields in rows:
            key = _key(epoch, stream_id)
            parsed = messages.parse_message(messages.with_event_id(bytes(fields[b"m"]), key))
            if parsed is not None:
                entries.append(parsed)
        return Replay(complete=True, entries=entries, epoch=epoch)

    async def since_for(self, after: EventKey, registration_ids: tuple[int, ...]) -> Replay:
        """The updates of these registrations strictly after ``after`` (module docstring).

        Same answer as ``since`` filtered by registration, from the index: the entries are read
        and parsed only for these registrations (and the resync messages naming them).
        """
        result = await self._read(
            keys=[self.key, self.epoch_key, *self._index_keys],
            args=[after.epoch, after.stream_id, self._max_entries, *registration_ids],
        )
        epoch = result[0].decode() if isinstance(result[0], bytes) else None
        if not result[1]:
            return Replay(complete=False, entries=[], epoch=epoch)
        assert epoch is not None
        found: dict[EventKey, bytes] = {}
        for i in range(2, len(result), 2):
            found[_key(epoch, result[i])] = result[i + 1]
        entries = []
        for key in sorted(found):
            parsed = messages.parse_message(messages.with_event_id(bytes(found[key]), key))
            if parsed is not None:
                entries.append(parsed)
        return Replay(complete=True, entries=entries, epoch=epoch)

    async def position(self) -> EventKey:
        """Where a new stream starts: the newest update, or ``<epoch>_0-0`` for an empty history
        (creating the epoch if nothing was ever published, as the publish script would)."""
        epoch = await self.epoch()
        if epoch is None:
            seconds, micros = await self.redis.time()
            await self.redis.set(self.epoch_key, f"{seconds}{micros:06d}", nx=True)
            epoch = await self.epoch()
            assert epoch is not None
        rows = await self._rows(self.redis.xrevrange(self.key, "+", "-", count=1))
        return _key(epoch, rows[0][0]) if rows else EventKey(epoch, 0, 0)

    async def _ahead(self, epoch: str, after: EventKey) -> bool:
        """Whether ``after`` is later than the newest entry: an id this epoch never handed out
        (forged, or of a history lost without a new epoch), after which nothing can be proved."""
        newest = await self.latest() or EventKey(epoch, 0, 0)
        return newest.epoch != epoch or (newest.ms, newest.n) < (after.ms, after.n)

    async def _trimmed_after(self, epoch: str, after: EventKey) -> bool:
        """Whether trimming may have removed entries newer than ``after``.

        Trimming removes the oldest entries, so that happened iff something was trimmed at all
        (``entries-added`` > ``length``) and ``after`` is older than the first entry kept.
        """
        try:
            info = await self.redis.xinfo_stream(self.key)
        except ResponseError as exc:
            # no stream yet: nothing was ever trimmed. Refused (an ACL without XINFO, a managed
            # Redis that renamed it): nothing can be proved, so the caller sends a snapshot
            return "no such key" not in str(exc).lower()
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
        rows = await self._rows(self.redis.xrevrange(self.key, "+", "-", count=1))
        return _key(epoch, rows[0][0]) if rows else None

    @staticmethod
    async def _rows(pending: Awaitable[Any]) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Stream entries as redis-py returns them with ``decode_responses=False``."""
        return list(await pending or [])


def _key(epoch: str, stream_id: bytes | str) -> EventKey:
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, n = text.partition("-")
    return EventKey(epoch, int(ms), int(n))
