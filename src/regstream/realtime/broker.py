"""The process's one Redis subscription: receive, de-duplicate, hand to the hub.

Only this module calls redis-py's subscribe API. The loop:

1. connect and ``SUBSCRIBE`` the updates channel and this process's probe channel; then
   ``on_connect`` (the publisher's ``check_primary``: after a failover, a new epoch begins
   before we catch up, so step 2 sees it);
2. catch up from the history stream: every update after the last one we dispatched (Pub/Sub
   messages published while we were disconnected are gone; the stream still has them);
3. read messages; each carries an ``eventId``, and anything at or before the last dispatched id
   is a duplicate of the catch-up and skipped; an update of another epoch than the last one
   means the history was replaced under a live subscription: streams re-sync first;
4. on any connection error: back off (exponential, full jitter) and go to 1.

A subscription can also die silently (a proxy dropping the flow, a wedged server): every
``probe_interval`` we publish a probe to our own probe channel; if none came back for three
intervals, ``healthy`` turns False (readiness goes red, a metric says so) and the subscriber is
rebuilt. ``CancelledError`` is always re-raised.

Why the read is by hand: redis-py sets the subscription up (TCP/TLS/unix socket, AUTH, HELLO,
CLIENT SETNAME, SUBSCRIBE), but reading each message through ``PubSub.get_message`` cost ~10 % of
the service's CPU, almost all of it redis-py's layers around the hiredis parse (retry wrapper, a
timeout context per message, push-notification handling, a dict per message, telemetry hooks).
``_Replies`` hands over every complete reply that arrived per wake-up, and the read is timed out
once per probe interval, not once per message: 4x less subscriber CPU per message in bursts
(numbers in ``_Replies``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable

import hiredis
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisError, ResponseError

from regstream import metrics
from regstream.realtime import messages
from regstream.realtime.history import History
from regstream.realtime.messages import EventKey, Parsed, ServiceChannel

log = logging.getLogger(__name__)


class Broker:
    def __init__(
        self,
        *,
        subscriber: Callable[[], Redis],
        commands: Redis,
        on_update: Callable[[Parsed], None],
        on_resync: Callable[[tuple[int, ...]], None] | None = None,
        on_connect: Callable[[], Awaitable[object]] | None = None,
        channel: str = ServiceChannel.REGISTRATION_UPDATES,
        probe_interval: float = 5.0,
        history_max: int = 10_000,
        health_metric: bool = False,
    ) -> None:
        self._subscriber_factory = subscriber
        self._commands = commands
        self._on_update = on_update
        self._on_resync = on_resync
        self._on_connect = on_connect
        self.channel = channel.encode()
        self.probe_channel = (messages.PROBE_PREFIX + uuid.uuid4().hex).encode()
        self._probe_interval = probe_interval
        self._history = History(commands, channel=channel, max_entries=history_max)
        self.last_key: EventKey | None = None
        self.connected = asyncio.Event()
        self._last_probe_seen = time.monotonic()
        self._rebuild = asyncio.Event()
        self.received = 0
        self._subscribed_once = False
        if health_metric:
            # Read at scrape time, so the metric turns red as soon as probes stop coming back,
            # even while the loop itself is stuck waiting on a silent server.
            metrics.REDIS_SUBSCRIPTION_HEALTHY.set_function(lambda: float(self.healthy))

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
        while True:
            client = self._subscriber_factory()
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel, self.probe_channel)
                if not first:
                    metrics.REDIS_RECONNECTS.labels("subscriber").inc()
                    log.info("re-subscribed to %s", self.channel.decode())
                first = False
                if self._on_connect is not None:
                    await self._on_connect()
                await self._catch_up()
                self.connected.set()
                self._last_probe_seen = time.monotonic()
                delay = 0.1
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("subscription lost (%s); reconnecting", _reason(exc))
            except Exception:  # a bug must not end the only subscription: log it, rebuild
                log.exception("subscription loop failed; rebuilding")
            finally:
                self.connected.clear()
                await _quietly(pubsub.aclose())
                await _quietly(client.aclose())
            await asyncio.sleep(delay * random.random() + 0.05)
            delay = min(delay * 2, 5.0)

    async def _catch_up(self) -> None:
        if not self._subscribed_once:  # first subscription: live from here on
            self._subscribed_once = True
            self.last_key = await self._history.latest()
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
            fresh = await self._history.since(None)  # the new epoch is all new to us
            for parsed in fresh.entries:
                self._dispatch(parsed)
        latest = await self._history.latest()
        if latest is not None:
            self.last_key = latest
        elif replay.epoch is not None:
            # an empty new epoch: remember it, so its first live update is not taken for
            # another change of epoch (a second re-sync)
            self.last_key = EventKey(replay.epoch, 0, 0)

    async def _read(self, pubsub: PubSub) -> None:
        if pubsub.connection is None:
            raise RedisConnectionError("the subscription has no connection")
        replies = _Replies(pubsub.connection)
        while True:
            now = time.monotonic()
            await self._commands.publish(self.probe_channel, b"probe")
            if now - self._last_probe_seen > 3 * self._probe_interval:
                log.error("probe did not come back through Redis; rebuilding the subscriber")
                return
            await self._read_until(replies, now + self._probe_interval)

    async def _read_until(self, replies: _Replies, deadline: float) -> None:
        """Handle replies until the next probe is due (``deadline``, ``time.monotonic``).

        One timer per probe interval, not one per read: entering a timeout costs ~10 µs, as much
        as the rest of a wake-up. Cancelling the read at the deadline loses nothing: it can only
        be cancelled while waiting, and unread bytes stay in the stream.
        """
        timer = asyncio.timeout(deadline - time.monotonic())
        try:
            async with timer:
                while True:
                    for reply in await replies.read():  # in arrival order
                        self._on_reply(reply)
        except TimeoutError:
            if not timer.expired():
                raise  # the socket's own (keepalive gave up): an OSError, so reconnect

    def _on_reply(self, reply: object) -> None:
        # A published message is [b"message", channel, data] (RESP3 delivers the same list as a
        # push notification, a list subclass). Subscribe confirmations and pongs are ignored.
        if isinstance(reply, list):
            if len(reply) != 3 or reply[0] != b"message":
                return
            if reply[1] == self.probe_channel:
                self._last_probe_seen = time.monotonic()
                return
            parsed = messages.parse_message(reply[2])
            if parsed is None:
                return
            if parsed.resync is not None:
                if self._on_resync is not None:
                    self._on_resync(parsed.resync)
                return
            self._dispatch(parsed)
        elif isinstance(reply, RedisError):  # an error reply: as get_message did, raise it
            raise reply

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


_INCOMPLETE = object()  # what hiredis returns while a reply is still partly in transit
_READ_SIZE = 1 << 18  # usually all a wake-up has buffered (more: the next read, at once)


class _Replies:
    """The subscription's replies, every complete one that arrived, per wake-up.

    Reads the connection's ``asyncio.StreamReader`` (``Connection._reader``, the one private
    attribute used; redis-py's asyncio connections have had it since 4.2) into a hiredis reader
    of our own. Safe to take over: after the handshake redis-py has read nothing from the socket
    (``SUBSCRIBE`` only writes), so no reply sits in redis-py's parser; from here on only this
    object reads it. A closed socket raises ``ConnectionError``, a reset ``OSError``, an error
    reply or protocol error a ``RedisError``, all of which ``Broker.run`` reconnects on.

    If ``_reader`` is missing (a future redis-py), it falls back to one
    ``Connection.read_response`` per reply, public API and still cheaper than ``get_message``.

    Subscriber CPU per message in µs (``Broker`` end to end, ``parse_message``'s ~9 µs included;
    uvloop, Redis 7.0 on loopback, ~300-byte messages, medians of 5 interleaved runs):

        read path                                   bursts of 500    one per wake-up
        ``PubSub.get_message`` (before)                  64.1             186
        ``Connection.read_response`` per reply           28.6             139
        this: one hiredis drain per wake-up              15.9             116
        floor: bare ``asyncio.Protocol`` + parse          ~12             ~77
    """

    fallback_logged = False

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self._stream = _stream_of(connection)
        if self._stream is None and not _Replies.fallback_logged:  # once per process
            _Replies.fallback_logged = True
            log.warning("redis-py connection has no StreamReader; reading via read_response")
        self._parser = hiredis.Reader(
            protocolError=InvalidResponse, replyError=ResponseError, notEnoughData=_INCOMPLETE
        )

    async def read(self) -> list[object]:
        """Wait for the next data; return every complete reply it finished, in order."""
        stream = self._stream
        if stream is None:
            reply = await self._connection.read_response(
                disable_decoding=True, timeout=None, disconnect_on_error=False, push_request=True
            )  # timeout=None: the subscriber's socket_timeout, None (the caller times out)
            return [reply]
        data = await stream.read(_READ_SIZE)
        if not data:
            raise RedisConnectionError("Connection closed by server.")
        parser = self._parser
        parser.feed(data)
        replies = []
        reply = parser.gets()
        while reply is not _INCOMPLETE:
            replies.append(reply)
            reply = parser.gets()
        return replies


def _stream_of(connection: AbstractConnection) -> asyncio.StreamReader | None:
    stream = getattr(connection, "_reader", None)
    return stream if isinstance(stream, asyncio.StreamReader) else None
