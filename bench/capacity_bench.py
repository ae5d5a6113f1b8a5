"""Per-process figures for the capacity model (docs/capacity.md; issue 15 item 10).

Measures, on this machine, each against real processes on loopback:

1. **Redis CPU per published update** with 1, 10 and 50 subscribing instances (each a connection
   SUBSCRIBEd to the channel that reads everything, as an instance's subscription does), publishing
   through the service's own publisher (its Lua script: history entry, index, PUBLISH). Redis's
   own CPU counters (INFO cpu) before and after, divided by the updates published.
2. **Instance CPU to receive an update no local stream wants**: a `regstream serve` with no
   streams while the bench publishes; the server's CPU (/proc) minus its idle rate over the same
   time, per update.
3. **Memory per open stream**: RSS of `regstream serve` before and after opening idle streams
   (filtered, the common case), per stream.
4. **PostgreSQL connections per instance**: the most `pg_stat_activity` rows of the service's
   database seen during a bulk validation, and at rest (with `--database-url`).

CPU per delivery is the SSE bench's (bench/sse_bench.py, bench/RESULTS.md): it is not repeated.

    .venv/bin/python bench/capacity_bench.py [--updates 20000] [--streams 2000]
        [--database-url postgresql+asyncpg://postgres@127.0.0.1/capacity] [--reps 3]

Medians over --reps; each rep's figures are kept in bench/results/capacity_bench.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import procs  # noqa: E402
from pipeline_bench import admin_token  # noqa: E402

CHANNEL = "service:registration-updates"
STREAM_PATH = "/api/registrations/updates/stream"


# --------------------------------------------------------------------------- subscribers


class Subscribers:
    """``n`` connections SUBSCRIBEd to the channel, read (and discarded) by one thread; or, with
    ``shards``, a connection per (node port, shard channel) SSUBSCRIBEd to it (a cluster)."""

    def __init__(self, port: int, n: int, shards: list[tuple[int, str]] | None = None) -> None:
        self.socks: list[socket.socket] = []
        self.sel = selectors.DefaultSelector()
        self.received = 0
        self._stop = threading.Event()
        conns = [(port, "SUBSCRIBE", CHANNEL)] * n if shards is None else [
            (node, "SSUBSCRIBE", channel) for node, channel in shards
        ]  # fmt: skip
        for node, verb, channel in conns:
            s = socket.create_connection(("127.0.0.1", node))
            s.sendall(procs.resp(verb, channel))
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ)
            self.socks.append(s)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.sel.select(0.2):
                with contextlib.suppress(BlockingIOError):
                    self.received += len(key.fileobj.recv(1 << 20))  # type: ignore[union-attr]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        for s in self.socks:
            s.close()


def redis_cpu(port: int) -> float:
    info = str(procs.redis_cmd(port, "INFO", "cpu"))
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


def service_publisher(
    redis_url: str, partitions: int, outbox_max: int, batch_max: int = 256
) -> tuple[Any, Any]:
    """The service's publisher (its Lua script, ids, history) and its client, as ``serve`` makes
    them: ``partitions`` > 0 means the URL names a node of a Redis Cluster and the bus has that
    many partitions (SPUBLISH, one script call per partition per batch)."""
    from dataclasses import replace

    from regstream.realtime.connections import RedisTarget, create_client
    from regstream.realtime.partitions import Layout
    from regstream.realtime.publisher import RegistrationPubSub

    target = replace(RedisTarget.from_url(redis_url), cluster=partitions > 0)
    redis = create_client(target, name="bench-publisher", max_connections=max(8, partitions + 4))
    layout = Layout.cluster(partitions) if partitions else None
    return redis, RegistrationPubSub(redis, layout=layout, outbox_max=outbox_max,
                                     batch_max=batch_max)  # fmt: skip


async def publish(
    redis_url: str, updates: int, first_id: int, *, partitions: int = 0,
    skip: Callable[[int], bool] | None = None, batch_max: int = 256,
) -> float:  # fmt: skip
    """Publish ``updates`` stage updates (``updates // 7`` registrations, 7 each, as a validation
    does) through the service's publisher; returns the seconds it took. ``partitions`` > 0: the
    URL names a node of a Redis Cluster, the bus has that many partitions (the service's layout
    and pool size); registrations for which ``skip(id)`` is true are left out; ``batch_max``:
    the most updates per script call (the service's 256; 1 is a fleet of many publishers)."""
    from regstream.realtime import messages

    redis, publisher = service_publisher(redis_url, partitions, max(20_000, 2 * updates),
                                         batch_max)  # fmt: skip
    started = time.perf_counter()
    try:
        sent = 0
        rid = first_id
        while sent < updates:
            if skip is not None and skip(rid):
                rid += 1
                continue
            for seq in range(1, 8):
                publisher.enqueue_update(
                    messages.stage_update(
                        rid, "t24_lookup", "completed", "Found 2 accounts", seq=seq,
                        timestamp=messages.now_ms(), details={"accountsFound": 2},
                    )
                )  # fmt: skip
                sent += 1
            rid += 1
            if sent % 2048 < 7:
                await asyncio.sleep(0)  # let the flusher run, as the pipeline does
        if not await publisher.wait_flushed(120):
            raise RuntimeError("publisher did not flush within 120 s")
        return time.perf_counter() - started
    finally:
        await publisher.aclose()
        await redis.aclose()


def redis_cost(
    args: argparse.Namespace, logdir: str, counts: tuple[int, ...] = (1, 10, 50)
) -> dict[str, float]:
    """Redis µs of CPU per published update, by number of subscribing instances."""
    out: dict[str, float] = {}
    for n in counts:
        redis, port = procs.start_redis(logdir, None)
        subs = Subscribers(port, n)
        try:
            time.sleep(0.3)
            before = redis_cpu(port)
            asyncio.run(publish(f"redis://127.0.0.1:{port}/0", args.updates, 1))
            time.sleep(0.3)
            out[f"redis_us_per_update_{n}_subscribers"] = round(
                (redis_cpu(port) - before) / args.updates * 1e6, 2
            )
        finally:
            subs.close()
            redis.stop()
    return out


# --------------------------------------------------------------------------- the service


def start_service(
    args: argparse.Namespace, logdir: str, rport: int, extra: dict[str, str] | None = None
) -> tuple[procs.Child, str, dict[str, str]]:
    exe = os.path.join(os.path.dirname(sys.executable), "regstream")
    data_dir = tempfile.mkdtemp(prefix="data-", dir=logdir)
    env = {
        "REDIS_URL": f"redis://127.0.0.1:{rport}/0",
        "REGSTREAM_DATA_DIR": data_dir,
        "T24_SIM_LATENCY_MS": "0",
        "REGSTREAM_STREAMS_PER_USER": "100000",
        "REGSTREAM_PROCESS_RATE_PER_MINUTE": "100000",
        **(extra or {}),
    }
    if args.database_url and extra is not None and "DATABASE_URL" in extra:
        env["REGSTREAM_SECRET_KEY"] = secrets.token_hex(32)
    port = procs.free_port()
    child = procs.Child(
        f"regstream-{port}", [exe, "serve", "--host", "127.0.0.1", "--port", str(port)],
        None, logdir, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                break
        if child.p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("regstream did not become ready:\n" + child.tail())
        time.sleep(0.2)
    env["_token"] = admin_token(exe, env, logdir)
    return child, base, env


def server_cpu(pid: int) -> float:
    c = procs.cpu(procs.tree(pid))
    return c["user"] + c["sys"]


def receive_cost(args: argparse.Namespace, logdir: str) -> dict[str, float]:
    """µs of instance CPU per update that no stream of the instance wants."""
    redis, rport = procs.start_redis(logdir, None)
    child = None
    try:
        child, _base, _env = start_service(args, logdir, rport)
        # the embedded T24 simulator is a child of serve: measure serve's own process only
        time.sleep(2)
        idle_from, t0 = server_cpu(child.pid), time.monotonic()
        time.sleep(3)
        idle_rate = (server_cpu(child.pid) - idle_from) / (time.monotonic() - t0)
        before, t0 = server_cpu(child.pid), time.monotonic()
        asyncio.run(publish(f"redis://127.0.0.1:{rport}/0", args.updates, 10_000_000))
        time.sleep(1.0)  # the subscription drains what is in flight
        spent = server_cpu(child.pid) - before - idle_rate * (time.monotonic() - t0)
        return {
            "instance_us_per_unwanted_update": round(spent / args.updates * 1e6, 2),
            "instance_idle_cpu_pct": round(idle_rate * 100, 2),
        }
    finally:
        if child is not None:
            child.stop()
        redis.stop()


async def open_streams(
    base: str, token: str, n: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``n`` idle filtered streams (a registration that does not exist yet: no snapshot), stream
    i following registration 900,000 + i (900,000 % 16 == 0: partition 0 of 16)."""
    host, port = base.removeprefix("http://").split(":")
    opened = []
    for i in range(n):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"GET {STREAM_PATH}?registrationId={900_000 + i} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"stream {i} refused: {head[:80]!r}")
        await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)  # connected
        opened.append((reader, writer))
    return opened


def memory_cost(args: argparse.Namespace, logdir: str) -> dict[str, float]:
    redis, rport = procs.start_redis(logdir, None)
    child = None
    try:
        child, base, env = start_service(args, logdir, rport)
        procs.raise_nofile()

        async def measure() -> float:
            await asyncio.sleep(1)
            before = procs.rss_kib([child.pid])
            opened = await open_streams(base, env["_token"], args.streams)
            await asyncio.sleep(2)
            after = procs.rss_kib([child.pid])
            for _, w in opened:
                w.close()
            return float((after - before) / args.streams)

        return {"kib_per_idle_stream": round(asyncio.run(measure()), 2)}
    finally:
        if child is not None:
            child.stop()
        redis.stop()


def postgres_connections(args: argparse.Namespace, logdir: str) -> dict[str, int]:
    import asyncpg

    admin = args.database_url.replace("+asyncpg", "").rsplit("/", 1)[0] + "/postgres"
    name = f"capacity_{secrets.token_hex(4)}"

    async def pg(sql: str) -> Any:
        conn = await asyncpg.connect(admin)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    asyncio.run(pg(f'CREATE DATABASE "{name}"'))
    url = args.database_url.rsplit("/", 1)[0] + "/" + name
    redis, rport = procs.start_redis(logdir, None)
    child = None
    count = f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}'"
    try:
        child, base, env = start_service(args, logdir, rport, {"DATABASE_URL": url})
        at_rest = asyncio.run(pg(count))
        headers = {"Authorization": f"Bearer {env['_token']}"}
        most = at_rest
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            ids = []
            for i in range(args.validations):
                body = {
                    "customerNumber": "100100", "firstName": "Amani", "lastName": "Otieno",
                    "dateOfBirth": "1988-04-02", "nationalId": f"CAP{i:08d}",
                    "phone": f"+2547{i:08d}", "email": f"c{i}@example.com",
                }  # fmt: skip
                ids.append(client.post("/api/registrations", json=body).json()["id"])
            for start in range(0, len(ids), 500):
                client.post("/api/registrations/process",
                            json={"registrationIds": ids[start:start + 500]})  # fmt: skip
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                most = max(most, asyncio.run(pg(count)))
                page = client.get("/api/registrations", params={"status": "PENDING"}).json()
                if page["total"] == 0:
                    break
                time.sleep(0.1)
        return {"pg_connections_at_rest": at_rest, "pg_connections_most_under_bulk": most}
    finally:
        if child is not None:
            child.stop()
        redis.stop()
        with contextlib.suppress(Exception):
            asyncio.run(pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--updates", type=int, default=20_000)
    ap.add_argument("--streams", type=int, default=2_000)
    ap.add_argument("--validations", type=int, default=1_000)
    ap.add_argument("--database-url", help="PostgreSQL for the connection count (skipped without)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "capacity_bench.jsonl"))
    args = ap.parse_args(argv)
    if not (1000 <= args.updates <= 200_000 and 1 <= args.streams <= 15_000 and args.reps <= 10):
        ap.error("bounds: 1000 <= updates <= 200000, streams <= 15000, reps <= 10")
    logdir = tempfile.mkdtemp(prefix="capacity-bench-")
    reps: list[dict[str, float]] = []
    for _ in range(args.reps):
        rec: dict[str, float] = {}
        rec.update(redis_cost(args, logdir))
        rec.update(receive_cost(args, logdir))
        rec.update(memory_cost(args, logdir))
        if args.database_url:
            rec.update(postgres_connections(args, logdir))
        reps.append(rec)
        print(json.dumps(rec), flush=True)
    save(args, reps, reps)
    return 0


def save(args: argparse.Namespace, reps: list[Any], figures: list[dict[str, float]]) -> None:
    """Median of each figure over the reps: printed, and appended with every rep to --out."""
    median = {k: statistics.median(r[k] for r in figures) for k in figures[0]}
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(args), "reps": reps,
              "median": median}  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps({"median": median}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
