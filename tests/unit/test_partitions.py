"""The partitioned bus's names and positions (issue 18), and the hub's frames on it."""

from __future__ import annotations

import orjson
import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from regstream.realtime import messages, positions
from regstream.realtime.hub import Hub, QueuedStream
from regstream.realtime.messages import EventKey
from regstream.realtime.partitions import Layout, hash_tags


@pytest.mark.parametrize("count", [1, 3, 16, 64])
def test_each_partition_hashes_into_its_own_slot_range(count: int) -> None:
    width = REDIS_CLUSTER_HASH_SLOTS / count
    slots = [key_slot(f"x{{{tag}}}".encode()) for tag in hash_tags(count)]
    assert [int(slot // width) for slot in slots] == list(range(count))


def test_a_partitions_keys_and_channels_share_one_slot() -> None:
    layout = Layout.cluster(16)
    seen = set()
    for partition in layout.partitions:
        names = [
            partition.channel, partition.history_key, partition.epoch_key, partition.primary_key,
            partition.index_state_prefix + "1733500000000000",
            partition.index_key_prefix + "1733500000000000:42", partition.probe_channel("abc"),
            partition.seq_key_prefix + "1733500000000000:42",
            partition.legacy_state_prefix + "1733500000000000",
        ]  # fmt: skip
        slots = {key_slot(name.encode()) for name in names}
        assert len(slots) == 1, (partition.index, slots)
        seen |= slots
        assert partition.sharded
    assert len(seen) == 16  # no two partitions in one slot
    assert layout.of(42).index == 42 % 16
    assert layout.indexes_of((1, 17, 2, 33)) == (1, 2)


def test_one_redis_keeps_the_seeds_names() -> None:
    (only,) = Layout.single().partitions
    assert only.channel == "service:registration-updates" and not only.sharded
    assert only.history_key == "service:registration-updates:history"
    assert only.probe_channel("t") == "regstream:probe:t"
    assert Layout.single().mirror is None and Layout.cluster(4, mirror=True).mirror == only.channel


def test_positions_round_trip_compactly() -> None:
    keys = [EventKey("1796580000123456", 1796580001000 + i, i % 3) for i in range(16)]
    position = tuple(None if i == 5 else key for i, key in enumerate(keys))
    encoded = positions.encode(position)
    assert positions.is_position(encoded) and len(encoded) < 400
    assert positions.decode(encoded, 16) == position
    assert positions.decode(encoded, 15) is None  # another deployment's K: not comparable
    assert positions.join([positions.component(k) for k in position]) == encoded


@pytest.mark.parametrize(
    "value",
    ["", "c.", "1796580000123456_1-0", "c." + "." * 15 + "x", "c." + "a-b" + "." * 15,
     "c." + "1-2-3-4" + "." * 15, "c." + "é-1-1" + "." * 15, "c." + "1-1-1." * 400],
)  # fmt: skip
def test_positions_reject_what_they_did_not_write(value: str) -> None:
    assert positions.decode(value, 16) is None


def test_after_compares_within_an_epoch_only() -> None:
    position = (EventKey("1", 10, 0), None)
    assert positions.after(position, EventKey("1", 10, 1), 0)
    assert not positions.after(position, EventKey("1", 10, 0), 0)
    assert not positions.after(position, EventKey("2", 99, 0), 0)  # another epoch
    assert positions.after(position, EventKey("2", 1, 0), 1)  # nothing known there


def _update(rid: int, key: EventKey) -> messages.Parsed:
    body = {"registrationId": rid, "seq": 1, "timestamp": 1, "eventId": str(key)}
    parsed = messages.parse_message(orjson.dumps(body))
    assert parsed is not None
    return parsed


def _ids(stream: QueuedStream) -> list[str]:
    out = []
    for frame in stream._queue:  # noqa: SLF001 - the test reads what would be sent
        out += [line[4:].decode() for line in frame.split(b"\n") if line.startswith(b"id: ")]
    return out


async def test_streams_of_several_partitions_get_positions_and_one_registrations_its_id() -> None:
    hub = Hub(partitions=4)
    everything = QueuedStream(None, max_buffer=1 << 20)
    page = QueuedStream((1, 2), max_buffer=1 << 20)
    one = QueuedStream(2, max_buffer=1 << 20)
    for stream in (everything, page, one):
        hub.attach(stream)
        stream.go_live()
    start = EventKey("7", 100, 0)
    hub.set_position(3, start)
    a, b = EventKey("5", 200, 0), EventKey("6", 300, 1)
    hub.publish(_update(1, a))  # partition 1
    hub.publish(_update(2, b))  # partition 2
    assert _ids(one) == [str(b)]  # its own id: one registration, one partition
    expected = [positions.encode((None, a, None, start)), positions.encode((None, a, b, start))]
    assert _ids(everything) == expected
    assert _ids(page) == expected
    assert hub.position() == (None, a, b, start)


async def test_one_redis_frames_are_unchanged() -> None:
    hub = Hub()
    everything = QueuedStream(None, max_buffer=1 << 20)
    hub.attach(everything)
    everything.go_live()
    key = EventKey("5", 200, 0)
    hub.publish(_update(1, key))
    assert _ids(everything) == [str(key)]
