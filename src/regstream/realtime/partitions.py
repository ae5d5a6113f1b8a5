"""Where each update goes: the bus's partitions and their Redis keys.

With one Redis the bus is one partition, the seed's: channel ``service:registration-updates``
(classic ``PUBLISH``), history ``service:registration-updates:history`` and the keys beside it,
exactly as before cluster mode existed.

In a Redis Cluster the bus is ``REGSTREAM_PARTITIONS`` partitions (K) and an update goes to
partition ``registrationId % K``. Each partition's keys (channel, history, epoch, index,
primary, seq keys, probe channels) share one hash tag, so the publish script and the history reads of a
partition run in one slot on one shard, and updates are published with ``SPUBLISH`` on the
partition's shard channel: only the shard that owns the slot (and its replicas) carries them,
where classic ``PUBLISH`` copies every message to every node of the cluster.

The hash tags are chosen so that partition *i*'s slot lies in the *i*-th of K equal slot
ranges: ``redis-cli --cluster create`` gives each master a contiguous, equal share of the slots,
so the partitions spread evenly over the masters (16 partitions on 3 masters: 6/5/5).

Why 16 by default: a few partitions per master for clusters of 3 to 8 masters (so adding
masters and moving slots moves load), few enough that an unfiltered stream's resume position
(one per partition, ``ids.py``) stays a few hundred bytes and a fresh unfiltered stream reads 16
histories. A filtered stream needs one partition, so an instance whose streams follow a few
registrations subscribes to a few partitions and receives nothing of the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from regstream.realtime import messages
from regstream.realtime.messages import ServiceChannel

#: beside the channel: the index state hash per epoch, and the seq check's keys (short: one
#: per registration published within the age cap, ~150 B each; a key of up to 60 characters
#: fits the allocator's 64-byte class)
STATE_SUFFIX = ":history:state:"
SEQ_SUFFIX = ":seq:"


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition's Redis names (all in one slot in cluster mode)."""

    index: int
    channel: str
    sharded: bool  # SPUBLISH / SSUBSCRIBE (cluster) or PUBLISH / SUBSCRIBE (one Redis)

    @property
    def history_key(self) -> str:
        return self.channel + messages.HISTORY_SUFFIX

    @property
    def epoch_key(self) -> str:
        return self.channel + messages.EPOCH_SUFFIX

    @property
    def primary_key(self) -> str:
        return self.channel + messages.PRIMARY_SUFFIX

    @property
    def index_state_prefix(self) -> str:
        """The index state hash of an epoch (``last``, ``upto``): ``<prefix><epoch>``."""
        return self.channel + STATE_SUFFIX

    @property
    def legacy_state_prefix(self) -> str:
        """The index state hash of releases that kept the seq check in it (field ``s<id>``,
        renewed by every batch, so never trimmed): read and written only while an instance of
        such a release still publishes (``publisher.py``)."""
        return self.channel + messages.INDEX_SUFFIX + ":"

    @property
    def seq_key_prefix(self) -> str:
        """The seq check: the last seq published per registration and epoch, one key each with
        a TTL: ``<prefix><epoch>:<registrationId>``."""
        return self.channel + SEQ_SUFFIX

    @property
    def index_key_prefix(self) -> str:
        return self.channel + messages.INDEX_KEY_SUFFIX

    def probe_channel(self, token: str) -> str:
        """A subscriber's own probe channel, in the partition's slot (the same shard)."""
        if self.sharded:
            return self.channel + ":probe:" + token
        return messages.PROBE_PREFIX + token


@dataclass(frozen=True, slots=True)
class Layout:
    """The bus: its partitions, and which one an update goes to."""

    partitions: tuple[Partition, ...]
    #: cluster mode: also ``PUBLISH`` every update on the seed's channel (a cluster-wide copy)
    mirror: str | None = None

    @classmethod
    def single(cls, channel: str = ServiceChannel.REGISTRATION_UPDATES) -> Layout:
        return cls((Partition(0, channel, sharded=False),))

    @classmethod
    def cluster(
        cls, count: int, *, channel: str = ServiceChannel.REGISTRATION_UPDATES,
        mirror: bool = False,
    ) -> Layout:  # fmt: skip
        parts = tuple(
            Partition(i, f"{channel}:{{{tag}}}", sharded=True)
            for i, tag in enumerate(hash_tags(count))
        )
        return cls(parts, mirror=channel if mirror else None)

    @property
    def sharded(self) -> bool:
        return self.partitions[0].sharded

    def __len__(self) -> int:
        return len(self.partitions)

    def of(self, registration_id: int) -> Partition:
        return self.partitions[registration_id % len(self.partitions)]

    def indexes_of(self, registration_ids: tuple[int, ...]) -> tuple[int, ...]:
        """The partitions these registrations' updates go to, in order."""
        count = len(self.partitions)
        return tuple(sorted({rid % count for rid in registration_ids}))


@cache
def hash_tags(count: int) -> tuple[str, ...]:
    """K hash tags, the i-th hashing into the i-th of K equal slot ranges (deterministic)."""
    tags = []
    width = REDIS_CLUSTER_HASH_SLOTS / count
    for i in range(count):
        low, high = int(i * width), int((i + 1) * width)
        n = 0
        while not low <= key_slot(f"p{i}.{n}".encode()) < high:
            n += 1
        tags.append(f"p{i}.{n}")
    return tuple(tags)
