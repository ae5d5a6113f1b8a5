"""Redis CPU per published update: the publish script at a base revision vs the working tree's.

  .venv/bin/python bench/publish_dedup_bench.py [--base 516ab78] [--reps 7]

Issue 16 made the publish script skip an update whose seq is not above the last one published
for its registration (an HMGET and an HSET of the index state per batch, a string match per
update). This measures what that costs Redis: a private redis-server (``EmbeddedRedis``), the
base revision's ``_PUBLISH_SCRIPT`` (from ``git show <base>:src/regstream/realtime/
publisher.py``, called with the messages only) and the current one (seq, message pairs),
alternated rep by rep, each on a flushed Redis under its own channel: 20,000 stage updates of
2,000 registrations in batches of 256, so every update of a batch is another registration (the
check's worst case: a field read and written per update). Redis's ``used_cpu_sys +
used_cpu_user`` (``INFO cpu``) around each rep, per update; medians and the ratio of medians.
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

N, BATCH, REGISTRATIONS = 20_000, 256, 2_000


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


async def _rep(redis: Redis, script: str, with_seq: bool, channel: str) -> float:
    call = redis.register_script(script)
    keys = [
        channel + ":history", channel + ":epoch", channel + ":history:index:",
        channel + ":history:r:",
    ]  # fmt: skip
    updates = [
        (1 + i // REGISTRATIONS, orjson.dumps({
            "registrationId": 1 + i % REGISTRATIONS, "status": "PENDING", "timestamp": 1,
            "message": "started: t24_lookup", "seq": 1 + i // REGISTRATIONS,
            "stage": "t24_lookup", "stageStatus": "started",
        }))
        for i in range(N)
    ]  # fmt: skip
    before = await _cpu(redis)
    for start in range(0, N, BATCH):
        part = updates[start : start + BATCH]
        args: list[bytes | int] = (
            [a for seq, msg in part for a in (seq, msg)] if with_seq else [m for _, m in part]
        )
        await call(keys=keys, args=["10000", channel, "", 3_600_000, *args])
    return (await _cpu(redis) - before) / N * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="516ab78")
    parser.add_argument("--reps", type=int, default=7)
    options = parser.parse_args()
    variants = {
        "base": (_base_script(options.base), False),
        "now": (publisher._PUBLISH_SCRIPT, True),
    }
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as sock:  # a free loopback port
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        server = EmbeddedRedis(directory=Path(tmp) / "redis", port=port)
        server.start()
        redis = Redis.from_url(server.url)
        results: dict[str, list[float]] = {name: [] for name in variants}
        try:
            for rep in range(options.reps):
                order = list(variants) if rep % 2 == 0 else list(reversed(variants))
                for name in order:
                    script, with_seq = variants[name]
                    await redis.flushall()
                    results[name].append(await _rep(redis, script, with_seq, f"bench{rep}{name}"))
        finally:
            await redis.aclose()
            server.stop()
    for name, values in results.items():
        print(f"{name}: median {statistics.median(values):.2f} us Redis CPU per update, reps "
              + " ".join(f"{v:.2f}" for v in values))  # fmt: skip
    ratio = statistics.median(results["now"]) / statistics.median(results["base"])
    print(
        f"now / base (medians): {ratio:.2f}x; per rep "
        + " ".join(f"{n / b:.2f}" for n, b in zip(results["now"], results["base"], strict=True))
    )


if __name__ == "__main__":
    asyncio.run(main())
