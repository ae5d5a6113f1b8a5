"""The service on a Redis Cluster (issue 18): a private 3-master, 3-replica cluster on loopback
(``tests/cluster_support.py``), ``REDIS_URL`` naming one node, cluster mode detected.

- updates go to 16 partitions by registration id, each published with ``SPUBLISH`` on a
  hash-tagged shard channel beside its history (one slot: the script is never ``CROSSSLOT``);
- an instance subscribes only to the partitions its streams follow;
- an unfiltered stream's ids are positions (one part per partition) and a resume from any of
  them is exact: every update after it once, none before it;
- the seed's channel gets nothing unless the mirror is switched on;
- a master killed mid-bulk: its replica is promoted, every registration ends with one final
  status, every stream is complete or told to re-sync, the service follows without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync
from pydantic import SecretStr

from regstream.config import Settings
from regstream.core_banking.simulator import SimulatorConfig
from regstream.core_banking.simulator.dataset import load_applicant
from regstream.core_banking.simulator.server import serve_in_thread
from regstream.realtime import positions
from regstream.realtime.messages import ServiceChannel
from regstream.realtime.partitions import Layout
from regstream.realtime.publisher import RegistrationPubSub
from tests.cluster_support import PrivateCluster
from tests.stream_coverage import Watched, assert_all_ended_and_covered
from tests.support import (
    TEST_SECRET_KEY,
    SseReader,
    auth_headers,
    open_stream,
    serve_app,
    wait_until,
)

pytestmark = pytest.mark.redis

LAYOUT = Layout.cluster(16)


@pytest.fixture
def cluster(redis_cluster: PrivateCluster) -> Iterator[PrivateCluster]:
    """The module's cluster, emptied before each test (each test's database starts at id 1)."""
    for master in redis_cluster.masters():
        redis_cluster.client(master.port).flushall()
    yield redis_cluster


def _settings(cluster: PrivateCluster, tmp_path: Path, t24_url: str, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "var", "redis_url": SecretStr(cluster.url),
        "t24_base_url": t24_url, "secret_key": SecretStr(TEST_SECRET_KEY),
        "t24_timeout": 2.0, "t24_deadline": 4.0, "probe_interval": 1.0, "lease_seconds": 5.0,
        "drain_spread": 0.5,
    }  # fmt: skip
    values.update(extra)
    return Settings(**values)


async def _create(http: httpx.AsyncClient, count: int, first: int) -> list[int]:
    rids = []
    for n in range(count):
        created = await http.post("/api/registrations", json=load_applicant(first + n))
        assert created.status_code == 201, created.text
        rids.append(created.json()["id"])
    return rids


async def _process(http: httpx.AsyncClient, rids: list[int]) -> None:
    response = await http.post("/api/registrations/process", json={"registrationIds": rids})
    assert response.status_code == 200 and response.json()["accepted"] == rids, response.text


def _seqs(reader: SseReader, rid: int) -> list[int]:
    return [u["seq"] for u in reader.updates(rid)]


async def test_cluster_mode_partitions_streams_and_exact_resume(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    with serve_in_thread(SimulatorConfig(latency_ms=5)) as t24:
        with serve_app(_settings(cluster, tmp_path, t24.base_url)) as live:
            bus = live.services.bus
            assert bus.partitioned and len(bus.layout) == 16
            operator = auth_headers(live, "operator")
            async with httpx.AsyncClient(base_url=live.url, headers=operator, timeout=10) as http:
                rids = await _create(http, 24, 7_000)
                one = rids[5]
                # nobody follows anything yet: no subscription at all
                assert bus.subscribed == ()
                async with open_stream(live, registration_id=one) as filtered:
                    assert bus.subscribed == (one % 16,)  # only its registration's partition
                    with redis_sync.Redis(port=cluster.masters()[0].port) as node:
                        seed = node.pubsub()
                        seed.subscribe(ServiceChannel.REGISTRATION_UPDATES)
                        async with open_stream(live) as everything:
                            assert bus.subscribed == tuple(range(16))
                            await _process(http, rids[:12])
                            for rid in rids[:12]:
                                await everything.wait_final(rid)
                            middle = everything.last_event_id()
                            assert middle is not None and positions.is_position(middle)
                            assert len(middle) < 400  # compact: one short part per partition
                            await _process(http, rids[12:])
                            for rid in rids[12:]:
                                await everything.wait_final(rid)
                            await filtered.wait_final(one)
                            # every registration's updates in seq order, each once
                            for rid in rids:
                                seqs = _seqs(everything, rid)
                                assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 4
                            assert _seqs(filtered, one) == _seqs(everything, one)
                            assert {u["registrationId"] for u in filtered.updates()} == {one}
                            # the seed's channel: nothing without the mirror (classic PUBLISH
                            # would copy every update to every node of the cluster)
                            mirrored = [seed.get_message(timeout=0.2) for _ in range(5)]
                            assert [m for m in mirrored if m and m["type"] == "message"] == []
                            seed.close()
                        # a resume from the middle: exactly what came after it
                        async with open_stream(live, last_event_id=middle) as resumed:
                            for rid in rids[12:]:
                                await resumed.wait_final(rid)
                            await asyncio.sleep(0.3)
                            for rid in rids[:12]:
                                assert _seqs(resumed, rid) == []
                            for rid in rids[12:]:
                                assert _seqs(resumed, rid) == _seqs(everything, rid)
                            assert not [f for f in resumed.frames if f.type == "snapshot"]
                # the shard channels and histories live where their hash tags say
                partition = LAYOUT.of(one)
                owner = cluster.master_of(partition.history_key)
                with redis_sync.Redis(port=owner.port) as node:
                    assert node.xlen(partition.history_key) >= 4
                    assert node.get(partition.epoch_key)
                assert (await http.get("/readyz")).status_code == 200


async def test_list_page_and_filtered_streams_resume_exactly(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    """A list page (registrations of three partitions) and a stream of one registration: each
    resumes from the id it last got, mid-run, with exactly the rest."""
    with serve_in_thread(SimulatorConfig(latency_ms=30)) as t24:
        with serve_app(_settings(cluster, tmp_path, t24.base_url)) as live:
            operator = auth_headers(live, "operator")
            async with httpx.AsyncClient(base_url=live.url, headers=operator, timeout=10) as http:
                rids = await _create(http, 6, 7_500)
                page = (rids[0], rids[1], rids[2])  # three partitions (consecutive ids)
                ids = ",".join(str(r) for r in page)
                async with (
                    open_stream(live, registration_id=ids) as first,
                    open_stream(live, registration_id=rids[0]) as single,
                    open_stream(live) as everything,
                ):
                    await _process(http, [rids[0], rids[1]])
                    await first.wait_for(lambda fs: len(first.updates()) >= 3, what="a start")
                    await single.wait_for(lambda fs: len(single.updates()) >= 2, what="a start")
                    page_id, single_id = first.last_event_id(), single.last_event_id()
                    got_page, got_single = len(first.updates()), len(single.updates())
                    assert page_id is not None and positions.is_position(page_id)
                    assert single_id is not None and not positions.is_position(single_id)
                    await _process(http, [rids[2], rids[3]])
                    for rid in (rids[0], rids[1], rids[2], rids[3]):
                        await everything.wait_final(rid)
                    async with (
                        open_stream(live, registration_id=ids, last_event_id=page_id) as page2,
                        open_stream(
                            live, registration_id=rids[0], last_event_id=single_id
                        ) as single2,
                    ):
                        for rid in page:
                            await page2.wait_final(rid)
                        await single2.wait_final(rids[0])
                        await asyncio.sleep(0.3)
                        rest = first.updates()[got_page:]
                        for rid in page:  # in seq order per registration (not across partitions)
                            assert _seqs(page2, rid) == [
                                u["seq"] for u in rest if u["registrationId"] == rid
                            ]
                        assert rids[3] not in {u["registrationId"] for u in page2.updates()}
                        assert [u["seq"] for u in single2.updates()] == [
                            u["seq"] for u in single.updates()[got_single:]
                        ]
                        assert not [
                            f for f in page2.frames + single2.frames if f.type == "snapshot"
                        ]


async def test_partitions_nobody_follows_are_unsubscribed_after_the_linger(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    with serve_in_thread(SimulatorConfig(latency_ms=5)) as t24:
        settings = _settings(cluster, tmp_path, t24.base_url, partition_linger=0.5)
        with serve_app(settings) as live:
            bus = live.services.bus
            partition = LAYOUT.of(3)

            def subscribers() -> int:
                owner = cluster.master_of(partition.channel)
                with redis_sync.Redis(port=owner.port) as node:
                    counts = node.execute_command("PUBSUB", "SHARDNUMSUB", partition.channel)
                return int(counts[1])

            async with open_stream(live, registration_id=3):
                assert bus.subscribed == (3,) and subscribers() == 1
                assert bus.brokers[3].connected.is_set()
            # gone from this instance, and from the shard: it costs nothing any more
            await wait_until(lambda: bus.subscribed == (), timeout=10, what="unsubscribed")
            await wait_until(lambda: subscribers() == 0, timeout=10, what="SSUBSCRIBE gone")
            async with open_stream(live, registration_id=3):  # and back on demand
                assert bus.subscribed == (3,) and subscribers() == 1


async def test_seed_channel_mirror_when_switched_on(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    settings_extra = {"seed_channel_mirror": True}
    with serve_in_thread(SimulatorConfig(latency_ms=5)) as t24:
        with serve_app(_settings(cluster, tmp_path, t24.base_url, **settings_extra)) as live:
            operator = auth_headers(live, "operator")
            async with httpx.AsyncClient(base_url=live.url, headers=operator, timeout=10) as http:
                rids = await _create(http, 3, 7_100)
                # any node: classic Pub/Sub is a cluster-wide broadcast
                with redis_sync.Redis(port=cluster.masters()[-1].port) as node:
                    seed = node.pubsub(ignore_subscribe_messages=True)
                    seed.subscribe(ServiceChannel.REGISTRATION_UPDATES)
                    await _process(http, rids)
                    got: list[Any] = []

                    def arrived() -> bool:
                        message = seed.get_message(timeout=0.05)
                        if message is not None:
                            got.append(message)
                        return sum(b'"final":true' in m["data"] for m in got) >= 3

                    await wait_until(arrived, timeout=20, interval=0, what="mirrored finals")
                    seed.close()


@pytest.mark.timeout(240)
async def test_master_killed_mid_bulk_every_registration_ends_once_and_streams_complete(
    fresh_redis_cluster: PrivateCluster, tmp_path: Path
) -> None:
    cluster = fresh_redis_cluster
    bulk = 60
    with serve_in_thread(SimulatorConfig(latency_ms=80)) as t24:
        settings = _settings(cluster, tmp_path, t24.base_url, pipeline_concurrency=4)
        with serve_app(settings) as live:
            operator = auth_headers(live, "operator")
            async with httpx.AsyncClient(base_url=live.url, headers=operator, timeout=10) as http:
                rids = await _create(http, bulk, 7_200)
                # the master that owns the last registration's partition dies: that partition
                # still has updates to publish after the kill (the runs are taken in id order,
                # 4 at a time), so the promoted replica must begin its new epoch; the first
                # registration's partition could be done by then and never be written again
                victim_partition = LAYOUT.of(rids[-1])
                followed = [rids[0], rids[bulk // 2], rids[-1]]
                async with contextlib.AsyncExitStack() as stack:
                    everything = await stack.enter_async_context(open_stream(live))
                    watched = [Watched("unfiltered", everything, None)]
                    for rid in followed:
                        reader = await stack.enter_async_context(
                            open_stream(live, registration_id=rid)
                        )
                        watched.append(Watched(f"filtered-{rid}", reader, {rid}))
                    await _process(http, rids)

                    def finals() -> int:
                        return sum(1 for u in everything.updates() if u.get("final"))

                    await wait_until(lambda: finals() >= 6, timeout=60, what="the bulk under way")
                    resume_from = everything.last_event_id()
                    owner = cluster.master_of(victim_partition.epoch_key)
                    with redis_sync.Redis(port=owner.port) as node:
                        epoch_before = node.get(victim_partition.epoch_key)
                    killed = cluster.kill_master_of(victim_partition.history_key)
                    promoted = await cluster.wait_promoted(killed, timeout=60)
                    assert promoted.port != killed.port
                    # a stream that comes back with the id it had before the kill
                    resumed = await stack.enter_async_context(
                        open_stream(live, last_event_id=resume_from)
                    )
                    watched.append(Watched("resumed", resumed, None))

                    await assert_all_ended_and_covered(live, http, rids, watched, timeout=120)
                # the promoted replica's history began a new epoch (what the dead master had
                # not replicated is in no history: streams were told to re-sync, not left short)
                with redis_sync.Redis(port=promoted.port) as node:
                    epoch_after = node.get(victim_partition.epoch_key)
                assert epoch_before and epoch_after and epoch_after != epoch_before
                assert any(f.type == "snapshot" and (f.data or {}).get("resync")
                           for f in everything.frames)  # fmt: skip

                # followed the new topology without a restart: a new stream gets new updates
                async def ready() -> bool:
                    return (await http.get("/readyz")).status_code == 200

                await wait_until(ready, timeout=30, interval=0.5, what="ready on the new topology")
                late = await _create(http, 1, 7_400)
                async with open_stream(live) as after:
                    await _process(http, late)
                    final = await after.wait_final(late[0])
                    assert final["registrationId"] == late[0]


async def test_a_shard_failing_over_holds_only_its_partitions_and_publishes_each_once(
    fresh_redis_cluster: PrivateCluster,
) -> None:
    """``RegistrationPubSub.from_url(cluster=True)`` with the seed's calls: while one master is
    dead, the other shards' partitions are published (the dead shard's calls fail alone,
    ``PartlySent``); the dead shard's updates wait in the outbox and go out after the
    promotion, each once, in seq order, numbered by Redis (the seed's calls give no seq), and
    the subscriber receives them: the publish script begins the promoted replica's epoch
    itself, so a retried call that lands there first is not lost to a later check."""
    cluster = fresh_redis_cluster
    pubsub = RegistrationPubSub.from_url(cluster.url, cluster=True, hold_max=1.0)
    received: list[dict[str, Any]] = []
    subscription = await pubsub.subscribe(received.append)
    try:
        layout = pubsub.layout
        victim = cluster.master_of(layout.partitions[0].history_key)
        on_victim = [p.index for p in layout.partitions
                     if cluster.master_of(p.history_key).port == victim.port]  # fmt: skip
        assert 0 < len(on_victim) < 16
        cluster.kill_master_of(victim.slots[0][0])

        def refused() -> bool:
            try:
                with redis_sync.Redis(port=victim.port, socket_connect_timeout=0.2) as node:
                    node.ping()
            except redis_sync.ConnectionError:
                return True
            return False

        await wait_until(refused, timeout=10, what="the master to be gone")
        rids = list(range(1, 33))  # two registrations per partition
        for rid in rids:
            await pubsub.publish_stage_update(rid, "duplicate_check", "started")
        elsewhere = [rid for rid in rids if rid % 16 not in on_victim]
        await wait_until(lambda: {u["registrationId"] for u in received} >= set(elsewhere),
                         timeout=20, what="the live shards' updates")  # fmt: skip
        await cluster.wait_promoted(victim, timeout=60)
        for rid in rids:
            await pubsub.publish_final_status(rid, "APPROVED", "done")
        await wait_until(lambda: {u["registrationId"] for u in received if u.get("final")}
                         == set(rids), timeout=60, what="every final")  # fmt: skip
        await asyncio.sleep(0.5)
        by_rid: dict[int, list[int]] = {}
        for update in received:
            by_rid.setdefault(update["registrationId"], []).append(update["seq"])
        assert by_rid == {rid: [1, 2] for rid in rids}
        assert len(subscription.brokers) == 16
    finally:
        await pubsub.aclose()
