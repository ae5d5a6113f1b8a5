"""The hub's routing on a real event loop (streams write into a bounded in-memory queue mode)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
import pytest
import uvloop

from regstream.realtime import messages, positions
from regstream.realtime.hub import Hub, QueuedStream, StreamProtocol, TransportStream


def _frames(stream: QueuedStream) -> list[dict[str, object]]:
    out = []
    for frame in stream._queue:  # noqa: SLF001 - the test reads what would be sent
        line = next(x for x in frame.split(b"\n") if x.startswith(b"data: "))
        out.append(orjson.loads(line[6:]))
    return out


def _update(rid: int, seq: int, key: messages.EventKey | None = None) -> messages.Parsed:
    fields: dict[str, object] = {"registrationId": rid, "seq": seq, "timestamp": 1}
    if key is not None:
        fields["eventId"] = str(key)
    parsed = messages.parse_message(orjson.dumps(fields))
    assert parsed is not None
    return parsed


@asynccontextmanager
async def _connected(hub: Hub) -> AsyncIterator[tuple[TransportStream, asyncio.StreamReader]]:
    """An unfiltered stream on a real loopback connection, owned by a ``StreamProtocol`` as
    after the HTTP server handed it over; and the client's reader."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[asyncio.Transport] = loop.create_future()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.set_result(transport)  # type: ignore[arg-type]

    server = await loop.create_server(Accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    transport = await asyncio.wait_for(accepted, 5)
    stream = TransportStream(None, transport, chunked=True, max_buffer=1 << 16)
    transport.set_protocol(StreamProtocol(stream, hub))
    hub.attach(stream)
    try:
        yield stream, reader
    finally:
        writer.close()
        transport.abort()
        server.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_stream_is_direct_only_past_its_floor_and_nothing_follows_its_close(loop: str) -> None:
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:  # the server runs on uvloop
        runner.run(_direct_stream())


async def _direct_stream() -> None:
    hub = Hub()
    floor = messages.EventKey("1", 1000, 5)
    async with _connected(hub) as (stream, reader):
        stream.go_live(after=floor)
        hub._settle(stream)  # noqa: SLF001 - what the shared timer does every tick
        assert not hub.is_direct(stream)  # its start-up position is still a floor
        hub.publish(_update(1, 1, messages.EventKey("1", 1000, 5)))  # covered: skipped
        hub.publish(_update(1, 2, messages.EventKey("1", 1000, 6)))  # past it: the floor goes
        assert stream.floor_key is None
        hub._settle(stream)  # noqa: SLF001
        assert hub.is_direct(stream)
        hub.publish(_update(1, 3, messages.EventKey("1", 1000, 7)))  # written unchecked
        stream.close()
        hub.publish(_update(1, 4, messages.EventKey("1", 1000, 8)))  # closed: must not go out
        received = await asyncio.wait_for(reader.read(), 5)  # up to the server's close
    assert b'"seq":1,' not in received and b'"seq":4,' not in received
    assert b'"seq":2,' in received and b'"seq":3,' in received
    assert received.endswith(b"0\r\n\r\n")  # the chunked body's end, nothing after it


async def test_routing_by_filter_and_resync_reach_multi_registration_streams() -> None:
    hub = Hub()
    everything = QueuedStream(None, max_buffer=1 << 20)
    one = QueuedStream(7, max_buffer=1 << 20)
    several = QueuedStream((7, 8), max_buffer=1 << 20)
    other = QueuedStream(9, max_buffer=1 << 20)
    for stream in (everything, one, several, other):
        hub.attach(stream)
        stream.go_live()
    assert len(hub) == 4 and len(list(hub.streams())) == 4

    hub.publish(_update(8, 1))
    hub.publish(_update(7, 1))
    assert [f["data"]["registrationId"] for f in _frames(several)] == [8, 7]  # type: ignore[index]
    assert [f["data"]["registrationId"] for f in _frames(one)] == [7]  # type: ignore[index]
    assert _frames(other) == []
    assert len(_frames(everything)) == 2

    hub.resync((8,))
    kinds = {id(s): [f["type"] for f in _frames(s)] for s in (everything, one, several, other)}
    assert kinds[id(several)][-1] == "snapshot" and kinds[id(everything)][-1] == "snapshot"
    assert "snapshot" not in kinds[id(one)] and kinds[id(other)] == []

    hub.detach(several)
    assert len(hub) == 3 and 8 not in hub._by_rid and hub._by_rid[7] == {one}  # noqa: SLF001


async def test_a_partition_s_position_moves_with_no_stream_and_streams_get_it_later() -> None:
    """Nobody follows the update: no frame is built, but a partitioned hub's position still moves
    (a stream attached later must start from it)."""
    hub = Hub(partitions=4)
    hub.publish(_update(6, 1, messages.EventKey("1", 100, 0)))
    assert hub.position() == (None, None, messages.EventKey("1", 100, 0), None)
    everything = QueuedStream(None, max_buffer=1 << 20)
    hub.attach(everything)
    everything.go_live()
    hub.publish(_update(5, 1, messages.EventKey("1", 101, 0)))
    [frame] = everything._queue  # noqa: SLF001 - the test reads what would be sent
    head = frame.split(b"\n")[0].decode()
    assert head.startswith("id: ") and b'"registrationId":5' in frame
    k100, k101 = messages.EventKey("1", 100, 0), messages.EventKey("1", 101, 0)
    assert positions.decode(head[4:], 4) == (None, k101, k100, None)  # both partitions' places


def test_an_empty_history_s_position_is_no_floor() -> None:
    """A stream that started on an empty history (position ``<epoch>_0-0``) skips nothing, so
    it can settle at once; any other start position stays its floor until an update passes."""
    empty, started = QueuedStream(None, max_buffer=1024), QueuedStream(None, max_buffer=1024)
    empty.go_live(after=messages.EventKey("1", 0, 0))
    started.go_live(after=messages.EventKey("1", 0, 1))
    assert empty.floor_key is None
    assert started.floor_key == messages.EventKey("1", 0, 1)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_closed_stream_whose_client_stopped_reading_is_dropped(loop: str) -> None:
    """A stream closed by the service (credentials, shutdown) whose client reads no more would
    keep its connection while its last bytes wait: the shared timer drops it after the send
    timeout, as it does a live stream."""
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_closed_and_stalled())


async def _closed_and_stalled() -> None:
    hub = Hub(send_timeout=0.2, tick=0.05)
    timer = asyncio.create_task(hub.run())
    try:
        async with _connected(hub) as (stream, _reader):  # the client never reads
            stream.go_live()
            # more than the client's socket and reader take: the rest waits in our buffer
            stream.transport.write(b"x" * 8_000_000)
            assert stream.unsent() > 0
            stream.close(b"event: auth\ndata: {}\n\n")
            assert len(hub) == 1
            for _ in range(100):  # bounded: 5 s
                if len(hub) == 0:
                    break
                await asyncio.sleep(0.05)
            assert len(hub) == 0  # aborted, so the connection is gone and the stream detached
    finally:
        timer.cancel()


class _Recorded(QueuedStream):
    """Remembers when it was closed and with which final frame."""

    __slots__ = ("closed_at", "final")

    def close(self, final: bytes = b"") -> None:
        if not self.closed:
            self.closed_at, self.final = asyncio.get_running_loop().time(), final
        super().close(final)


async def test_close_in_batches_spreads_random_closes_each_with_its_own_final_frame() -> None:
    hub = Hub()
    streams = [_Recorded(None if i % 3 else i, max_buffer=1 << 20) for i in range(60)]
    for stream in streams:
        hub.attach(stream)
        stream.go_live()
    hub_order = [id(stream) for stream in hub.streams()]
    hints = iter(range(1000, 2000))
    closing = asyncio.create_task(
        hub.close_in_batches(over=0.5, final=lambda: messages.retry_frame(next(hints)), tick=0.1)
    )
    await asyncio.sleep(0)  # the first batch
    late = _Recorded(5, max_buffer=1 << 20)  # a stream whose start-up was under way
    hub.attach(late)
    assert await asyncio.wait_for(closing, 10) == 61
    assert all(stream.closed for stream in [*streams, late])
    # 5 batches of 12, 0.1 s apart: never more than 12 at once, over most of the window
    times = sorted(stream.closed_at for stream in streams)
    batches = [[times[0]]]
    for before, after in zip(times, times[1:], strict=False):
        if after - before > 0.02:  # a batch closes in microseconds; the next comes a tick later
            batches.append([])
        batches[-1].append(after)
    assert len(batches) >= 3 and max(len(batch) for batch in batches) <= 12, times
    assert times[-1] - times[0] >= 0.3, times
    # random order (not the hub's own), and a final frame of its own each (the latecomer too)
    by_time = sorted(streams, key=lambda stream: stream.closed_at)
    assert [id(stream) for stream in by_time] != hub_order
    assert len({stream.final for stream in [*streams, late]}) == 61


async def test_close_in_batches_closes_a_few_streams_without_waiting_for_the_window() -> None:
    hub = Hub()
    streams = [_Recorded(None, max_buffer=1024) for _ in range(3)]
    for stream in streams:
        hub.attach(stream)
    closing = hub.close_in_batches(over=60, final=lambda: b"retry: 1\n\n", tick=0.05)
    assert await asyncio.wait_for(closing, 5) == 3  # one per tick, not spread over 60 s


def test_a_resync_during_start_up_is_written_when_the_stream_goes_live() -> None:
    """A stream still reading its replay when a re-sync comes (a resume racing a failover's new
    epoch) gets the marker in order when it goes live, not never."""
    hub = Hub()
    starting = QueuedStream(None, max_buffer=1 << 20)
    filtered = QueuedStream(7, max_buffer=1 << 20)
    for stream in (starting, filtered):
        hub.attach(stream)
    hub.publish(_update(7, 1, messages.EventKey("1", 5, 0)))
    hub.resync(())
    hub.resync((7,))
    hub.publish(_update(7, 1, messages.EventKey("2", 6, 0)))
    assert _frames(starting) == [] and _frames(filtered) == []  # held while starting up
    starting.go_live(after=messages.EventKey("1", 5, 0))  # the replay ended at the first update
    filtered.go_live()
    expected = [("snapshot", None), ("snapshot", {"registrationIds": [7]}), ("update", None)]
    for stream in (starting, filtered):
        kinds = [(f["type"], f.get("data") if f["type"] == "snapshot" else None)
                 for f in _frames(stream)]  # fmt: skip
        assert kinds[-3:] == expected
    assert [f["type"] for f in _frames(filtered)] == ["update", "snapshot", "snapshot", "update"]
