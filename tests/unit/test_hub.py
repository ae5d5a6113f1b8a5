"""The hub's routing on a real event loop (streams write into a bounded in-memory queue mode)."""

from __future__ import annotations

import orjson

from regstream.realtime import messages
from regstream.realtime.hub import Hub, QueuedStream


def _frames(stream: QueuedStream) -> list[dict[str, object]]:
    out = []
    for frame in stream._queue:  # noqa: SLF001 - the test reads what would be sent
        line = next(x for x in frame.split(b"\n") if x.startswith(b"data: "))
        out.append(orjson.loads(line[6:]))
    return out


def _update(rid: int, seq: int) -> messages.Parsed:
    parsed = messages.parse_message(
        orjson.dumps({"registrationId": rid, "seq": seq, "timestamp": 1})
    )
    assert parsed is not None
    return parsed


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
