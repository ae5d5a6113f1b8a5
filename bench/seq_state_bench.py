"""The seq check's state: Redis CPU per update and memory per registration, base vs working tree.

  .venv/bin/python bench/seq_state_bench.py [--base f590172] [--reps 5]

The publish script keeps the last seq published per registration (issue 16). Up to f590172 it
was a field of the index state hash (HMGET and one HSET per batch), renewed by every batch and
so never trimmed (issue 18); now it is a key per registration with a TTL (MGET per batch, a
``SET … PX`` per registration published). This measures both scripts on a private redis-server
(``EmbeddedRedis``), the base's ``_PUBLISH_SCRIPT`` from ``git show <base>:src/regstream/
realtime/publisher.py``, alternated rep by rep on a flushed Redis:

- CPU: 20,000 stage updates of 2,000 registrations (10 each) in calls of 256 (every update of
  a call another registration: the check's worst case) and 2,000 updates in calls of 1 (a
  fleet's publishers send small calls: docs/capacity.md); Redis's ``used_cpu_sys +
  used_cpu_user`` around each, per update; medians and the ratio of medians.
- memory: 20,000 registrations published once (calls of 256), then the history and the index
  lists deleted: ``used_memory`` over that of the flushed Redis, per registration (the key or
  field, its share of the dict's buckets and, for keys, the expiry's entry), under the names of
  one Redis and of a cluster's partition 3 of 16 (a hash tag: longer keys).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from regstream.realtime import publisher  # noqa: E402
from regstream.realtime.embedded import EmbeddedRedis  # noqa: E402
from regstream.realtime.partitions import Layout, Partition  # noqa: E402

CASES = {"calls_of_256": (20_000, 256, 2_000), "calls_of_1": (2_000, 1, 2_000)}
MEMORY_REGISTRATIONS = 20_000
NAMES = {"single": Layout.single().partitions[0], "cluster": Layout.cluster(16).partitions[3]}


def _base_script(rev: str) -> str:
    source = subprocess.run(
        ["git", "show", f"{rev}:src/regstream/realtime/publisher.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    namespace: dict[str, object] = {"__name__": "base_publisher"}
    exec(compile(source, f"{rev}:publisher.py", "exec"), namespace)  # noqa: S102
    script = namespace["_PUBLISH_SCRIPT"]
    assert isinstance(script, str)
    return script


async def _cpu(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _updates(n: int, registrations: int) -> list[tuple[int, bytes]]:
    return [
        (1 + i // registrations, orjson.dumps({
            "registrationId": 1 + i % registrations, "status": "PENDING", "timestamp": 1,
            "message": "started: t24_lookup", "seq": 1 + i // registrations,
            "stage": "t24_lookup", "stageStatus": "started",
        }))
        for i in range(n)
    ]  # fmt: skip


async def _publish(
    redis: Redis, script: str, updates: list[tuple[int, bytes]], batch: int, part: Partition
) -> None:
    call = redis.register_script(script)
    # the base's script reads its first five keys; the current one all seven
    keys = [part.history_key, part.epoch_key, part.index_state_prefix, part.index_key_prefix,
            part.primary_key, part.seq_key_prefix, part.legacy_state_prefix]  # fmt: skip
    for start in range(0, len(updates), batch):
        args = [a for seq, msg in updates[start : start + batch] for a in (seq, msg)]
        await call(keys=keys, args=["10000", part.channel, "", 3_600_000, b"", "", *args])


async def _memory(redis: Redis, script: str, part: Partition) -> float:
    await redis.flushall()
    before = int((await redis.info("memory"))["used_memory"])
    updates = _updates(MEMORY_REGISTRATIONS, MEMORY_REGISTRATIONS)
    await _publish(redis, script, updates, 256, part)
    await redis.delete(part.history_key)
    async for key in redis.scan_iter(match=part.index_key_prefix + "*", count=1000):
        await redis.delete(key)
    after = int((await redis.info("memory"))["used_memory"])
    return (after - before) / MEMORY_REGISTRATIONS


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="f590172")
    parser.add_argument("--reps", type=int, default=5)
    options = parser.parse_args()
    variants = {"base": _base_script(options.base), "now": publisher._PUBLISH_SCRIPT}
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as sock:  # a free loopback port
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        server = EmbeddedRedis(directory=Path(tmp) / "redis", port=port)
        server.start()
        redis = Redis.from_url(server.url)
        cpu: dict[tuple[str, str], list[float]] = {}
        memory: dict[str, list[float]] = {}
        try:
            for rep in range(options.reps):
                order = list(variants) if rep % 2 == 0 else list(reversed(variants))
                for case, (n, batch, registrations) in CASES.items():
                    for name in order:
                        await redis.flushall()
                        updates = _updates(n, registrations)
                        before = await _cpu(redis)
                        await _publish(redis, variants[name], updates, batch, NAMES["single"])
                        used = (await _cpu(redis) - before) / n * 1e6
                        cpu.setdefault((case, name), []).append(used)
                for names, part in NAMES.items():
                    for name in order:
                        used = await _memory(redis, variants[name], part)
                        memory.setdefault(f"{names} {name}", []).append(used)
        finally:
            await redis.aclose()
            server.stop()
    for case in CASES:
        for name in variants:
            values = cpu[(case, name)]
            print(f"{case} {name}: median {statistics.median(values):.2f} us Redis CPU per "
                  "update, reps " + " ".join(f"{v:.2f}" for v in values))  # fmt: skip
        now, base = cpu[(case, "now")], cpu[(case, "base")]
        print(f"{case} now / base (medians): {statistics.median(now) / statistics.median(base):.2f}x"
              "; per rep " + " ".join(f"{n / b:.2f}" for n, b in zip(now, base, strict=True)))  # fmt: skip
    for name, values in memory.items():
        print(f"memory {name}: median {statistics.median(values):.1f} B per registration, reps "
              + " ".join(f"{v:.1f}" for v in values))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
