"""The process's one Redis subscription: receive, de-duplicate, hand to the hub.

Only this module calls redis-py's subscribe API. The loop:

1. connect and ``SUBSCRIBE`` the updates channel and this process's probe channel;
2. catch up from the history stream: every update after the last one we dispatched (Pub/Sub
   messages published while we were disconnected are gone; the stream still has them);
3. read messages; each carries an ``eventId``, and anything at or before the last dispatched id
   is a duplicate of the catch-up and skipped;
4. on any connection error: back off (exponential, full jitter) and go to 1.

A subscription can also die silently (a proxy dropping the flow, a wedged server): every
``probe_interval`` we publish a probe to our own probe channel; if none came back for three
intervals, ``healthy`` turns False (readiness goes red, a metric says so) and the subscriber is
rebuilt. ``CancelledError`` is always re-raised.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

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
        channel: str = ServiceChannel.REGISTRATION_UPDATES,
        probe_interval: float = 5.0,
        history_max: int = 10_000,
        health_metric: bool = False,
    ) -> None:
        self._subscriber_factory = subscriber
        self._commands = commands
        self._on_update = on_update
        self._on_resync = on_resync
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
                await self._catch_up()
                self.connected.set()
                self._last_probe_seen = time.monotonic()
                delay = 0.1
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("subscription lost (%s); reconnecting", type(exc).__name__)
            except Exception:  # a bug must not end the only subscription: log it, rebuild
                log.exception("subscription loop failed; rebuilding")
            finally:
                self.connected.clear()
                await _quietly(pubsub.aclose())  # type: ignore[no-untyped-call]
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

    async def _read(self, pubsub: PubSub) -> None:
        next_probe = 0.0
        while True:
            now = time.monotonic()
            if now >= next_probe:
                next_probe = now + self._probe_interval
                await self._commands.publish(self.probe_channel, b"probe")
                if now - self._last_probe_seen > 3 * self._probe_interval:
                    log.error("probe did not come back through Redis; rebuilding the subscriber")
                    return
            message = await pubsub.get_message(timeout=min(1.0, self._probe_interval))
            if message is None:
                continue
            if message["channel"] == self.probe_channel:
                self._last_probe_seen = time.monotonic()
                continue
            parsed = messages.parse_message(message["data"])
            if parsed is None:
                continue
            if parsed.resync is not None:
                if self._on_resync is not None:
                    self._on_resync(parsed.resync)
                continue
            self._dispatch(parsed)

    def _dispatch(self, parsed: Parsed) -> None:
        key = parsed.key
        if key is not None:
            last = self.last_key
            if (
                last is not None
                and last.epoch == key.epoch
                and (key.ms, key.n) <= (last.ms, last.n)
            ):
                return  # already dispatched (catch-up overlap)
            self.last_key = key
        self.received += 1
        metrics.REDIS_MESSAGES_RECEIVED.inc()
        self._on_update(parsed)


async def _quietly(awaitable: object) -> None:
    try:
        await awaitable  # type: ignore[misc]
    except Exception:  # noqa: BLE001 - closing a broken connection may fail in many ways
        pass
