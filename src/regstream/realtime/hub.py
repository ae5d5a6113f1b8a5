"""In-process fan-out: one dispatcher writes each update to every matching stream.

Why not a queue and a task per stream (broadcaster's design, and sse-starlette's)? Measured on
a 2-core machine with the project's bench (``bench/``), a queue, a task wake-up and a framework
``send()`` per delivery cost about 4x what nchan spends; writing one pre-encoded frame straight to
each stream's transport costs about what nchan does. So:

* each update is encoded once into an SSE frame (and once into its HTTP chunk) and that same
  ``bytes`` object is written to every matching stream;
* streams are indexed by ``registrationId``: a filtered stream costs nothing for messages of
  other registrations; unfiltered (dashboard) streams get everything;
* a stream whose client stopped reading is cut off once its transport buffer passes
  ``max_buffer`` bytes, or stays non-empty for ``send_timeout`` seconds (also once we closed
  it, so a stalled client cannot hold a closed stream's connection); it never slows others
  (the kernel's send buffer per stream is capped in ``api/takeover.py`` so this shows up soon). A
  stream's start-up burst (a replay of up to the whole history) is exempt: the limit is lifted
  while starting and lowered back once the client has read the backlog;
* one shared timer sends pings and checks stalls for all streams;
* a graceful shutdown closes streams in batches (``close_in_batches``), in random order, each
  with its own final frame (a jittered ``retry:`` hint), so an instance's clients do not all come
  back to the fleet in the same second. Random rather than oldest-first: it needs no per-stream
  state, and the order is unrelated to anything about the clients (browsers of one office that
  connected together do not all leave together);
* an unfiltered stream that is settled (live, past the position its start-up covered, its buffer
  empty, its connection ours) is *direct*: the hub writes each frame to its transport with no
  per-stream checks but "still open", and the buffer limit becomes the transport's high-water
  mark (past it the transport calls ``StreamProtocol.pause_writing``, which cuts the stream).
  Measured (``bench/sse_bench.py``, 1k broadcast streams): the checks and the two calls per
  delivery were ~10 % of the server's CPU per delivery, the rest being the kernel's ``write()``.

A stream has two writing modes: ``TransportStream`` writes to the asyncio transport under the
server (taken over from uvicorn: ``api/takeover.py``, with the versions it was tested with);
``QueuedStream`` is the portable fallback for any other ASGI server, other uvicorn versions, or
``REGSTREAM_STREAM_FAST_PATH=false`` (bounded deque + the request's own ``send``). During
start-up a stream is *pending*: live updates are held while the handler writes the replay or
snapshot, then released without duplicates (``go_live``).

The hub never touches the database or Redis.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from regstream import metrics
from regstream.realtime import messages, positions
from regstream.realtime.messages import EventKey, Parsed
from regstream.realtime.positions import Position

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Any]
UNLIMITED = 1 << 62
MAX_PENDING = 50_000  # live updates held for one stream while its start-up is written
#: A stream follows every registration (None), one, or a few (a list page: a tuple of ids).
RegistrationFilter = int | tuple[int, ...] | None


class Stream:
    """One SSE client as the hub sees it."""

    __slots__ = (
        "registration_id", "pending", "closed", "stalled_since", "info", "floor_key", "floor_seq",
        "floor_seqs", "refresh_due", "max_buffer", "limit", "__weakref__",
    )  # fmt: skip

    def __init__(
        self, registration_id: RegistrationFilter, info: Any = None, max_buffer: int = 256 * 1024
    ) -> None:
        self.registration_id = registration_id
        self.max_buffer = max_buffer
        # Start-up (connected + a replay of up to the whole history, or a snapshot) is written in
        # one burst, before the client could read any of it: no limit then. At go_live the limit
        # becomes that backlog plus max_buffer, and the shared timer lowers it back to max_buffer
        # once the client has caught up. So a slow start-up is never mistaken for a slow client.
        self.limit = UNLIMITED
        # held live updates, each with the frame this stream gets for it
        self.pending: list[tuple[Parsed, bytes]] | None = []
        self.closed = False
        self.stalled_since: float | None = None
        self.info = info  # whatever the endpoint wants to keep (the principal, for auth checks)
        # What the replay or snapshot already covered. Updates can still arrive after go_live
        # that the start-up read already included (committed/published before the read,
        # dispatched after it), so the floor stays: anything at or below it is skipped.
        self.floor_key: EventKey | None = None
        self.floor_seq = 0
        # a stream following several registrations: the seq each one's snapshot covered
        self.floor_seqs: dict[int, int] | None = None
        # told to re-sync while starting up (Hub.resync with a ``refresh``): once live, the
        # endpoint sends its registrations' snapshots again
        self.refresh_due = False

    # the two methods a writing mode implements
    def write(self, frame: bytes, chunk: bytes) -> None:
        raise NotImplementedError

    def buffered(self) -> int:
        raise NotImplementedError

    def unsent(self) -> int:
        """Bytes still waiting for the client after ``close`` (0 where the mode cannot tell)."""
        return 0

    def close(self, final: bytes = b"") -> None:
        """End the stream (after writing ``final``); whoever owns the connection cleans up."""
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def deliver(self, frame: bytes, chunk: bytes, parsed: Parsed) -> None:
        if self.pending is not None:
            if len(self.pending) >= MAX_PENDING:
                _cut(self, "start-up backlog")
                return
            self.pending.append((parsed, frame))
        elif not self.closed:
            if self.floor_key is not None or self.floor_seq or self.floor_seqs:
                if self.covers(parsed):
                    return
                key, floor = parsed.key, self.floor_key
                if floor is not None and key is not None and key.epoch == floor.epoch:
                    # Past the floor: the broker dispatches updates in id order within an epoch
                    # (it drops any at or before the last it dispatched), so none the floor
                    # covers can follow. (A floor of another epoch stays: that stream is never
                    # direct, which costs only speed.)
                    self.floor_key = None
            self.write(frame, chunk)

    def covers(self, parsed: Parsed) -> bool:
        """True when the replay/snapshot this stream started with already included ``parsed``."""
        key, floor = parsed.key, self.floor_key
        if floor is not None and key is not None and key.epoch == floor.epoch:
            if (key.ms, key.n) <= (floor.ms, floor.n):
                return True
        if parsed.seq is None:
            return False
        if self.floor_seqs and parsed.registration_id is not None:
            return parsed.seq <= self.floor_seqs.get(parsed.registration_id, 0)
        return bool(self.floor_seq) and parsed.seq <= self.floor_seq

    def go_live(
        self, *, after: EventKey | None = None, snapshot_seq: int | None = None,
        snapshot_seqs: dict[int, int] | None = None,
    ) -> None:  # fmt: skip
        """Release updates held during start-up, skipping what the replay/snapshot covered
        (``snapshot_seqs``: the seq of each registration's snapshot, several registrations)."""
        # an empty history's position (``<epoch>_0-0``) covers nothing: no floor
        self.floor_key = after if after is not None and (after.ms or after.n) else None
        self.floor_seq = snapshot_seq or 0
        self.floor_seqs = snapshot_seqs or None
        held, self.pending = self.pending or [], None
        for parsed, frame in held:
            if parsed.resync is not None or not self.covers(parsed):
                self.write(frame, messages.chunk(frame))
        self.limit = self.buffered() + self.max_buffer


class TransportStream(Stream):
    """Writes straight to the server's transport (HTTP/1.1 chunked framing done by us)."""

    __slots__ = ("transport", "chunked")

    def __init__(
        self, registration_id: RegistrationFilter, transport: asyncio.WriteTransport, *,
        chunked: bool, max_buffer: int, info: Any = None,
    ) -> None:  # fmt: skip
        super().__init__(registration_id, info, max_buffer)
        self.transport = transport
        self.chunked = chunked

    def write(self, frame: bytes, chunk: bytes) -> None:
        transport = self.transport
        if transport.is_closing():
            self.closed = True
            return
        if transport.get_write_buffer_size() > self.limit:
            _cut(self, "buffer limit")
            return
        transport.write(chunk if self.chunked else frame)

    def buffered(self) -> int:
        return 0 if self.transport.is_closing() else self.transport.get_write_buffer_size()

    def unsent(self) -> int:
        return self.transport.get_write_buffer_size()

    def close(self, final: bytes = b"") -> None:
        if not self.closed and not self.transport.is_closing():
            self.closed = True  # first: the writes below are no slow client (pause_writing)
            if final:
                self.transport.write(messages.chunk(final) if self.chunked else final)
            if self.chunked:
                self.transport.write(b"0\r\n\r\n")
            self.transport.close()
        super().close()

    def abort(self) -> None:
        self.transport.abort()
        super().close()


class StreamProtocol(asyncio.Protocol):
    """Owns a stream's connection once the HTTP server has handed it over (``api/takeover.py``).

    After the response head and the first frames, an SSE connection only ever receives our
    writes and, one day, its end. Keeping the HTTP server's per-connection machinery alive for
    that (parser, request cycle, events, the ASGI task and its coroutine frames) cost most of the
    ~12 KiB per idle stream we measured with uvicorn; this protocol is the whole state left:
    the transport, this object and the ``Stream``.
    """

    __slots__ = ("stream", "hub")

    def __init__(self, stream: Stream, hub: Hub) -> None:
        self.stream = stream
        self.hub = hub

    def data_received(self, data: bytes) -> None:
        pass  # an SSE client sends nothing after its request; pipelined bytes are ignored

    def eof_received(self) -> bool:
        self.stream.closed = True
        return False  # the client closed its side: close ours

    def pause_writing(self) -> None:
        # A direct stream's buffer passed its limit (the high-water mark the hub set when it
        # made the stream direct). Other streams check the buffer size on every write.
        if self.hub.is_direct(self.stream) and not self.stream.closed:
            _cut(self.stream, "buffer limit")

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.stream.closed = True
        self.hub.detach(self.stream)


class QueuedStream(Stream):
    """Portable mode: a bounded buffer drained by the request's own ``send``.

    The queue is the client's backlog only while the pump waits inside ``send`` (the server
    waits for its transport to drain: the client is not reading). Otherwise frames wait for the
    pump's next turn on the event loop, so a burst of updates (the broker dispatches a batch in
    one go) may queue past ``limit`` without a slow client: the stream is cut then only past
    ``BURST`` times the limit, which bounds its memory. A cut while the pump waits inside
    ``send`` cancels that wait: the request ends (the server closes the connection) and the
    stream leaves the hub."""

    __slots__ = ("_queue", "_size", "_wake", "_final", "_pump", "_sending")

    #: how far past ``limit`` a burst may queue while the pump is not waiting on the client
    BURST = 4

    def __init__(
        self, registration_id: RegistrationFilter, *, max_buffer: int, info: Any = None
    ) -> None:
        super().__init__(registration_id, info, max_buffer)
        self._queue: deque[bytes] = deque()
        self._size = 0
        self._wake = asyncio.Event()
        self._final = b""
        self._pump: asyncio.Task[Any] | None = None  # the task running ``pump``
        self._sending = False  # the pump waits inside ``send``

    def write(self, frame: bytes, chunk: bytes) -> None:
        size = self._size + len(frame)
        if size > self.limit and (self._sending or size > self.limit * self.BURST):
            _cut(self, "buffer limit")
            return
        self._queue.append(frame)
        self._size += len(frame)
        self._wake.set()

    def buffered(self) -> int:
        return self._size

    def close(self, final: bytes = b"") -> None:
        self._final = final
        self.closed = True
        self._wake.set()

    def abort(self) -> None:
        self._queue.clear()
        self._size = 0
        self.close()
        if self._sending and self._pump is not None:
            self._pump.cancel()  # the client is not reading: stop waiting for it (``pump``)

    async def pump(self, send: Send) -> None:
        """Write queued frames until closed; the endpoint runs this as the request's task.
        Returns early (the response unfinished) when ``abort`` ended a wait inside ``send``."""
        self._pump = asyncio.current_task()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    frame = self._queue.popleft()
                    self._size -= len(frame)
                    await self._send(send, frame, more=True)
                if self.closed:
                    if self._final:
                        await self._send(send, self._final, more=True)
                    await self._send(send, b"", more=False)
                    return
        except asyncio.CancelledError:
            task = self._pump
            if not self.closed or task is None or task.cancelling() != 1:
                raise  # not (only) our abort's
            task.uncancel()
        finally:
            self._pump = None

    async def _send(self, send: Send, body: bytes, *, more: bool) -> None:
        self._sending = True
        try:
            await send({"type": "http.response.body", "body": body, "more_body": more})
        finally:
            self._sending = False


def _ids(filter_: int | tuple[int, ...]) -> tuple[int, ...]:
    return filter_ if isinstance(filter_, tuple) else (filter_,)


def _resync_frame(registration_ids: tuple[int, ...]) -> bytes:
    ids = sorted(set(registration_ids))
    return messages.snapshot_frame({"registrationIds": ids} if ids else None, resync=True)


def _cut(stream: Stream, reason: str) -> None:
    metrics.SLOW_CLIENTS_CUT.inc()
    log.warning(
        "cut off a slow stream (%s, %d bytes buffered, registration filter %s)",
        reason, stream.buffered(), stream.registration_id,
    )  # fmt: skip
    stream.abort()


class Hub:
    """Routes updates to streams. All methods run on the event loop; only the shared timer
    (``run``) and the shutdown's ``close_in_batches`` await."""

    def __init__(
        self,
        *,
        ping_interval: float = 30.0,
        send_timeout: float = 30.0,
        tick: float = 1.0,
        on_tick: Callable[[Stream, float], None] | None = None,
        on_detach: Callable[[Stream], None] | None = None,
        refresh: Callable[[Stream], None] | None = None,
        partitions: int = 1,
    ) -> None:
        self.ping_interval = ping_interval
        self.send_timeout = send_timeout
        self._tick = tick
        self._on_tick = on_tick
        self._on_detach = on_detach  # once per stream that leaves (the stream guard frees its slot)
        #: sends a filtered stream its registrations' state again instead of a bare resync
        #: marker (``api/stream.py`` sets it: the hub never touches the database)
        self.refresh = refresh
        self._all: set[Stream] = set()  # unfiltered streams, written through ``deliver``
        self._direct: set[TransportStream] = set()  # unfiltered and settled (module docstring)
        self._by_rid: dict[int, set[Stream]] = {}
        self._count = 0
        # A partitioned bus (Redis Cluster, ``partitions.py``): the newest update dispatched per
        # partition, and each as a part of a position id (``positions.py``). Streams following
        # several partitions (unfiltered; several registrations) get update frames whose id is
        # that whole position; a stream of one registration gets the update's own id.
        self.partitions = partitions
        self.keys: list[EventKey | None] = [None] * partitions
        self._components = [""] * partitions
        self._wide_groups = 0  # streams of several registrations (they get position ids too)

    def __len__(self) -> int:
        return self._count

    def attach(self, stream: Stream) -> None:
        rid = stream.registration_id
        if rid is None:
            self._all.add(stream)
        else:
            for one in _ids(rid):
                self._by_rid.setdefault(one, set()).add(stream)
            if isinstance(rid, tuple):
                self._wide_groups += 1
        self._count += 1
        metrics.STREAMS_CONNECTED.inc()

    def detach(self, stream: Stream) -> None:
        rid = stream.registration_id
        if rid is None:
            if stream in self._all:
                self._all.discard(stream)
            elif stream in self._direct:
                self._direct.discard(stream)
            else:
                return
        else:
            found = False
            for one in _ids(rid):
                group = self._by_rid.get(one)
                if group is not None and stream in group:
                    found = True
                    group.discard(stream)
                    if not group:
                        del self._by_rid[one]
            if not found:
                return
            if isinstance(rid, tuple):
                self._wide_groups -= 1
        self._count -= 1
        metrics.STREAMS_CONNECTED.dec()
        if self._on_detach is not None:
            self._on_detach(stream)

    def streams(self) -> Iterable[Stream]:
        """Every stream once (a stream following several registrations is in several groups)."""
        yield from self._all
        yield from self._direct
        seen: set[int] = set()
        for group in self._by_rid.values():
            for stream in group:
                if isinstance(stream.registration_id, tuple):
                    if id(stream) in seen:
                        continue
                    seen.add(id(stream))
                yield stream

    def set_position(self, index: int, key: EventKey) -> None:
        """Partition ``index`` is at ``key`` (its subscription started, or began a new epoch)."""
        if self.partitions > 1:
            self.keys[index] = key
            self._components[index] = positions.component(key)

    def position(self) -> Position:
        """The newest update dispatched per partition (a partitioned bus)."""
        return tuple(self.keys)

    def publish(self, parsed: Parsed) -> None:
        """Deliver one update to every matching stream (frame encoded once, twice with a
        partitioned bus: with the update's id, and with the position after it). An update no
        stream takes costs no frame."""
        rid = parsed.registration_id
        group = self._by_rid.get(rid) if rid is not None else None
        wide_too = False
        if self.partitions > 1 and rid is not None and parsed.key is not None:
            index = rid % self.partitions
            self.keys[index] = parsed.key
            self._components[index] = positions.component(parsed.key)
            wide_too = bool(self._all or self._direct or self._wide_groups)  # (anyone to get it)
        if not (group or self._all or self._direct):
            return
        frame = messages.update_frame(parsed)
        chunk = messages.chunk(frame)
        wide, wide_chunk = frame, chunk
        if wide_too:
            wide = messages.update_frame(parsed, event_id=positions.join(self._components))
            wide_chunk = messages.chunk(wide)
        for direct in self._direct:  # the hot loop: see the module docstring
            transport = direct.transport
            if not transport.is_closing():  # (a write to a lost connection logs a warning)
                transport.write(wide_chunk)
        for stream in self._all:
            stream.deliver(wide, wide_chunk, parsed)
        delivered = len(self._direct) + len(self._all)
        if group:
            if wide is frame:
                for stream in group:
                    stream.deliver(frame, chunk, parsed)
            else:
                for stream in group:
                    if isinstance(stream.registration_id, tuple):
                        stream.deliver(wide, wide_chunk, parsed)
                    else:
                        stream.deliver(frame, chunk, parsed)
            delivered += len(group)
        if delivered:
            metrics.FRAMES_DELIVERED.inc(delivered)
            if parsed.timestamp_ms is not None:
                metrics.DELIVERY_LATENCY.observe(max(0.0, time.time() - parsed.timestamp_ms / 1000))

    def is_direct(self, stream: Stream) -> bool:
        return stream in self._direct

    def _settle(self, stream: Stream) -> None:
        """Make an unfiltered stream direct if it is settled (module docstring); called by the
        shared timer, never while ``publish`` iterates."""
        if (
            isinstance(stream, TransportStream)
            and stream in self._all
            and stream.pending is None
            and stream.floor_key is None
            and not stream.floor_seq
            and stream.chunked
            and not stream.closed
            and stream.limit == stream.max_buffer
            and isinstance(stream.transport.get_protocol(), StreamProtocol)
            and stream.buffered() == 0  # so the transport has not paused its protocol
        ):
            # past max_buffer the transport calls pause_writing: the stream is cut
            stream.transport.set_write_buffer_limits(high=stream.max_buffer)
            self._all.discard(stream)
            self._direct.add(stream)

    def resync(self, registration_ids: tuple[int, ...], partition: int | None = None) -> None:
        """History could not cover a gap: tell the affected streams to re-sync (snapshot frame).

        No ids: every stream (``partition``: every stream following that partition of a
        partitioned bus). Otherwise the streams that follow any of them (and all unfiltered
        ones), told which registrations to re-read. With a ``refresh``, a filtered stream gets
        its registrations' snapshots instead (the README's promise: their state, not a marker).
        """
        if registration_ids:
            ids = set(registration_ids)
            targets = [
                s for s in self.streams()
                if s.registration_id is None or not ids.isdisjoint(_ids(s.registration_id))
            ]  # fmt: skip
        elif partition is not None and self.partitions > 1:
            count = self.partitions
            targets = [
                s for s in self.streams()
                if s.registration_id is None
                or any(one % count == partition for one in _ids(s.registration_id))
            ]  # fmt: skip
        else:
            targets = list(self.streams())
        frame = _resync_frame(registration_ids)
        chunk = messages.chunk(frame)
        # A stream still starting up read its replay or snapshot from a history this re-sync
        # may be about (a failover's new epoch, trimmed entries): it gets the marker in order,
        # when it goes live, instead of never (a resume racing a failover missed it).
        marker = Parsed(raw=b"", registration_id=None, seq=None, timestamp_ms=None, key=None,
                        resync=tuple(sorted(set(registration_ids))))  # fmt: skip
        refresh = self.refresh
        for stream in targets:
            if stream.closed:
                continue
            if refresh is not None and stream.registration_id is not None:
                if stream.pending is not None:
                    stream.refresh_due = True  # its start-up read may predate the re-sync
                else:
                    refresh(stream)
            elif stream.pending is not None:
                stream.pending.append((marker, frame))
            else:
                stream.write(frame, chunk)

    def close_all(self, final: bytes = b"") -> int:
        """Graceful shutdown: write ``final`` (a ``retry:`` hint) and end every stream."""
        streams = list(self.streams())
        for stream in streams:
            stream.close(final)
        return len(streams)

    async def close_in_batches(
        self, *, over: float, final: Callable[[], bytes], tick: float = 0.1
    ) -> int:
        """Graceful shutdown without a herd: end every stream, in random order, in batches
        ``tick`` seconds apart spread over ``over`` seconds; each stream gets its own ``final()``.

        With fewer streams than ticks, one stream per tick (a handful of clients is no herd:
        they need not wait for the whole window). Streams attached meanwhile (a start-up under
        way) are closed with the last batch. Returns how many streams were closed.
        """
        streams = [stream for stream in self.streams() if not stream.closed]
        random.shuffle(streams)
        count = len(streams)
        ticks = max(1, round(over / tick))
        batches, interval = min(count, ticks), over / ticks
        loop = asyncio.get_running_loop()
        started = loop.time()
        closed = 0
        for batch in range(batches):
            if batch:
                await asyncio.sleep(max(0.0, started + batch * interval - loop.time()))
            for stream in streams[batch * count // batches : (batch + 1) * count // batches]:
                if not stream.closed:
                    stream.close(final())
                    closed += 1
        for stream in list(self.streams()):
            if not stream.closed:
                stream.close(final())
                closed += 1
        return closed

    async def run(self) -> None:
        """Shared timer: pings every ``ping_interval``, stall checks every tick."""
        next_ping = time.monotonic() + self.ping_interval
        while True:
            await asyncio.sleep(self._tick)
            now = time.monotonic()
            ping = now >= next_ping
            if ping:
                next_ping = now + self.ping_interval
                frame = messages.control_frame("ping")
                chunk = messages.chunk(frame)
            for stream in list(self.streams()):
                if stream.closed:
                    # Closed by us (credentials, shutdown), its last bytes unread: a client that
                    # stopped reading would hold the connection (and a stream slot) for as long
                    # as it stays connected. It gets ``send_timeout``, as a live stream does.
                    if stream.unsent():
                        if stream.stalled_since is None:
                            stream.stalled_since = now
                        elif now - stream.stalled_since > self.send_timeout:
                            _cut(stream, "send timeout after close")
                    continue
                buffered = stream.buffered()
                if stream.limit > stream.max_buffer and stream.pending is None:
                    if buffered <= stream.max_buffer:
                        stream.limit = stream.max_buffer  # caught up with its start-up burst
                if buffered:
                    if stream.stalled_since is None:
                        stream.stalled_since = now
                    elif now - stream.stalled_since > self.send_timeout:
                        _cut(stream, "send timeout")
                        continue
                else:
                    stream.stalled_since = None
                if self._on_tick is not None:
                    self._on_tick(stream, now)
                if ping and stream.pending is None and not stream.closed:
                    stream.write(frame, chunk)
                if stream.registration_id is None:
                    self._settle(stream)
