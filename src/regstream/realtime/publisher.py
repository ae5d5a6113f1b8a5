"""Publishing registration updates: Pub/Sub for live delivery plus a capped Redis Stream history.

Every update goes into one in-order queue (``publish_update`` never waits on Redis and never
raises). One flusher task drains it: each Lua script call takes every update queued so far (up to
``batch_max``) and, atomically and in one round trip, makes sure the channel has an epoch (a new
one after Redis lost its data), ``XADD``s each message to the history stream (capped by length;
trimmed by age once a second), splices ``eventId`` into its JSON and ``PUBLISH``es it. So
``redis-cli SUBSCRIBE service:registration-updates`` still shows every message, with its id.
Batching is what lets one process publish thousands of updates a second: at low load a batch is
one message and nothing waits; under load the messages that queued during one round trip share
the next (measured in bench/RESULTS.md).

When Redis is unreachable the queue is the outbox: updates wait, bounded, and are published in
order once Redis is back (new updates queue behind them, so order is kept). If it overflows, the
oldest updates are dropped and their registrations are announced afterwards in one ``resync``
message, which streams turn into a snapshot frame; with a ``recover`` hook (the service's:
``pipeline/catch_up.py``) the dropped updates are then published from the database, in order:
the registration's later updates are dropped from the outbox too and, once Redis takes batches
again, its updates above the last seq Redis saw are read from the process log and queued, then
what it queued during that read (held meanwhile).

Exactly once per ``(registrationId, seq)``: the script skips an update whose seq is not above the
last one it published for the registration in this epoch. A batch sent again (after a socket
timeout, or after the connection died with the reply, while Redis ran the first call) and what a
catch-up republishes go out once. That last seq is a key per registration and epoch
(``partitions.py``: ``<channel>:seq:<epoch>:<registrationId>``, in the partition's slot) set with
a TTL of the history's age cap (``history_max_age``, ``REGSTREAM_HISTORY_MAX_AGE``) from the
registration's last publish, so the state holds the registrations published within that window
and no more (it was one hash field per registration whose expiry every batch renewed: +2.3 GB an
hour at 10,000 validations/s, issue 18). Why the age cap and not the run lease: the longest any
update can be offered again is the catch-up's window (``pipeline/catch_up.py`` republishes what
the database committed within the age cap and Redis has not seen; the overflow recovery too),
and an update is published after its commit, so a key that expired belongs to a registration
whose every update is older than that window: nothing can be republished past it. The lease
(60 s) covers only a taken-over run's re-queue and would let a restart's catch-up publish an
hour's updates a second time. Rolling upgrade from a release that kept the seqs in the index
state hash (``<channel>:history:index:<epoch>``, field ``s<id>``): while that hash exists (an
instance of the old release published in this epoch within the age cap) the script reads it
too (the higher seq wins) and writes each seq into it as well, without renewing its expiry, so
old and new instances skip each other's updates; once no old instance publishes, it expires
within the age cap. (The index state moved to ``<channel>:history:state:<epoch>`` for that: the
old hash must stop being renewed.) Messages without a seq (``resync``) are not
deduplicated. A new epoch (Redis lost its data, a failover) begins with no seqs: the catch-up
then publishes the window's updates again in the new epoch, but for those older than an update
of the same registration published there first (streams re-sync at a new epoch anyway).

While Redis takes updates, nothing is dropped: past half the outbox, ``wait_for_room`` holds the
producers (the pipeline, before each run) until the flusher has brought it down to a quarter. A
hold longer than ``hold_max`` (Redis stalled without an error yet, e.g. a blackholed connection)
counts as Redis being down: producers go on and the overflow rule applies until a batch succeeds.
Without that, a burst of validations faster than one event-loop turn per batch (bulk validation
on a saturated core: ~9,000 updates/s against batches of 256 every ~50 ms) overflowed the
outbox with Redis healthy and turned live updates into resyncs (bench/RESULTS.md, run 13).

Failover (``check_primary``): Redis replicates asynchronously, so a primary that dies may have
acknowledged updates its replica never got; after the promotion they are in no history and no
subscriber may have seen them. Each epoch therefore belongs to one primary's history: the
primary's replication id (``INFO replication``, ``master_replid``; a promoted replica takes a
new one) is kept next to the epoch, and whoever reconnects first (the broker before its
catch-up, the flusher before publishing again) and finds another id begins a new epoch with an
empty history, atomically, once for the whole fleet. Every broker's catch-up then sees another
epoch and tells its streams to re-sync, and every Last-Event-ID from before gets a snapshot, so
what the old primary lost is re-read from the database, never silently missing
(docs/architecture.md, failure map).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, Self

import orjson
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from regstream import metrics
from regstream.realtime import messages
from regstream.realtime.broker import Broker
from regstream.realtime.connections import (
    REDIS_ERRORS,
    RedisClient,
    RedisTarget,
    create_client,
    create_node_subscriber_client,
    create_subscriber_client,
)
from regstream.realtime.history import REGISTRATIONS_OF_LUA
from regstream.realtime.messages import ServiceChannel
from regstream.realtime.partitions import Layout, Partition

log = logging.getLogger(__name__)

#: an outbox entry: (registrationId, seq, the encoded message)
_Entry = tuple[int | None, int | None, bytes]
#: ``recover``: the updates of these registrations Redis has not seen, in order, from the
#: database (``pipeline/catch_up.py``); called after an outbox overflow, a page at a time
Recover = Callable[[list[int]], Awaitable[list[dict[str, Any]]]]
_RECOVER_PAGE = 500

# KEYS: history, epoch, index state prefix, index key prefix (``history.py``: the index), the
# primary's replication id, seq key prefix, the legacy index state prefix (the seq check of
# releases before the seq keys), all of one partition (``partitions.py``: one hash tag in
# cluster mode, so one slot).
# ARGV: history MAXLEN, channel, MINID to trim to (or ''), max age in ms, flags ('s': publish
# with SPUBLISH, a cluster's shard channel; 'c': check the primary first), a channel to also
# PUBLISH every message on (the
# seed's channel in cluster mode, when mirrored) or '', then per message its seq ('' for a
# message without one) and the message. A message about one registration without a seq gets the
# registration's next one (its last in this epoch + 1, spliced into the JSON): the seed's calls
# leave seq out. Returns 1 if it began a new epoch (``check_primary``'s rule) else 0, then per
# message its event id, or '' when it was skipped: its seq is not
# above the last seq published for its registration in this epoch (key
# ``<seq key prefix><epoch>:<registrationId>``), so a batch the client sent again (a retry after a socket timeout
# while Redis had queued the first call) or an update republished by the catch-up
# (``pipeline/catch_up.py``) goes out once.
_PUBLISH_SCRIPT = (
    REGISTRATIONS_OF_LUA
    + """
local epoch = redis.call('GET', KEYS[2])
-- The history is this primary's (``check_primary``, done here too, atomically with the
-- publish): a batch sent again after a failure may reach a promoted replica before anyone
-- checked, and must begin the new epoch there, not land in the old one. INFO costs ~15-25 us,
-- so it is asked for only on a partition's first call and after a failed one (the publisher's
-- client does not retry by itself: every retry is the flusher's, and asks for the check).
local sharded = string.find(ARGV[5], 's', 1, true) ~= nil
local began = 0
local replid = nil
if string.find(ARGV[5], 'c', 1, true) then  -- asked for: the partition's first call, or a retry
  local ok, info = pcall(redis.call, 'INFO', 'replication')
  replid = ok and string.match(info, 'master_replid:(%w+)') or nil
end
if replid then
  local known = redis.call('GET', KEYS[5])
  if known ~= replid then
    redis.call('SET', KEYS[5], replid)
    if known and epoch then
      redis.call('DEL', KEYS[1])
      epoch = nil
      began = 1
    end
  end
end
if not epoch then
  local t = redis.call('TIME')
  epoch = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', KEYS[2], epoch)
end
local state = KEYS[3] .. epoch
local prefix = KEYS[4] .. epoch .. ':'
-- Entries someone else added since our last batch (a publisher of an older version during a
-- rolling upgrade; all of them the first time) are in no index: it covers what follows them.
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local top_id = '0-0'
if #top > 0 then top_id = top[1][1] end
if redis.call('HGET', state, 'last') ~= top_id then
  redis.call('HSET', state, 'upto', top_id)
end
local ids, touched, id = {began}, {}, nil
local function add(payload)
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'm', payload)
  local rids = registrations_of(payload)
  if #rids > 100 then
    -- a resync naming many registrations (an outbox overflow): not listed in each of their
    -- indexes; readers resuming before it read the history up to it instead
    redis.call('HSET', state, 'upto', id)
    rids = {}
  end
  for _, rid in ipairs(rids) do
    local key = prefix .. rid
    local length = redis.call('RPUSH', key, id)
    if length == 1 then
      touched[key] = true  -- a new list: its expiry is set once, below
    elseif length > 1000 then
      redis.call('LTRIM', key, -1000, -1)
    end
  end
  local msg = string.sub(payload, 1, -2) .. ',"eventId":"' .. epoch .. '_' .. id .. '"}'
  if sharded then
    redis.call('SPUBLISH', ARGV[2], msg)
  else
    redis.call('PUBLISH', ARGV[2], msg)
  end
  if ARGV[6] ~= '' then
    redis.call('PUBLISH', ARGV[6], msg)
  end
  return epoch .. '_' .. id
end
-- Once per (registration, seq) in this epoch: the last seq published per registration is a key
-- of its own, expiring the age cap after the registration's last publish (why that long: the
-- module docstring), read for the whole batch with MGET. A release before these keys kept it
-- as field s<id> of its index state hash (KEYS[7]); while that hash exists (such an instance
-- published in this epoch: a rolling upgrade) it is read too, the higher seq winning.
local max_age = tonumber(ARGV[4])
local seq_prefix = KEYS[6] .. epoch .. ':'
local legacy = KEYS[7] .. epoch
local mixed = redis.call('EXISTS', legacy) == 1
local rid_at, last, rids, assign = {}, {}, {}, {}
for i = 7, #ARGV, 2 do
  local rid = string.match(ARGV[i + 1], '^{"registrationId":(%d+)[,}]')
  if ARGV[i] ~= '' then
    rid = rid or registrations_of(ARGV[i + 1])[1]
  elseif rid then
    assign[i] = true
  end
  rid_at[i] = rid
  if rid and not last[rid] then
    last[rid] = 0
    rids[#rids + 1] = rid
  end
end
for from = 1, #rids, 200 do
  local part, keys, fields = {}, {}, {}
  for k = from, math.min(from + 199, #rids) do
    part[#part + 1] = rids[k]
    keys[#keys + 1] = seq_prefix .. rids[k]
    fields[#fields + 1] = 's' .. rids[k]
  end
  local values = redis.call('MGET', unpack(keys))
  local old = mixed and redis.call('HMGET', legacy, unpack(fields)) or {}
  for k, rid in ipairs(part) do
    last[rid] = math.max(tonumber(values[k]) or 0, (mixed and tonumber(old[k])) or 0)
  end
end
local seen = {}
for i = 7, #ARGV, 2 do
  local seq, rid = tonumber(ARGV[i]), rid_at[i]
  if assign[i] then
    seq = last[rid] + 1
    last[rid] = seq
    seen[rid] = true
    ids[#ids + 1] = add(string.sub(ARGV[i + 1], 1, -2) .. ',"seq":' .. seq .. '}')
  elseif seq and rid and seq <= last[rid] then
    ids[#ids + 1] = ''
  else
    if seq and rid then
      last[rid] = seq
      seen[rid] = true
    end
    ids[#ids + 1] = add(ARGV[i + 1])
  end
end
-- (the legacy hash gets them too while it exists, for the old instances' checks; HSET keeps
-- its expiry, so it still expires the age cap after the last old instance's batch)
local pairs_out = {}
for rid in pairs(seen) do
  redis.call('SET', seq_prefix .. rid, last[rid], 'PX', max_age)
  if mixed then
    pairs_out[#pairs_out + 1] = 's' .. rid
    pairs_out[#pairs_out + 1] = last[rid]
    if #pairs_out >= 400 then
      redis.call('HSET', legacy, unpack(pairs_out))
      pairs_out = {}
    end
  end
end
if #pairs_out > 0 then redis.call('HSET', legacy, unpack(pairs_out)) end
if ARGV[3] ~= '' then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[3])
end
if id then
  redis.call('HSET', state, 'last', id)
  redis.call('PEXPIRE', state, max_age)
end
-- An index list holds entry ids only (the messages stay in the history) and expires, from its
-- first entry, after twice the history's span and at least 5 minutes (at most the age cap): it
-- covers a run, and a later run of the registration begins a new list. One that expired is only
-- slower to read (the reader scans the history).
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local span = 0
if #first > 0 then
  local t = redis.call('TIME')
  span = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    - tonumber(string.match(first[1][1], '^(%d+)'))
end
local ttl = math.floor(math.min(max_age, math.max(2 * span, 300000)))
for key in pairs(touched) do
  redis.call('PEXPIRE', key, ttl)
end
return ids
"""
)

# KEYS: history, epoch, primary; ARGV[1]: the replication id of the server we are talking to.
# Returns 1 when it began a new epoch (the history belonged to another primary), else 0.
# No id kept yet: a Redis that lost its data (its epoch is new already, maybe just made by a
# publish that won the race) or the first check ever; either way this history is this primary's.
_PRIMARY_SCRIPT = """
local known = redis.call('GET', KEYS[3])
if known == ARGV[1] then
  return 0
end
redis.call('SET', KEYS[3], ARGV[1])
if not known or not redis.call('GET', KEYS[2]) then
  return 0
end
local t = redis.call('TIME')
redis.call('SET', KEYS[2], t[1] .. string.format('%06d', tonumber(t[2])))
redis.call('DEL', KEYS[1])
return 1
"""


class Subscription:
    """What ``RegistrationPubSub.subscribe`` returns (a broker per partition of the bus: one on
    one Redis); ``await sub.aclose()`` unsubscribes."""

    def __init__(self, brokers: list[Broker], tasks: list[asyncio.Task[None]]) -> None:
        self.brokers = brokers
        self._tasks = tasks

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class RegistrationPubSub:
    """The seed's ``RegistrationPubSub``: ``publish_update``, ``publish_stage_update``,
    ``publish_final_status`` and ``subscribe``. Publishing never raises. ``subscribe`` runs a
    ``broker.Broker`` (the only module that speaks Redis's subscribe API) on a connection of its
    own, with the same reconnect, re-subscribe and catch-up as the service's fan-out.
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        channel: str = ServiceChannel.REGISTRATION_UPDATES,
        layout: Layout | None = None,
        history_maxlen: int = 10_000,
        history_max_age: float = 3600.0,
        outbox_max: int = 10_000,
        batch_max: int = 256,
        hold_max: float = 5.0,
        subscriber: Callable[[], Redis] | None = None,
        recover: Recover | None = None,
    ) -> None:
        self._redis = redis
        self._subscriber = subscriber
        self.channel = channel
        #: the bus's partitions (``partitions.py``): one (the seed's channel) on one Redis
        self.layout = layout if layout is not None else Layout.single(channel)
        first = self.layout.partitions[0]
        self.history_key = first.history_key  # (one Redis: the only partition's keys)
        self.epoch_key = first.epoch_key
        self._maxlen = str(history_maxlen)
        self._max_age_ms = int(history_max_age * 1000)
        self._script = redis.register_script(_PUBLISH_SCRIPT)
        self._sharded = "s" if self.layout.sharded else ""
        #: partitions whose next call checks the primary in the script: all at first, and any
        #: whose call failed (its retry may reach a promoted replica)
        self._verify = set(range(len(self.layout)))
        self._mirror = (self.layout.mirror or "").encode()
        self.primary_key = first.primary_key
        self._primary_script = redis.register_script(_PRIMARY_SCRIPT)
        self._primary_check_refused = False
        # (registrationId, seq, encoded message); seq is what the script deduplicates by
        self._outbox: deque[_Entry] = deque()
        self._outbox_max = outbox_max
        self._batch_max = batch_max
        # backpressure (see the module docstring): cleared at the high-water mark while Redis
        # takes updates, set again at the low-water mark, while failing, and when the flusher ends
        self._high_water = max(1, outbox_max // 2)
        self._low_water = self._high_water // 2
        self._room = asyncio.Event()
        self._room.set()
        self._hold_max = hold_max
        self._failing = False
        self._overflowed: set[int] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._last_trim_ms = 0
        # Overflow recovery (module docstring): registrations whose updates the outbox dropped,
        # not caught up yet (their updates are dropped too: the catch-up republishes them in
        # order), and those being caught up (their new updates are held until it is done).
        self._recover = recover
        self._gapped: set[int] = set()
        self._catching: dict[int, list[_Entry]] = {}
        self._recovery: asyncio.Task[None] | None = None
        #: set when Redis answers again after an outage (a publish failed or stalled past
        #: ``hold_max``, or a subscription reconnected: ``check_primary`` after the first): the
        #: service's catch-up task then compares the process log with Redis again (another
        #: instance may have died meanwhile with committed updates in its outbox)
        self.back = asyncio.Event()
        # what ``from_url`` made and ``subscribe`` started: ``aclose`` ends them
        self._owned: RedisClient | None = None
        self._target: RedisTarget | None = None  # (from_url: to reach a cluster's nodes)
        self._name = "regstream-pubsub"
        self._subscriptions: set[Subscription] = set()

    # --- the seed's verbs ----------------------------------------------------------------------

    @classmethod
    def from_url(
        cls, url: str, *, name: str = "regstream-pubsub", cluster: bool = False,
        nodes: Sequence[tuple[str, int]] = (), partitions: int = 16, mirror: bool = False,
        **options: Any,
    ) -> Self:  # fmt: skip
        """A publisher (and subscriber) for the Redis at ``url`` (``redis://``, ``rediss://``,
        ``unix://``, ``redis+sentinel://``), on connections of its own that ``aclose`` closes:

            pubsub = RegistrationPubSub.from_url("redis://localhost:6379/0")
            await pubsub.publish_stage_update(42, "duplicate_check", "started")
            await pubsub.aclose()

        ``cluster=True``: ``url`` names a node of a Redis Cluster, ``nodes`` more startup nodes
        ``(host, port)`` asked in turn when it is down (the service's ``REDIS_CLUSTER_NODES``,
        with ``url``'s scheme, credentials and TLS); the bus is ``partitions``
        partitions (as the service's ``REGSTREAM_PARTITIONS``: publishers and subscribers of one
        deployment must agree), ``mirror`` copies every update to the seed's channel. ``options``
        are the constructor's (``channel``, ``history_maxlen``, ...)."""
        target = RedisTarget.from_url(url)
        if nodes and not cluster:
            raise ValueError("nodes are the startup nodes of a Redis Cluster: pass cluster=True")
        if cluster:
            target = replace(target, cluster=True, nodes=tuple(nodes))
            options.setdefault("layout", Layout.cluster(partitions, mirror=mirror))
        commands = create_client(target, name=name, retries=0,  # (the flusher retries: _send_to)
                                 max_connections=max(8, partitions + 4))  # fmt: skip
        pubsub = cls(
            commands, **options,
            subscriber=lambda: create_subscriber_client(target, name=f"{name}-sub"),
        )  # fmt: skip
        pubsub._owned = commands
        pubsub._target = target
        pubsub._name = name
        return pubsub

    async def publish_update(self, update: dict[str, Any]) -> None:
        """Publish an update built by the caller; checked like the builders of ``messages``
        (``ValueError`` for an unknown status). Without ``seq``, Redis numbers it."""
        messages.check_update(update)
        self.enqueue_update(update)

    async def publish_stage_update(
        self,
        registration_id: int,
        stage: str,
        status: str,
        details: str | dict[str, Any] | None = None,
        *,
        message: str | None = None,
        seq: int | None = None,
        timestamp: int | None = None,
    ) -> None:
        """A stage's progress; ``status`` is ``started``, ``completed`` or ``failed``.

        ``details`` as the seed passes it: its text for the step (the seed's ``details || error``)
        is the message's ``message``; a dict is its ``details``. Without either ``message`` or a
        text, the message is ``"<status>: <stage>"``. Without ``seq``, Redis numbers it."""
        if isinstance(details, str):
            message, details = message if message is not None else details, None
        await self.publish_update(
            messages.stage_update(
                registration_id, stage, status,
                f"{status}: {stage}" if message is None else message,
                seq=seq, timestamp=timestamp, details=details,
            )
        )  # fmt: skip

    async def publish_final_status(
        self,
        registration_id: int,
        status: str,
        message: str,
        details: dict[str, Any] | None = None,
        process_log: list[dict[str, Any]] | None = None,
        *,
        seq: int | None = None,
        timestamp: int | None = None,
    ) -> None:
        """A run's end; ``status`` is APPROVED, COMPLETED, DUPLICATE or FAILED."""
        await self.publish_update(
            messages.final_update(
                registration_id, status, message, seq=seq, timestamp=timestamp, details=details,
                process_log=process_log,
            )
        )  # fmt: skip

    def enqueue_update(self, update: dict[str, Any]) -> None:
        """``publish_update`` without an await: queued at once (the runner calls it right after
        a commit, inside the group commit's worker)."""
        rid, seq = update.get("registrationId"), update.get("seq")
        self._enqueue((
            rid if isinstance(rid, int) else None, seq if isinstance(seq, int) else None,
            messages.encode(update),
        ))  # fmt: skip

    async def subscribe(
        self, callback: Callable[[dict[str, Any]], None], *, ready_timeout: float = 5.0
    ) -> Subscription:
        """Call ``callback`` with every update published from now on (decoded JSON objects)."""
        if self._subscriber is None:
            raise RuntimeError("RegistrationPubSub was built without a subscriber connection")
        brokers = [
            Broker(
                subscriber=self._subscriber_of(partition), commands=self._redis,
                partition=partition, on_update=lambda parsed: callback(orjson.loads(parsed.raw)),
                on_connect=functools.partial(self._check_partition, partition.index),
            )  # fmt: skip
            for partition in self.layout.partitions
        ]
        tasks = [asyncio.create_task(b.run(), name="registration-subscription") for b in brokers]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ready_timeout):
                await asyncio.gather(*(b.connected.wait() for b in brokers))
        subscription = Subscription(brokers, tasks)
        self._subscriptions.add(subscription)
        return subscription

    async def _check_partition(self, index: int, reconnected: bool) -> None:
        await self.check_primary(index, reconnected=reconnected)

    def _subscriber_of(self, partition: Partition) -> Callable[[], Redis]:
        """The subscriber client factory of a partition: the given one on one Redis; in a
        cluster, a client of the node owning the partition's slot (asked at each connect)."""
        target, subscriber = self._target, self._subscriber
        assert subscriber is not None
        if not partition.sharded or target is None or not isinstance(self._redis, RedisCluster):
            return subscriber
        cluster, name = self._redis, f"{self._name}-sub"

        def node_client() -> Redis:
            node = cluster.get_node_from_key(partition.channel)
            if node is None:
                raise RedisConnectionError(f"no node serves partition {partition.index}'s slot")
            return create_node_subscriber_client(target, node.host, int(node.port), name=name)

        return node_client

    # --- mechanics -----------------------------------------------------------------------------

    async def publish_raw(self, payload: bytes) -> None:
        """Queue one encoded JSON object for publication, after everything queued before it."""
        self._enqueue(_entry(payload))

    async def _send(self, entries: list[_Entry]) -> list[str]:
        """Publish in one script call per partition; per entry its event id, or '' if it was
        published already (its seq not above the registration's last one in this epoch).

        Partitions live on different shards in a cluster: their calls run concurrently, and
        when some fail, ``PartlySent`` gives back the entries of those only (in order), so a
        shard failing over does not make the others' updates wait or go out twice."""
        now = messages.now_ms()
        minid = ""
        if now - self._last_trim_ms > 1000:
            self._last_trim_ms = now
            minid = str(now - self._max_age_ms)
        if len(self.layout) == 1:
            return await self._send_to(self.layout.partitions[0], entries, minid)
        groups: dict[int, list[_Entry]] = {}
        for entry in self._by_partition(entries):
            groups.setdefault(entry[0], []).append(entry[1])
        order = sorted(groups)
        results = await asyncio.gather(
            *(self._send_to(self.layout.partitions[i], groups[i], minid) for i in order),
            return_exceptions=True,
        )
        ids: list[str] = []
        unsent: list[_Entry] = []
        error: BaseException | None = None
        for i, result in zip(order, results, strict=True):
            if isinstance(result, BaseException):
                error = error or result
                unsent.extend(groups[i])
            else:
                ids.extend(result)
        if error is not None:
            if not isinstance(error, REDIS_ERRORS):
                raise error
            raise PartlySent(unsent) from error
        return ids

    def _by_partition(self, entries: list[_Entry]) -> list[tuple[int, _Entry]]:
        """Each entry with its partition; a resync naming registrations of several partitions
        becomes one resync per partition, naming that partition's."""
        count = len(self.layout)
        out: list[tuple[int, _Entry]] = []
        for entry in entries:
            rid = entry[0]
            if rid is not None:
                out.append((rid % count, entry))
                continue
            named = _resync_ids(entry[2])
            if named is None:  # not about a registration: partition 0
                out.append((0, entry))
                continue
            if not named:  # a resync of everything: every partition's streams
                out.extend((index, entry) for index in range(count))
                continue
            split: dict[int, list[int]] = {}
            for one in named:
                split.setdefault(one % count, []).append(one)
            for index, ids in sorted(split.items()):
                body = {"type": "resync", "registrationIds": ids, "timestamp": messages.now_ms()}
                out.append((index, (None, None, orjson.dumps(body))))
        return out

    async def _send_to(self, partition: Partition, entries: list[_Entry], minid: str) -> list[str]:
        check = partition.index in self._verify
        flags = (self._sharded + ("c" if check else "")).encode()
        try:
            result = await self._call(partition, entries, minid, flags)
        except BaseException:
            self._verify.add(partition.index)
            raise
        if check:
            self._verify.discard(partition.index)
        if result[0]:
            self._began(partition)
        ids = [r.decode() if isinstance(r, bytes) else str(r) for r in result[1:]]
        skipped = ids.count("")
        if skipped:
            metrics.PUBLISH_DUPLICATES_SKIPPED.inc(skipped)
        return ids

    async def _call(
        self, partition: Partition, entries: list[_Entry], minid: str, flags: bytes
    ) -> list[Any]:
        result = await self._script(
            keys=[partition.history_key, partition.epoch_key, partition.index_state_prefix,
                  partition.index_key_prefix, partition.primary_key, partition.seq_key_prefix,
                  partition.legacy_state_prefix],
            args=[
                self._maxlen, partition.channel, minid, self._max_age_ms, flags,
                self._mirror,
                *(arg for _, seq, payload in entries for arg in (b"" if seq is None else seq,
                                                                 payload)),
            ],
        )  # fmt: skip
        return list(result)

    async def published_seqs(self, registration_ids: list[int]) -> dict[int, int]:
        """The last seq published in this epoch per registration (absent: none, or its key
        expired: nothing of it within the age cap; all of them when there is no epoch yet), from
        the seq keys the publish script keeps (MGET, one partition's keys at a time: one slot),
        and the legacy hash while an older release's instance keeps it (the module docstring).
        Raises ``RedisError``/``OSError`` like any command."""
        out: dict[int, int] = {}
        groups: dict[int, list[int]] = {}
        for rid in registration_ids:
            groups.setdefault(self.layout.of(rid).index, []).append(rid)
        for index, rids in groups.items():
            partition = self.layout.partitions[index]
            raw = await self._redis.get(partition.epoch_key)
            if not raw:
                continue
            epoch = raw.decode() if isinstance(raw, bytes) else raw
            values = await self._redis.mget([f"{partition.seq_key_prefix}{epoch}:{rid}"
                                             for rid in rids])  # fmt: skip
            legacy = partition.legacy_state_prefix + epoch
            old = (await self._redis.hmget(legacy, [f"s{rid}" for rid in rids])
                   if await self._redis.exists(legacy) else [None] * len(rids))  # fmt: skip
            for rid, value, before in zip(rids, values, old, strict=True):
                seq = max(int(value or 0), int(before or 0))
                if seq:
                    out[rid] = seq
        return out

    async def check_primary(self, partition: int | None = None, *, reconnected: bool = False) -> bool:
        """After a (re)connect: begin a new epoch if Redis is now another primary's history.

        ``partition``: that partition's (its broker connected); None: every partition's.
        Returns True when this call began one. Raises ``REDIS_ERRORS`` like any command
        (callers retry after reconnecting). Without ``INFO`` (a managed Redis that renamed it)
        failovers are not detected: logged once. ``reconnected`` (a subscription that was
        connected before came back, not one subscribed on demand) also sets ``back``: the
        service's catch-up then compares the process log with Redis.
        """
        if reconnected:
            self.back.set()
        parts = self.layout.partitions if partition is None else (
            self.layout.partitions[partition],)  # fmt: skip
        began = False
        for part in parts:
            try:
                replid = await self._replication_id(part)
            except ResponseError:
                if not self._primary_check_refused:
                    self._primary_check_refused = True
                    log.warning("Redis refuses INFO; a failover's lost updates cannot be detected")
                return False
            if not replid:
                continue
            if await self._primary_script(
                keys=[part.history_key, part.epoch_key, part.primary_key], args=[replid]
            ):
                began = True
                self._began(part)
        return began

    def _began(self, partition: Partition) -> None:
        metrics.REDIS_EPOCHS_BEGUN.inc()
        self.back.set()  # the catch-up compares the process log with the new history
        log.warning(
            "Redis is another primary's history now (failover or restart): began a new epoch%s; "
            "streams re-sync from the database",
            f" of partition {partition.index}" if len(self.layout) > 1 else "",
        )

    async def _replication_id(self, partition: Partition) -> str | bytes | None:
        """The replication id of the primary holding the partition's keys."""
        if isinstance(self._redis, RedisCluster):
            await self._redis.initialize()  # (the slot map; once)
            node = self._redis.get_node_from_key(partition.epoch_key)
            info = await self._redis.info("replication", target_nodes=node)
        else:
            info = await self._redis.info("replication")
        replid = info.get("master_replid")
        return replid if isinstance(replid, str | bytes) and replid else None

    async def wait_for_room(self) -> None:
        """Return when the outbox has room: at once below its high-water mark or while Redis is
        failing (validations go on then; the overflow rule applies), else when the flusher has
        published it down to the low-water mark."""
        if self._room.is_set():
            return
        metrics.PUBLISH_HOLDS.inc()
        try:
            await asyncio.wait_for(self._room.wait(), self._hold_max)
        except TimeoutError:
            if not self._failing:
                self._failing = True
                log.warning(
                    "publishing stalled for %.0f s; validations go on, updates wait in the outbox",
                    self._hold_max,
                )
            self._room.set()

    def _enqueue(self, entry: _Entry) -> None:
        rid = entry[0]
        if rid is not None and (self._gapped or self._catching):
            if rid in self._gapped:
                return  # committed: the catch-up publishes it, after the ones dropped before it
            held = self._catching.get(rid)
            if held is not None:
                held.append(entry)
                return
        self._outbox.append(entry)
        self._trim_outbox()
        if len(self._outbox) >= self._high_water and not self._failing:
            self._room.clear()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="publish-flusher")

    def _trim_outbox(self) -> None:
        while len(self._outbox) > self._outbox_max:
            rid = self._outbox.popleft()[0]
            metrics.OUTBOX_OVERFLOWS.inc()
            if rid is not None:
                self._overflowed.add(rid)
                if self._recover is not None:
                    self._gapped.add(rid)
        metrics.OUTBOX_SIZE.set(len(self._outbox))

    async def _flush(self) -> None:
        try:
            await self._flush_all()
        finally:
            self._room.set()  # never leave producers waiting on a flusher that has stopped

    async def _flush_all(self) -> None:
        delay = 0.1
        while self._outbox or self._overflowed:
            batch: list[_Entry] = []
            # taken before the await: registrations that overflow meanwhile go to the next one
            announced, self._overflowed = self._overflowed, set()
            try:
                # (after a failure: whether Redis is now another primary's is checked by the
                # publish script itself, per partition, so a shard that is still down holds up
                # only its own partitions)
                if announced:
                    resync = {
                        "type": "resync",
                        "registrationIds": sorted(announced),
                        "timestamp": messages.now_ms(),
                    }
                    await self._send([(None, None, orjson.dumps(resync))])
                    announced = set()
                n = min(len(self._outbox), self._batch_max)
                batch = [self._outbox.popleft() for _ in range(n)]
                if self._gapped or self._catching:  # queued before the gap: the catch-up's now
                    batch = [e for e in batch if e[0] not in self._gapped
                             and e[0] not in self._catching]  # fmt: skip
                if batch:
                    sent_at = time.monotonic()
                    await self._send(batch)
                    metrics.OUTBOX_SIZE.set(len(self._outbox))
                    if time.monotonic() - sent_at > self._hold_max:
                        self.back.set()  # Redis stalled (stopped, paused) and is back
                if self._gapped and (self._recovery is None or self._recovery.done()):
                    self._recovery = asyncio.create_task(self._catch_up(), name="publish-catch-up")
                if len(self._outbox) <= self._low_water:
                    self._room.set()
                if self._failing:
                    self._failing = False
                    delay = 0.1
                    self.back.set()
                    log.info("publishing again; outbox flushed in order")
            except asyncio.CancelledError:
                self._outbox.extendleft(reversed(batch))  # shutdown: aclose() reports them
                self._overflowed |= announced
                raise
            except Exception as exc:  # Redis's (REDIS_ERRORS), or a bug: the batch is kept
                # Put the batch back in front, in order (only the partitions that failed, when
                # others took theirs); what no longer fits is announced later.
                if not isinstance(exc, REDIS_ERRORS):
                    log.exception("publishing failed unexpectedly; keeping the updates")
                self._overflowed |= announced
                unsent = exc.unsent if isinstance(exc, PartlySent) and batch else batch
                self._outbox.extendleft(reversed(unsent))
                self._trim_outbox()
                metrics.PUBLISH_FAILURES.inc()
                self._room.set()
                if not self._failing:
                    self._failing = True
                    log.warning("publish failed, keeping updates for later: %s", type(exc).__name__)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)

    async def _catch_up(self) -> None:
        """Publish again, from the database (``recover``), what the outbox dropped: a page of
        gapped registrations at a time, their updates Redis has not seen in order, then what they
        queued meanwhile (the script skips any seq published already). Retried with backoff."""
        assert self._recover is not None
        delay, registrations, updates = 0.5, 0, 0
        while self._gapped:
            page = sorted(self._gapped)[:_RECOVER_PAGE]
            self._gapped.difference_update(page)
            for rid in page:
                self._catching[rid] = []
            try:
                missing = await self._recover(page)
            except asyncio.CancelledError:
                for rid in page:
                    del self._catching[rid]
                raise
            except Exception as exc:  # noqa: BLE001 - the hook's (Redis, database): retried
                for rid in page:  # what they queued meanwhile is committed: caught up next time
                    del self._catching[rid]
                self._gapped.update(page)
                log.warning("catching up after an outbox overflow failed: %s", type(exc).__name__)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 10.0)
                continue
            for update in missing:
                self._outbox.append(_entry(messages.encode(update)))
            for rid in page:
                self._outbox.extend(self._catching.pop(rid))
            registrations, updates = registrations + len(page), updates + len(missing)
            self._trim_outbox()  # Redis down again: what overflows is gapped again
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush(), name="publish-flusher")
            await self.wait_for_room()
        log.info(
            "outbox overflow: %d updates of %d registrations republished from the database",
            updates, registrations,
        )  # fmt: skip

    @property
    def pending(self) -> int:
        return len(self._outbox)

    async def wait_flushed(self, timeout: float) -> bool:
        """Wait (bounded) until the outbox is empty; used at shutdown."""
        if self._flusher is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._flusher), timeout)
        except TimeoutError:
            return False
        return not self._outbox

    async def aclose(self) -> None:
        if self._recovery is not None and not self._recovery.done():
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
        if self._outbox:
            log.warning(
                "%d updates were not published (Redis unreachable at shutdown)", len(self._outbox)
            )
        for subscription in self._subscriptions:
            await subscription.aclose()
        self._subscriptions.clear()
        if self._owned is not None:
            await self._owned.aclose()
            self._owned = None


class PartlySent(RedisError):
    """Some partitions' script calls failed (``_send``): ``unsent`` are their entries, in order."""

    def __init__(self, unsent: list[_Entry]) -> None:
        super().__init__(f"{len(unsent)} updates not published")
        self.unsent = unsent


def _resync_ids(payload: bytes) -> list[int] | None:
    """The registrations a resync message names; None for any other message."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("type") != "resync":
        return None
    ids = obj.get("registrationIds")
    return [i for i in ids if isinstance(i, int)] if isinstance(ids, list) else []


def _entry(payload: bytes) -> _Entry:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None, None, payload
    if not isinstance(obj, dict):
        return None, None, payload
    rid, seq = obj.get("registrationId"), obj.get("seq")
    valid = isinstance(rid, int) and not isinstance(rid, bool)
    return (rid if valid else None), (seq if valid and isinstance(seq, int) else None), payload
