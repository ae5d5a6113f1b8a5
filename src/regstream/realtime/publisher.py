"""Publishing registration updates: Pub/Sub for live delivery plus a capped Redis Stream history.

One Lua script call per update does, atomically and in one round trip: make sure the channel has
an epoch (a new one after Redis lost its data), ``XADD`` the message to the history stream (capped
by length; trimmed by age once a second), splice ``eventId`` into the JSON and ``PUBLISH`` it. So
``redis-cli SUBSCRIBE service:registration-updates`` still shows every message, now with its id.

When Redis is unreachable nothing raises into the pipeline: updates wait in a bounded in-memory
outbox and are published in order once Redis is back (new updates queue behind them, so order is
kept). If the outbox overflows, the oldest updates are dropped and their registrations are
announced afterwards in one ``resync`` message, which streams turn into a snapshot frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from regstream import metrics
from regstream.realtime import messages
from regstream.realtime.broker import Broker
from regstream.realtime.messages import ServiceChannel

log = logging.getLogger(__name__)

_PUBLISH_SCRIPT = """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  local t = redis.call('TIME')
  epoch = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', KEYS[2], epoch)
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[1])
if ARGV[4] ~= '' then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[4])
end
local msg = string.sub(ARGV[1], 1, -2) .. ',"eventId":"' .. epoch .. '_' .. id .. '"}'
redis.call('PUBLISH', ARGV[3], msg)
return epoch .. '_' .. id
"""


class Subscription:
    """What ``RegistrationPubSub.subscribe`` returns; ``await sub.aclose()`` unsubscribes."""

    def __init__(self, broker: Broker, task: asyncio.Task[None]) -> None:
        self.broker = broker
        self._task = task

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class RegistrationPubSub:
    """The seed's ``RegistrationPubSub``: ``publish_update``, ``publish_stage_update``,
    ``publish_final_status`` and ``subscribe``. Publishing never raises. ``subscribe`` runs a
    ``broker.Broker`` (the only module that speaks Redis's subscribe API) on a connection of its
    own, with the same reconnect, re-subscribe and catch-up as the service's fan-out.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        channel: str = ServiceChannel.REGISTRATION_UPDATES,
        history_maxlen: int = 10_000,
        history_max_age: float = 3600.0,
        outbox_max: int = 10_000,
        subscriber: Callable[[], Redis] | None = None,
    ) -> None:
        self._redis = redis
        self._subscriber = subscriber
        self.channel = channel
        self.history_key = channel + messages.HISTORY_SUFFIX
        self.epoch_key = channel + messages.EPOCH_SUFFIX
        self._maxlen = str(history_maxlen)
        self._max_age_ms = int(history_max_age * 1000)
        self._script = redis.register_script(_PUBLISH_SCRIPT)
        self._outbox: deque[bytes] = deque()
        self._outbox_max = outbox_max
        self._overflowed: set[int] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._last_trim_ms = 0

    # --- the seed's verbs ----------------------------------------------------------------------

    async def publish_stage_update(
        self,
        registration_id: int,
        stage: str,
        stage_status: str,
        message: str,
        *,
        seq: int,
        timestamp: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        await self.publish_update(
            messages.stage_update(
                registration_id, stage, stage_status, message, seq=seq,
                timestamp=timestamp or messages.now_ms(), details=details,
            )
        )  # fmt: skip

    async def publish_final_status(
        self,
        registration_id: int,
        status: str,
        message: str,
        *,
        seq: int,
        details: dict[str, Any] | None = None,
        process_log: list[dict[str, Any]] | None = None,
        timestamp: int | None = None,
    ) -> None:
        await self.publish_update(
            messages.final_update(
                registration_id, status, message, seq=seq, details=details,
                process_log=process_log, timestamp=timestamp or messages.now_ms(),
            )
        )  # fmt: skip

    async def publish_update(self, update: dict[str, Any]) -> None:
        await self.publish_raw(messages.encode(update))

    async def subscribe(
        self, callback: Callable[[dict[str, Any]], None], *, ready_timeout: float = 5.0
    ) -> Subscription:
        """Call ``callback`` with every update published from now on (decoded JSON objects)."""
        if self._subscriber is None:
            raise RuntimeError("RegistrationPubSub was built without a subscriber connection")
        broker = Broker(
            subscriber=self._subscriber, commands=self._redis, channel=self.channel,
            on_update=lambda parsed: callback(orjson.loads(parsed.raw)),
        )  # fmt: skip
        task = asyncio.create_task(broker.run(), name="registration-subscription")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(broker.connected.wait(), ready_timeout)
        return Subscription(broker, task)

    # --- mechanics -----------------------------------------------------------------------------

    async def publish_raw(self, payload: bytes) -> None:
        """Publish one encoded JSON object; on failure keep it for later, in order."""
        if self._outbox:
            self._enqueue(payload)
            return
        try:
            await self._send(payload)
        except (RedisError, OSError) as exc:
            metrics.PUBLISH_FAILURES.inc()
            log.warning("publish failed, keeping update for later: %s", type(exc).__name__)
            self._enqueue(payload)

    async def _send(self, payload: bytes) -> str:
        now = messages.now_ms()
        minid = ""
        if now - self._last_trim_ms > 1000:
            self._last_trim_ms = now
            minid = str(now - self._max_age_ms)
        result = await self._script(
            keys=[self.history_key, self.epoch_key],
            args=[payload, self._maxlen, self.channel, minid],
        )
        return result.decode() if isinstance(result, bytes) else str(result)

    def _enqueue(self, payload: bytes) -> None:
        if len(self._outbox) >= self._outbox_max:
            dropped = self._outbox.popleft()
            metrics.OUTBOX_OVERFLOWS.inc()
            rid = _registration_id(dropped)
            if rid is not None:
                self._overflowed.add(rid)
        self._outbox.append(payload)
        metrics.OUTBOX_SIZE.set(len(self._outbox))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="publish-outbox")

    async def _flush(self) -> None:
        delay = 0.1
        while self._outbox:
            try:
                if self._overflowed:
                    ids = sorted(self._overflowed)
                    resync = {
                        "type": "resync",
                        "registrationIds": ids,
                        "timestamp": messages.now_ms(),
                    }
                    await self._send(orjson.dumps(resync))
                    self._overflowed.clear()
                while self._outbox:
                    await self._send(self._outbox[0])
                    self._outbox.popleft()
                    metrics.OUTBOX_SIZE.set(len(self._outbox))
                log.info("publish outbox flushed")
            except (RedisError, OSError):
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)

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


def _registration_id(payload: bytes) -> int | None:
    try:
        rid = orjson.loads(payload).get("registrationId")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return rid if isinstance(rid, int) else None
