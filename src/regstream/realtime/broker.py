"""One partition's Redis subscription: receive, de-duplicate, hand to the hub.

Only this module calls redis-py's subscribe API. The loop, per partition (``partitions.py``; one
Redis has one partition, the seed's channel):

1. connect and subscribe the partition's channel and this subscriber's probe channel:
   ``SUBSCRIBE`` on one Redis; in a Redis Cluster ``SSUBSCRIBE`` on the node that owns the
   partition's slot (asked of the cluster client's slot map, refreshed by a keyed command first,
   so after a failover the promoted replica is found); then ``on_connect`` (the publisher's
   ``check_primary`` for this partition: after a failover, a new epoch begins before we catch
   up, so step 2 sees it);
2. catch up from the partition's history: every update after the last one we dispatched (Pub/Sub
   messages published while we were disconnected are gone; the stream still has them);
3. read messages; each carries an ``eventId``, and anything at or before the last dispatched id
   is a duplicate of the catch-up and skipped; an update of another epoch than the last one
   means the history was replaced under a live subscription: streams re-sync first;
4. on any connection error (also a shard channel the server unsubscribed us from: its slot moved):
   back off (exponential, full jitter) and go to 1.

A subscription can also die silently (a proxy dropping the flow, a wedged server): every
``probe_interval`` we publish a probe to our own probe channel (in the partition's slot, so it
travels the same shard); if none came back for three intervals, ``healthy`` turns False
(readiness goes red, a metric says so) and the subscriber is rebuilt. ``CancelledError`` is
always re-raised.

Messages are read with redis-py's public connection API: the ``PubSub``'s ``connection`` and its
``read_response`` (every redis-py connection class has it, ``AbstractConnection``), under one
deadline per probe interval (``asyncio.timeout``), every reply already buffered handled in the
same wake-up. That is what ``PubSub.get_message`` does per message, without its per-message
deadline, health-check ``PING`` (not configured here: the probes are ours), retry wrapper (a
silent reconnect inside it would re-subscribe without the history catch-up; here any connection
error rebuilds the subscription through step 1), observability hooks and message dict: with the
parse, the hub and the RESP2 subscriber client, 1.9-2.6x less CPU per received message in bursts
of 7-50 (``bench/broker_bench.py``). Replies are the server's
``[kind, channel, data]``; with RESP3 a message is a push, handed back the same way
(``push_request=True``). A reader of our own on redis-py's private internals is not needed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from regstream import metrics
from regstream.realtime import messages
from regstream.realtime.connections import REDIS_ERRORS, RedisClient
from regstream.realtime.history import History
from regstream.realtime.messages import EventKey, Parsed, ServiceChannel
from regstream.realtime.partitions import Layout, Partition

log = logging.getLogger(__name__)

_DATA = (b"message", b"smessage", "message", "smessage")
_GONE = (b"unsubscribe", b"sunsubscribe", "unsubscribe", "sunsubscribe")


class Broker:
    def __init__(
        self,
        *,
        subscriber: Callable[[], Redis],
        commands: RedisClient,
        on_update: Callable[[Parsed], None],
        on_resync: Callable[[tuple[int, ...]], None] | None = None,
        on_connect: Callable[[bool], Awaitable[object]] | None = None,
        on_position: Callable[[EventKey], None] | None = None,
        channel: str = ServiceChannel.REGISTRATION_UPDATES,
        partition: Partition | None = None,
        probe_interval: float = 5.0,
        history_max: int = 10_000,
        health_metric: bool = False,
    ) -> None:
        self._subscriber_factory = subscriber
        self._commands = commands
        self._on_update = on_update
        self._on_resync = on_resync
        self._on_connect = on_connect
        self._on_position = on_position
        self.partition = partition if partition is not None else Layout.single(channel).partitions[0]
        self.channel = self.partition.channel.encode()
        self.probe_channel = self.partition.probe_channel(uuid.uuid4().hex).encode()
        self._probe_interval = probe_interval
        self._history = History(commands, partition=self.partition, max_entries=history_max)
        self.last_key: EventKey | None = None
        self.connected = asyncio.Event()
        self._last_probe_seen = time.monotonic()
        self.received = 0
        self._subscribed_once = False
        if health_metric:
            # Read at scrape time, so the metric turns red as soon as probes stop coming back,
            # even while the loop itself is stuck waiting on a silent server.
            metrics.REDIS_SUBSCRIPTION_HEALTHY.set_function(lambda: float(self.healthy))

    @property
    def ever_connected(self) -> bool:
        """It has been subscribed once: from then on its reconnects catch up from the history."""
        return self._subscribed_once

    @property
    def healthy(self) -> bool:
        return (
            self.connected.is_set()
            and time.monotonic() - self._last_probe_seen < 3 * self._probe_interval
        )

    async def run(self) -> None:
        """Subscribe forever (until cancelled), reconnecting with backoff."""
        delay = 0.1
        first = True
        sharded = self.partition.sharded
        while True:
            client: Redis | None = None
            pubsub: PubSub | None = None
            try:
                if sharded and isinstance(self._commands, RedisCluster):
                    # a keyed command: the cluster client refreshes its slot map on MOVED or on
                    # a dead node, so the factory below finds the slot's current owner
                    await self._commands.exists(self.partition.epoch_key)
                client = self._subscriber_factory()
                pubsub = client.pubsub(push_handler_func=_as_is)
                if sharded:
                    await pubsub.ssubscribe(self.channel, self.probe_channel)
                else:
                    await pubsub.subscribe(self.channel, self.probe_channel)
                if not first:
                    metrics.REDIS_RECONNECTS.labels("subscriber").inc()
                    log.info("re-subscribed to %s", self.channel.decode())
                first = False
                if self._on_connect is not None:  # (True: reconnected, not the first time)
                    await self._on_connect(self._subscribed_once)
                await self._catch_up()
                self.connected.set()
                self._last_probe_seen = time.monotonic()
                delay = 0.1
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                log.warning("subscription lost (%s); reconnecting", _reason(exc))
            except Exception:  # a bug must not end the only subscription: log it, rebuild
                log.exception("subscription loop failed; rebuilding")
            finally:
                self.connected.clear()
                if pubsub is not None:
                    await _quietly(pubsub.aclose())
                if client is not None:
                    await _quietly(client.aclose())
            await asyncio.sleep(delay * random.random() + 0.05)
            delay = min(delay * 2, 5.0)

    def _position(self, key: EventKey) -> None:
        self.last_key = key
        if self._on_position is not None:
            self._on_position(key)

    async def _catch_up(self) -> None:
        if not self._subscribed_once:  # first subscription: live from here on
            self._subscribed_once = True
            latest = await self._history.latest()
            if latest is None:
                epoch = await self._history.epoch()
                latest = EventKey(epoch, 0, 0) if epoch is not None else None
            if latest is not None:
                self._position(latest)
            return
        last = self.last_key
        if last is None:
            # History was empty when we first subscribed: everything in it now is new to us.
            for parsed in (await self._history.since(None)).entries:
                self._dispatch(parsed)
            return
        replay = await self._history.since(last)
        if replay.complete:
            for parsed in replay.entries:
                self._dispatch(parsed)
            return
        # The history cannot prove it covers our disconnection (trimmed, or Redis lost its data
        # and a new epoch began): streams must re-sync from the database, then go on live.
        log.warning("history cannot cover the disconnection; asking streams to re-sync")
        if self._on_resync is not None:
            self._on_resync(())
        if replay.epoch is not None and replay.epoch != last.epoch:
            # the new epoch is all new to us: from its start, then live. Positioned by what was
            # dispatched, never by a later read of the newest entry (an update published
            # between the two reads would arrive live and be taken for a duplicate).
            self._position(EventKey(replay.epoch, 0, 0))
            for parsed in (await self._history.since(None)).entries:
                self._dispatch(parsed)
            return
        latest = await self._history.latest()
        if latest is not None:
            self._position(latest)
        elif replay.epoch is not None:
            # an empty new epoch: remember it, so its first live update is not taken for
            # another change of epoch (a second re-sync)
            self._position(EventKey(replay.epoch, 0, 0))

    async def _read(self, pubsub: PubSub) -> None:
        publish = self._commands.spublish if self.partition.sharded else self._commands.publish
        connection = pubsub.connection
        if connection is None:  # (subscribe connected it; a closed PubSub has none)
            raise RedisConnectionError("the subscription has no connection")
        while True:
            now = time.monotonic()
            await publish(self.probe_channel, b"probe")
            if now - self._last_probe_seen > 3 * self._probe_interval:
                log.error("probe did not come back through Redis; rebuilding the subscriber")
                return
            # One deadline per probe interval, not one per read (module docstring).
            window = asyncio.timeout(self._probe_interval)
            try:
                async with window:
                    await self._drain(connection)
            except TimeoutError:
                if not window.expired():
                    raise

    async def _drain(self, connection: Connection) -> None:
        """Read and handle replies until cancelled (the probe window's deadline) or an error.

        ``Connection.read_response`` with ``timeout=math.inf`` reads with no deadline of its own
        (the window's is around it); ``disconnect_on_error=False`` as ``PubSub`` reads: a read
        cancelled by the deadline leaves the connection as it was (unread bytes stay buffered);
        ``push_request=True``: with RESP3 a message is a push, handed back like a reply."""
        read = connection.read_response
        on_reply = self._on_reply
        while True:
            on_reply(await read(timeout=math.inf, disconnect_on_error=False, push_request=True))

    def _on_reply(self, reply: object) -> None:
        """One raw reply of the subscribed connection: ``[kind, channel, data]``."""
        if not isinstance(reply, list) or len(reply) != 3:
            return  # a pong, or anything unexpected
        kind, channel, data = reply
        if kind in _DATA:
            if channel == self.probe_channel:
                self._last_probe_seen = time.monotonic()
                return
            if not isinstance(data, bytes):
                return
            parsed = messages.parse_message(data)
            if parsed is None:
                return
            if parsed.resync is not None:
                if self._on_resync is not None:
                    self._on_resync(parsed.resync)
                return
            self._dispatch(parsed)
        elif kind in _GONE:
            # the server dropped a subscription we did not give up (a shard channel whose slot
            # moved to another node): subscribe again where it lives now
            raise RedisConnectionError(f"the server ended the subscription ({kind!r})")
        # else: subscribe confirmations

    def _dispatch(self, parsed: Parsed) -> None:
        key = parsed.key
        if key is not None:
            last = self.last_key
            if last is not None and last.epoch == key.epoch:
                if (key.ms, key.n) <= (last.ms, last.n):
                    return  # already dispatched (catch-up overlap)
            elif last is not None:
                # The history was replaced while we stayed subscribed (a new epoch began):
                # what the old one lost is unknown, so every stream re-syncs before going on.
                log.warning("updates of a new epoch arrived live; asking streams to re-sync")
                if self._on_resync is not None:
                    self._on_resync(())
            self.last_key = key
        self.received += 1
        metrics.REDIS_MESSAGES_RECEIVED.inc()
        self._on_update(parsed)


async def _as_is(reply: object) -> object:
    """With RESP3 (redis-py 8's default) a message is a push; ``PubSub``'s own push handler logs
    each at DEBUG (a ``getLogger`` per message) before handing it back. This only hands it back."""
    return reply


def _reason(exc: BaseException) -> str:
    """The error's class and redis-py's message: "Error 1 connecting to host:port. [SSL:
    CERTIFICATE_VERIFY_FAILED] …", "Connection refused", "invalid username-password pair": what
    an operator needs, never credentials (redis-py's messages name the address only)."""
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _quietly(awaitable: object) -> None:
    try:
        await awaitable  # type: ignore[misc]
    except Exception:  # noqa: BLE001 - closing a broken connection may fail in many ways
        pass
