"""Redis Cluster measured (issue 18, "Measured" a and c; b is sse_bench.py's regstream-cluster).

Each rep starts a private Redis Cluster (tests/cluster_support.py: 3 masters + 3 replicas on
loopback) and a private single redis-server, and measures, single and cluster back to back:

(a) **Instance CPU per update of partitions its streams do not follow.** A `regstream serve`
    with one filtered stream (registration 900,000: partition 0 of 16) while the bench publishes
    ``--updates`` updates of other registrations (none of partition 0) through the service's
    publisher (capacity_bench.publish). On one Redis the instance receives every one of them
    (today's cost per update); on the cluster (``REDIS_CLUSTER=true``, 16 partitions) it is
    SSUBSCRIBEd to partition 0 only. Server CPU (/proc schedstat, its process tree) minus its
    idle rate (measured before) over the window, per update; the window ends 1 s after the
    instance counted every update received (regstream_redis_messages_received_total; on the
    cluster at once: it should receive none, and the count says so). Afterwards 7
    updates of registration 900,000 are published and must reach the stream (the subscription
    is live, the saving is not a broken bus), and ``regstream_bus_partitions_subscribed`` is
    read from /metrics.
(c) **Redis CPU per update** with 1 and 10 subscribing instances: single (capacity_bench's
    redis_cost: a connection SUBSCRIBEd per instance, INFO cpu) and cluster (an instance as it
    is with an unfiltered stream: a connection per partition, SSUBSCRIBEd on the master owning
    its slot; INFO cpu of all six nodes, masters + replicas, and of the busiest node; "net":
    minus the six nodes' idle rate, their timers and cluster-bus gossip, measured before).
    To tell why a cluster costs more: one Redis with a replica (primary and replica CPU), and
    the cluster with one partition (every update to one master, large batches); and both with
    one update per script call (a fleet of many publishers, each sending small batches).
(d) inputs: what the bus keeps in Redis after the rep's publishes (``redis_memory``): histories,
    index lists, the seq-check state (bytes per registration), single and cluster.

    .venv/bin/python bench/cluster_bench.py [--updates 40000] [--reps 3]

Medians over --reps and the median of the per-rep ratios; every rep in
bench/results/cluster_bench.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from typing import Any

import httpx

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.dirname(BENCH))  # the repository: tests.cluster_support
import procs  # noqa: E402
import redis as redis_sync  # noqa: E402
from capacity_bench import (  # noqa: E402
    Subscribers,
    open_streams,
    publish,
    redis_cost,
    redis_cpu,
    save,
    start_service,
)
from tests.cluster_support import PrivateCluster  # noqa: E402

from regstream.realtime import messages  # noqa: E402
from regstream.realtime.partitions import SEQ_SUFFIX, Layout  # noqa: E402

PARTITIONS = 16
FOLLOWED = 900_000  # open_streams' first stream; 900,000 % 16 == 0
OWN = b'"registrationId":%d' % FOLLOWED
RECEIVED = "regstream_redis_messages_received_total"


def server_cpu(pid: int) -> float:
    """On-CPU seconds of the process tree (schedstat, ns): ticks (10 ms) are too coarse here."""
    return procs.cpu(procs.tree(pid))["sched"]


def metric(base: str, token: str, name: str) -> float | None:
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {token}"}).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def instance_cost(
    args: argparse.Namespace, logdir: str, redis_url: str, cluster: bool
) -> dict[str, Any]:
    """(a) µs of instance CPU per update of a partition none of its streams follows."""
    extra = {"REDIS_URL": redis_url, "REDIS_CLUSTER": "true" if cluster else "false",
             "REGSTREAM_PARTITIONS": str(PARTITIONS)}  # fmt: skip
    child, base, env = start_service(args, logdir, 0, extra)
    partitions = PARTITIONS if cluster else 0

    def idle_rate(seconds: float) -> float:
        start, t0 = server_cpu(child.pid), time.monotonic()
        time.sleep(seconds)
        return (server_cpu(child.pid) - start) / (time.monotonic() - t0)

    async def own_updates_arrive(reader: asyncio.StreamReader) -> int:
        await publish(redis_url, 7, FOLLOWED, partitions=partitions)
        seen, buf, end = 0, b"", time.monotonic() + 10
        while seen < 7 and time.monotonic() < end:
            try:
                buf += await asyncio.wait_for(reader.read(65536), end - time.monotonic())
            except TimeoutError:
                break
            seen = buf.count(OWN)
        return seen

    try:
        loop = asyncio.new_event_loop()
        ((reader, writer),) = loop.run_until_complete(open_streams(base, env["_token"], 1))
        time.sleep(2)
        token = env["_token"]
        subscribed = metric(base, token, "regstream_bus_partitions_subscribed")
        idle = idle_rate(args.idle)
        received = metric(base, token, RECEIVED) or 0.0
        before, t0 = server_cpu(child.pid), time.monotonic()
        seconds = loop.run_until_complete(
            publish(redis_url, args.updates, 1_000_000, partitions=partitions,
                    skip=lambda rid: rid % PARTITIONS == FOLLOWED % PARTITIONS)
        )  # fmt: skip
        # the window ends once the instance has taken in all it will get (a loaded machine
        # lags: one Redis, every update; the cluster, none of them), then one more second
        end = time.monotonic() + 60
        while not cluster and time.monotonic() < end:
            if (metric(base, token, RECEIVED) or 0.0) - received >= args.updates:
                break
            time.sleep(0.2)
        time.sleep(1.0)
        spent, window = server_cpu(child.pid) - before, time.monotonic() - t0
        received = (metric(base, token, RECEIVED) or 0.0) - received
        delivered = loop.run_until_complete(own_updates_arrive(reader))
        writer.close()
        loop.close()
        return {
            "us_per_update": round((spent - idle * window) / args.updates * 1e6, 3),
            "busy_us_per_update": round(spent / args.updates * 1e6, 3),
            "idle_cpu_pct": round(idle * 100, 3),
            "window_s": round(window, 2),
            "messages_received": received,
            "publish_updates_per_s": round(args.updates / seconds),
            "partitions_subscribed": subscribed,
            "own_updates_delivered_of_7": delivered,
        }
    finally:
        child.stop()


def node_cpu(cluster: PrivateCluster) -> dict[int, float]:
    return {port: redis_cpu(port) for port in cluster.alive()}


def cluster_redis_cost(
    args: argparse.Namespace, cluster: PrivateCluster,
    cases: tuple[tuple[int, int, int], ...] = (
        (PARTITIONS, 1, 256), (PARTITIONS, 10, 256), (1, 1, 256), (PARTITIONS, 1, 1)),
) -> dict[str, float]:  # fmt: skip
    """(c) Redis CPU per update on the cluster, per case (K partitions, n instances each
    SSUBSCRIBEd to all of them, the most updates per script call). K = 1 (every update to one
    partition, one master, batches as large as on one Redis) tells the cost of the cluster
    itself from that of smaller batches; one update per call is a fleet of many publishers."""
    masters = {node.port for node in cluster.masters()}
    out: dict[str, float] = {}
    before, t0 = node_cpu(cluster), time.monotonic()
    time.sleep(args.idle)  # the nodes' own timers and cluster-bus gossip, no load
    idle = {port: (cpu - before[port]) / (time.monotonic() - t0)
            for port, cpu in node_cpu(cluster).items()}  # fmt: skip
    out["cluster_idle_cpu_pct_all_nodes"] = round(100 * sum(idle.values()), 2)
    first = 2_000_000
    for k, n, batch in cases:
        layout = Layout.cluster(k)
        shards = [(cluster.master_of(p.channel).port, p.channel) for p in layout.partitions]
        subs = Subscribers(0, 0, shards * n)
        try:
            time.sleep(0.3)
            before, t0 = node_cpu(cluster), time.monotonic()
            asyncio.run(publish(cluster.url, args.updates, first, partitions=k, batch_max=batch))
            time.sleep(0.3)
            used = {port: cpu - before[port] for port, cpu in node_cpu(cluster).items()}
            window = time.monotonic() - t0
        finally:
            subs.close()
        first += args.updates
        per = {port: used[port] / args.updates * 1e6 for port in used}
        case = f"{n}_instances" if k == PARTITIONS else f"{n}_instances_{k}_partition"
        case += "_batch_1" if batch == 1 else ""
        out[f"cluster_us_per_update_{case}"] = round(sum(per.values()), 2)
        out[f"cluster_net_us_per_update_{case}"] = round(
            sum(per.values()) - sum(idle.values()) * window / args.updates * 1e6, 2
        )
        out[f"cluster_masters_us_per_update_{case}"] = round(
            sum(v for port, v in per.items() if port in masters), 2
        )
        out[f"cluster_busiest_node_us_per_update_{case}"] = round(max(per.values()), 2)
    return out


def replicated_cost(args: argparse.Namespace, logdir: str) -> dict[str, float]:
    """(c) One Redis with a replica (as a cluster's shard is), 1 subscribing instance: the
    primary's and the replica's CPU per update, to compare with a cluster master's."""
    primary, port = procs.start_redis(logdir, None)
    replica, rport = procs.start_redis(logdir, None)
    try:
        procs.redis_cmd(rport, "REPLICAOF", "127.0.0.1", str(port))
        end = time.monotonic() + 20
        while "master_link_status:up" not in str(procs.redis_cmd(rport, "INFO", "replication")):
            if time.monotonic() > end:
                raise RuntimeError("the replica did not sync within 20 s")
            time.sleep(0.1)
        subs = Subscribers(port, 1)
        out: dict[str, float] = {}
        try:
            for batch, case in ((256, ""), (1, "_batch_1")):
                time.sleep(0.3)
                before = redis_cpu(port), redis_cpu(rport)
                asyncio.run(publish(f"redis://127.0.0.1:{port}/0", args.updates,
                                    10_000_000 * batch, batch_max=batch))  # fmt: skip
                time.sleep(0.3)
                after = redis_cpu(port), redis_cpu(rport)
                for name, i in (("primary", 0), ("replica", 1)):
                    out[f"replicated_{name}_us_per_update_1_subscriber{case}"] = round(
                        (after[i] - before[i]) / args.updates * 1e6, 2
                    )
        finally:
            subs.close()
    finally:
        replica.stop()
        primary.stop()
    return out


def redis_memory(ports: list[int]) -> dict[str, float]:
    """What the bus keeps in Redis (the masters' keys, MEMORY USAGE of each, SCAN): the capped
    histories, the per-registration index lists (they expire) and the seq-check state (a key
    per registration and epoch; up to f590172 a field of the index state hash), in bytes, and
    per registration. MEMORY USAGE leaves out a key's expiry entry and its share of the dicts'
    buckets: ``seq_state_bench.py`` measures those too (``used_memory``)."""
    size = {"history": 0, "index_lists": 0, "seq_state": 0, "other": 0}
    lists = fields = 0
    for port in ports:
        with redis_sync.Redis(port=port, socket_timeout=10) as client:
            for key in client.scan_iter(count=1000):
                name = key.decode()
                used = int(client.memory_usage(key, samples=0) or 0)
                if messages.INDEX_KEY_SUFFIX in name:
                    kind, lists = "index_lists", lists + 1
                elif SEQ_SUFFIX in name:
                    kind, fields = "seq_state", fields + 1
                elif messages.INDEX_SUFFIX in name:
                    kind = "seq_state"
                    fields += sum(1 for f in client.hkeys(key) if f.startswith(b"s"))
                elif name.endswith(messages.HISTORY_SUFFIX):
                    kind = "history"
                else:
                    kind = "other"
                size[kind] += used
    return {
        **{f"{kind}_mib": round(used / 2**20, 2) for kind, used in size.items()},
        "index_lists": lists,
        "index_list_bytes_each": round(size["index_lists"] / lists) if lists else 0,
        "seq_state_registrations": fields,
        "seq_state_bytes_per_registration": round(size["seq_state"] / fields) if fields else 0,
    }


def one_rep(args: argparse.Namespace, logdir: str) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    cluster = PrivateCluster()
    redis, rport = procs.start_redis(logdir, None)
    try:
        cluster.start()
        single = instance_cost(args, logdir, f"redis://127.0.0.1:{rport}/0", cluster=False)
        clustered = instance_cost(args, logdir, cluster.url, cluster=True)
        rec["a_single"], rec["a_cluster"] = single, clustered
        rec["a_ratio"] = round(clustered["us_per_update"] / single["us_per_update"], 4)
        rec["c_single"] = redis_cost(args, logdir, (1, 10))
        rec["c_single"].update(replicated_cost(args, logdir))
        rec["c_cluster"] = cluster_redis_cost(args, cluster)
        rec["memory_single"] = redis_memory([rport])
        rec["memory_cluster"] = redis_memory([node.port for node in cluster.masters()])
    finally:
        redis.stop()
        cluster.stop()
    return rec


def flat(rec: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in rec.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in flat(value).items()})
        elif isinstance(value, int | float) and value is not None:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--updates", type=int, default=40_000)
    ap.add_argument("--idle", type=float, default=3.0, help="seconds of idle CPU measured")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "cluster_bench.jsonl"))
    args = ap.parse_args(argv)
    args.database_url = None  # start_service's: the instance on SQLite
    if not (1000 <= args.updates <= 200_000 and 1 <= args.reps <= 10 and args.idle <= 30):
        ap.error("bounds: 1000 <= updates <= 200000, reps <= 10, idle <= 30")
    # a background job ignores SIGINT: SIGTERM unwinds too, so every process is stopped by PID
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"terminated by {signum}"))
    logdir = tempfile.mkdtemp(prefix="cluster-bench-")
    reps = []
    for _ in range(args.reps):
        rec = one_rep(args, logdir)
        reps.append(rec)
        print(json.dumps(rec), flush=True)
    save(args, reps, [flat(r) for r in reps])
    return 0


if __name__ == "__main__":
    sys.exit(main())
