"""The instance's side of the bus: one subscription per partition it needs, and the histories.

On one Redis the bus has one partition, subscribed from start to stop, as before cluster mode.

On a partitioned bus (Redis Cluster, ``partitions.py``) an instance subscribes only to the
partitions its open streams follow: a stream of one registration needs that registration's
partition, an unfiltered stream needs all of them. ``acquire`` (before the stream is attached)
starts the missing subscriptions and waits, bounded, until they are connected and caught up, so
the hub knows where each partition is before the stream's start-up reads its history;
``release`` (when the stream leaves the hub) lets a partition nobody follows go after
``linger`` seconds (a page reload does not unsubscribe and subscribe again). A partition the
instance does not follow costs it nothing: its updates never reach this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from regstream import metrics
from regstream.realtime.broker import Broker
from regstream.realtime.connections import RedisClient
from regstream.realtime.history import History
from regstream.realtime.hub import Hub, RegistrationFilter, Stream
from regstream.realtime.partitions import Layout, Partition

log = logging.getLogger(__name__)

#: builds a partition's broker (app.py: its subscriber client, the hub's callbacks)
BrokerFactory = Callable[[Partition], Broker]


class Bus:
    def __init__(
        self, layout: Layout, *, hub: Hub, make_broker: BrokerFactory, resumes: RedisClient,
        history_max: int = 10_000, linger: float = 30.0, ready_timeout: float = 5.0,
    ) -> None:  # fmt: skip
        self.layout = layout
        self._hub = hub
        self._make_broker = make_broker
        self._linger = linger
        self._ready_timeout = ready_timeout
        #: per partition: the history stream start-ups read (through the resumes' client)
        self.histories = tuple(
            History(resumes, partition=p, max_entries=history_max) for p in layout.partitions
        )
        self.brokers: dict[int, Broker] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._refs = [0] * len(layout)
        self._idle_since: dict[int, float] = {}
        self._streams: dict[int, tuple[int, ...]] = {}  # id(stream) -> the partitions it holds
        self._late: dict[int, asyncio.Task[None]] = {}  # started before their partition was ready
        metrics.REDIS_SUBSCRIPTION_HEALTHY.set_function(lambda: float(self.healthy))

    @property
    def partitioned(self) -> bool:
        return len(self.layout) > 1

    def history_of(self, registration_id: int) -> History:
        return self.histories[self.layout.of(registration_id).index]

    def needs(self, rid: RegistrationFilter) -> tuple[int, ...]:
        """The partitions a stream with this filter follows."""
        if rid is None or not self.partitioned:
            return tuple(range(len(self.layout)))
        return self.layout.indexes_of(rid if isinstance(rid, tuple) else (rid,))

    @property
    def healthy(self) -> bool:
        """Every subscription this instance holds is connected and its probes come back."""
        return all(broker.healthy for broker in self.brokers.values())

    @property
    def subscribed(self) -> tuple[int, ...]:
        return tuple(sorted(self.brokers))

    async def acquire(self, stream: Stream) -> bool:
        """Hold the partitions ``stream`` follows; True once all of them are connected (False:
        not within ``ready_timeout``; the stream starts anyway, and its start-up tells the
        client to re-sync where the hub has no position)."""
        indexes = self.needs(stream.registration_id)
        self._streams[id(stream)] = indexes
        for index in indexes:
            self._refs[index] += 1
            self._idle_since.pop(index, None)
            if index not in self.brokers:
                self._start(index)
        # Only a subscription that was never connected is waited for: one that is reconnecting
        # catches up from the history by itself (and one Redis keeps the behaviour it had
        # before partitions: a stream never waits for its one subscription).
        late = [i for i in indexes if not self.brokers[i].ever_connected]
        if not late or not self.partitioned:
            return True
        waits = [self.brokers[i].connected.wait() for i in late]
        try:
            async with asyncio.timeout(self._ready_timeout):
                await asyncio.gather(*waits)
        except TimeoutError:
            # Redis does not answer: the stream starts without the hub knowing where those
            # partitions are, and their first subscription starts live from wherever it is then.
            # What was published in between would be missed silently: the streams following
            # such a partition are told to re-sync once it is connected.
            for index in late:
                broker = self.brokers[index]
                if not broker.ever_connected and index not in self._late:
                    self._late[index] = asyncio.get_running_loop().create_task(
                        self._resync_when_connected(index, broker)
                    )
            return False
        return True

    async def _resync_when_connected(self, index: int, broker: Broker) -> None:
        try:
            await broker.connected.wait()
        finally:
            if self._late.get(index) is asyncio.current_task():
                del self._late[index]
        if self.brokers.get(index) is broker:
            self._hub.resync((), partition=index)

    def release(self, stream: Stream) -> None:
        """``stream`` left: its partitions may go once nobody follows them (after ``linger``)."""
        indexes = self._streams.pop(id(stream), ())
        now = time.monotonic()
        for index in indexes:
            self._refs[index] -= 1
            if self._refs[index] == 0 and self.partitioned:
                self._idle_since[index] = now

    async def wait_ready(self, timeout: float) -> bool:
        """One Redis: subscribe now and wait (bounded) until connected. A partitioned bus
        subscribes on demand: ready at once."""
        if self.partitioned:
            return True
        if 0 not in self.brokers:
            self._start(0)
        try:
            await asyncio.wait_for(self.brokers[0].connected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _start(self, index: int) -> None:
        broker = self._make_broker(self.layout.partitions[index])
        self.brokers[index] = broker
        self._tasks[index] = asyncio.get_running_loop().create_task(
            broker.run(), name=f"subscription-{index}"
        )
        metrics.BUS_PARTITIONS_SUBSCRIBED.set(len(self.brokers))

    async def _stop(self, index: int) -> None:
        self.brokers.pop(index, None)
        late = self._late.pop(index, None)
        if late is not None:
            late.cancel()
        task = self._tasks.pop(index, None)
        metrics.BUS_PARTITIONS_SUBSCRIBED.set(len(self.brokers))
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """One Redis: the only partition, subscribed for the whole life of the service. A
        partitioned bus: subscriptions start on demand; this drops idle ones."""
        if not self.partitioned and 0 not in self.brokers:
            self._start(0)
        try:
            while True:
                await asyncio.sleep(min(self._linger, 1.0))
                now = time.monotonic()
                for index, since in list(self._idle_since.items()):
                    if self._refs[index] == 0 and now - since >= self._linger:
                        del self._idle_since[index]
                        await self._stop(index)
        finally:
            for task in list(self._late.values()):
                task.cancel()
            for index in list(self._tasks):
                await self._stop(index)
