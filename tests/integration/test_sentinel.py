"""Sentinel failover mid-bulk (issue 15 items 7 and 9): a primary, a replica and three sentinels,
all private ``redis-server`` processes on loopback, stopped by PID.

The service is configured with the sentinels only. During a bulk validation the replica's link
is cut and its replication user disabled on the primary, so the primary acknowledges updates it
never replicates; then the primary is SIGKILLed: the sentinels promote the replica (it lacks
those updates), the service follows without a restart, every registration ends with exactly one
final status, and every stream (open all along, or resumed with its Last-Event-ID after the
failover) has every ``(registrationId, seq)`` of the database's process log, or was told to
re-sync / sent a snapshot that covers it.

Without ``publisher.check_primary`` this fails: the stream resumed after the failover misses
the updates the old primary lost, silently (its Last-Event-ID still looks valid).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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
from regstream.realtime import messages
from regstream.realtime.broker import Broker
from regstream.realtime.connections import RedisTarget, create_client, create_subscriber_client
from regstream.realtime.embedded import EmbeddedRedis, find_server_binary
from regstream.realtime.publisher import RegistrationPubSub
from tests.conftest import unavailable
from tests.stream_coverage import Watched, assert_all_ended_and_covered
from tests.support import (
    StreamClient,
    auth_headers,
    serve_app,
    wait_until,
)

SERVICE = "mymaster"
REPLICATION_USER = ("replicator", "replicator-test-password")
HISTORY = messages.ServiceChannel.REGISTRATION_UPDATES + messages.HISTORY_SUFFIX
BULK_SIZE = 80


def _low_free_port() -> int:
    """A free loopback port below 55000 (the rule for every test port)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port < 55000:
            return port
    raise RuntimeError("no free port below 55000")


@dataclass
class SentinelSet:
    """A primary, a replica and three sentinels (``redis-server --sentinel``)."""

    directory: Path
    primary: EmbeddedRedis
    replica: EmbeddedRedis
    sentinel_ports: list[int]
    sentinels: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_sentinels(self, binary: str) -> None:
        for port in self.sentinel_ports:
            conf = self.directory / f"sentinel-{port}.conf"  # sentinels rewrite their file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"logfile {self.directory}/sentinel-{port}.log\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 4000\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    [binary, str(conf), "--sentinel"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
            )

    def sentinel(self, port: int) -> redis_sync.Redis:
        return redis_sync.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)

    def primary_port(self) -> int | None:
        """The primary's port as a majority of the sentinels see it."""
        seen: dict[int, int] = {}
        for port in self.sentinel_ports:
            with self.sentinel(port) as client:
                try:
                    addr = client.sentinel_get_master_addr_by_name(SERVICE)
                except redis_sync.RedisError:
                    continue
            if addr:
                seen[int(addr[1])] = seen.get(int(addr[1]), 0) + 1
        best = max(seen.items(), key=lambda item: item[1], default=None)
        return best[0] if best is not None and best[1] >= 2 else None

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Replica in sync, and every sentinel sees the replica and a quorum of sentinels."""
        deadline = time.monotonic() + timeout
        assert self.replica.port is not None
        while time.monotonic() < deadline:
            with redis_sync.Redis(port=self.replica.port) as replica:
                synced = replica.info("replication").get("master_link_status") == "up"
            if synced and all(self._sentinel_ready(port) for port in self.sentinel_ports):
                return
            time.sleep(0.1)
        raise AssertionError("the sentinel set did not become ready in time")

    def _sentinel_ready(self, port: int) -> bool:
        with self.sentinel(port) as client:
            try:
                replicas = client.sentinel_slaves(SERVICE)
                client.execute_command("SENTINEL", "CKQUORUM", SERVICE)
                others = client.sentinel_sentinels(SERVICE)
            except redis_sync.RedisError:
                return False
        return len(others) == 2 and any(
            int(r["port"]) == self.replica.port and "s_down" not in str(r.get("flags", ""))
            for r in replicas
        )

    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def stop(self) -> None:
        for process in self.sentinels:
            if process.poll() is None:
                process.kill()  # by PID; nothing of theirs is worth a clean shutdown
            process.wait(5)
        self.replica.stop()
        self.primary.stop()


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    try:
        binary = find_server_binary()
    except Exception:  # noqa: BLE001
        unavailable("a redis-server binary")
        raise
    primary_port, replica_port = _low_free_port(), _low_free_port()
    # without the diskless-sync delay (5 s by default) the replica syncs at once
    fast_sync = ["--repl-diskless-sync-delay", "0"]
    primary = EmbeddedRedis(tmp_path / "primary", port=primary_port, extra_args=fast_sync)
    user, password = REPLICATION_USER
    replica = EmbeddedRedis(
        tmp_path / "replica", port=replica_port,
        extra_args=["--replicaof", "127.0.0.1", str(primary_port), "--masteruser", user,
                    "--masterauth", password, *fast_sync],
    )  # fmt: skip
    ports = [_low_free_port() for _ in range(3)]
    topology = SentinelSet(tmp_path, primary, replica, ports)
    try:
        primary.start()
        with redis_sync.Redis(port=primary_port) as client:  # a user of its own: cut at will
            client.acl_setuser(user, enabled=True, passwords=[f"+{password}"],
                               commands=["+psync", "+replconf", "+ping"])  # fmt: skip
        replica.start()
        topology.start_sentinels(binary)
        topology.wait_ready()
        yield topology
    finally:
        topology.stop()


# --- the test ----------------------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_sentinel_failover_mid_bulk_loses_nothing_silently(
    sentinel_set: SentinelSet, tmp_path: Path
) -> None:
    assert sentinel_set.replica.port is not None and sentinel_set.primary.port is not None
    with serve_in_thread(SimulatorConfig(latency_ms=100)) as t24:
        settings = Settings(
            data_dir=tmp_path / "var", t24_base_url=t24.base_url,
            redis_sentinels=",".join(f"127.0.0.1:{p}" for p in sentinel_set.sentinel_ports),
            redis_sentinel_service=SERVICE, secret_key=SecretStr("sentinel-test-secret-key-0123456789"),
            t24_timeout=2.0, t24_deadline=4.0, probe_interval=1.0, lease_seconds=5.0,
            pipeline_concurrency=4,  # a bulk that lasts a few seconds: the kill lands mid-bulk
        )  # fmt: skip
        with serve_app(settings) as live:
            await _fail_over_mid_bulk(live, sentinel_set)


async def _fail_over_mid_bulk(live: Any, topology: SentinelSet) -> None:
    primary_port, replica_port = topology.primary.port, topology.replica.port
    assert primary_port is not None and replica_port is not None
    admin = auth_headers(live, "admin")
    operator = auth_headers(live, "operator")
    async with httpx.AsyncClient(base_url=live.url, headers=operator, timeout=10) as http:
        rids = []
        for n in range(BULK_SIZE):
            created = await http.post("/api/registrations", json=load_applicant(9_000 + n))
            assert created.status_code == 201, created.text
            rids.append(created.json()["id"])
        late = [rids[BULK_SIZE // 2], rids[BULK_SIZE * 2 // 3], rids[-1]]
        clients = [StreamClient(live.url, headers=admin) for _ in range(2)]
        clients += [StreamClient(live.url, registration_id=rid, headers=admin) for rid in late]
        resuming = [
            StreamClient(live.url, headers=admin),
            StreamClient(live.url, registration_id=rids[BULK_SIZE * 3 // 4], headers=admin),
        ]
        readers = [await client.__aenter__() for client in clients]
        first_readers = [await client.__aenter__() for client in resuming]
        reopened: list[StreamClient] = []
        try:
            watched = [
                Watched("unfiltered-0", readers[0], None),
                Watched("unfiltered-1", readers[1], None),
                *(
                    Watched(f"filtered-{rid}", r, {rid})
                    for rid, r in zip(late, readers[2:], strict=True)
                ),
            ]
            response = await http.post("/api/registrations/process", json={"registrationIds": rids})
            assert response.status_code == 200 and response.json()["accepted"] == rids

            def finals() -> int:
                return sum(1 for u in readers[0].updates() if u.get("final"))

            await wait_until(lambda: finals() >= 8, timeout=30, what="the bulk under way")
            # two streams drop now and come back after the failover with their last event id
            resume_ids = []
            for client, reader in zip(resuming, first_readers, strict=True):
                connected = next(f for f in reader.frames if f.type == "connected")
                assert connected.data is not None
                resume_ids.append(reader.last_event_id() or connected.data.get("lastEventId"))
                await client.__aexit__(None, None, None)

            # The replica's link is cut and cannot come back: what the primary acknowledges
            # from now on it never replicates.
            with redis_sync.Redis(port=primary_port) as primary:
                primary.acl_setuser(REPLICATION_USER[0], enabled=False)
                primary.client_kill_filter(user=REPLICATION_USER[0])
            seen = len(readers[0].updates())
            await wait_until(lambda: len(readers[0].updates()) >= seen + 15, timeout=15,
                             what="updates published after the replica's link was cut")  # fmt: skip
            last_before_kill = messages.parse_event_id(readers[0].last_event_id())
            topology.primary.kill()
            assert last_before_kill is not None
            with redis_sync.Redis(port=replica_port) as replica:
                kept = replica.xrevrange(HISTORY, count=1)
            kept_key = messages.parse_event_id(f"{last_before_kill.epoch}_{kept[0][0].decode()}")
            assert kept_key is not None
            # the scenario holds: updates the streams saw are not in the replica's history
            assert (kept_key.ms, kept_key.n) < (last_before_kill.ms, last_before_kill.n)

            await wait_until(lambda: topology.primary_port() == replica_port,
                             timeout=30, what="the sentinels to promote the replica")  # fmt: skip
            for rid_filter, last_id in zip(
                (None, rids[BULK_SIZE * 3 // 4]), resume_ids, strict=True
            ):
                client = StreamClient(live.url, registration_id=rid_filter, headers=admin,
                                      last_event_id=last_id)  # fmt: skip
                reopened.append(client)
                reader = await client.__aenter__()
                name = "resumed-unfiltered" if rid_filter is None else f"resumed-{rid_filter}"
                earlier = first_readers[len(reopened) - 1].frames
                watched.append(Watched(name, reader, None if rid_filter is None else {rid_filter},
                                       earlier=list(earlier)))  # fmt: skip

            await assert_all_ended_and_covered(live, http, rids, watched, timeout=90)
            # the service followed the promotion without a restart
            assert (await http.get("/readyz")).status_code == 200
            with redis_sync.Redis(port=replica_port) as primary:
                names = {c.get("name", "") for c in primary.client_list()}
                assert primary.info("replication")["role"] == "master"
            pid = os.getpid()
            assert {f"regstream-pub-{pid}", f"regstream-sub-{pid}"} <= names
            # the streams were told: a re-sync marker for everyone after the new epoch began
            for w in watched:
                if w.rids is None:
                    assert any(f.type == "snapshot" for f in w.reader.frames), w.name
            epochs = {messages.parse_event_id(f.id).epoch for f in readers[0].frames  # type: ignore[union-attr]
                      if f.id and f.type == "update"}  # fmt: skip
            # the old primary's, and the new one's unless every later update of this stream's
            # registrations reached it as the re-sync's snapshot (a busy machine: the runs may
            # all end before the stream is live again); completeness is asserted above
            assert 1 <= len(epochs) <= 2, epochs
        finally:
            for client in [*clients, *reopened]:
                await client.__aexit__(None, None, None)


# --- the failover check on its own (no sentinels: a replica promoted by hand) ----------------


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis]]:
    """A primary and its replica (in sync)."""
    fast_sync = ["--repl-diskless-sync-delay", "0"]
    primary_port, replica_port = _low_free_port(), _low_free_port()
    primary = EmbeddedRedis(tmp_path / "p", port=primary_port, extra_args=fast_sync)
    replica = EmbeddedRedis(tmp_path / "r", port=replica_port, extra_args=fast_sync)
    try:
        primary.start()
        replica.start()
        with redis_sync.Redis(port=replica_port) as client:
            client.replicaof("127.0.0.1", str(primary_port))
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


async def test_check_primary_begins_one_new_epoch_per_promotion(
    replicated: tuple[EmbeddedRedis, EmbeddedRedis],
) -> None:
    primary, replica = replicated
    replica_port = replica.port
    assert replica_port is not None
    old = create_client(primary.url, name="test-old")
    new_a = create_client(replica.url, name="test-new-a")
    new_b = create_client(replica.url, name="test-new-b")
    try:
        first = RegistrationPubSub(old)
        # a publish before any check (as after a restart of an empty Redis, when the flusher
        # wins the race with the broker): its epoch is this primary's, nothing is emptied
        await first.publish_raw(b'{"registrationId":1,"seq":1}')
        assert await first.wait_flushed(5)
        epoch = await old.get(first.epoch_key)
        assert await first.check_primary() is False
        assert await first.check_primary() is False  # the same primary: nothing to do
        assert (await old.get(first.epoch_key), await old.xlen(first.history_key)) == (epoch, 1)

        async def replicated_all() -> bool:
            with redis_sync.Redis(port=replica_port) as client:
                return bool(client.xlen(first.history_key) == 1 and client.get(first.primary_key))

        await wait_until(replicated_all, timeout=10, what="the replica to catch up")
        with redis_sync.Redis(port=replica_port) as client:
            client.replicaof("NO", "ONE")  # what a sentinel does to the replica it promotes
        # two instances reconnect to the new primary: one new epoch, begun once
        a, b = RegistrationPubSub(new_a), RegistrationPubSub(new_b)
        assert [await a.check_primary(), await b.check_primary()] == [True, False]
        assert await a.check_primary() is False
        new_epoch = await new_a.get(a.epoch_key)
        assert new_epoch is not None and new_epoch != epoch
        assert await new_a.xlen(a.history_key) == 0  # the old primary's history is not this one
    finally:
        for client in (old, new_a, new_b):
            await client.aclose()


async def test_broker_resyncs_streams_when_a_live_update_is_of_a_new_epoch(
    replicated: tuple[EmbeddedRedis, EmbeddedRedis],
) -> None:
    """Another instance began a new epoch while this subscription stayed connected: what the old
    epoch lost is unknown here, so every stream is told to re-sync before the update."""
    primary, _ = replicated
    commands = create_client(primary.url, name="test-broker-cmd")
    publisher = RegistrationPubSub(commands)
    events: list[object] = []
    broker = Broker(
        subscriber=lambda: create_subscriber_client(primary.url, name="test-broker-sub"),
        commands=commands,
        on_update=lambda parsed: events.append(parsed.key),
        on_resync=lambda ids: events.append(("resync", ids)),
        channel=publisher.channel,
        probe_interval=1.0,
    )
    task = asyncio.create_task(broker.run())
    try:
        await asyncio.wait_for(broker.connected.wait(), 5)
        await publisher.publish_raw(b'{"registrationId":1,"seq":1}')
        await wait_until(lambda: len(events) == 1, timeout=5, what="the first update")
        first = events[0]
        assert isinstance(first, messages.EventKey)
        # as check_primary does on another instance after a failover
        await commands.set(publisher.epoch_key, str(int(first.epoch) + 1))
        await commands.delete(publisher.history_key)
        await publisher.publish_raw(b'{"registrationId":1,"seq":2}')
        await wait_until(lambda: len(events) == 3, timeout=5, what="the re-sync and the update")
        assert events[1] == ("resync", ())
        second = events[2]
        assert isinstance(second, messages.EventKey) and second.epoch == str(int(first.epoch) + 1)
        assert broker.healthy
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await commands.aclose()


async def test_sentinel_pool_waits_for_a_free_connection(sentinel_set: SentinelSet) -> None:
    """Through Sentinel the command pool still blocks when full (as ``BlockingConnectionPool``
    does without Sentinel) instead of failing with "Too many connections"."""
    client = create_client(RedisTarget.from_url(sentinel_set.url()), name="test-pool",
                           max_connections=1)  # fmt: skip
    try:
        waits = [client.blpop([f"test:empty:{i}"], timeout=0.2) for i in range(3)]
        assert await asyncio.gather(*waits) == [None, None, None]  # one after the other
    finally:
        await client.aclose()
