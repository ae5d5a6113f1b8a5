"""The subscription's receive path: instance CPU per received message, a base revision vs now.

  .venv/bin/python bench/broker_bench.py [--base HEAD] [--reps 5] [--count 20000] [--burst 50]

What one instance spends on an update it receives from Redis Pub/Sub (issue 17: every validation
publishes 7, and the instance that published them receives them back): the reply read, the
message parse, the broker's de-duplication and ``Hub.publish``. A private ``redis-server`` on a
free port; per rep and per case, one receiver process per tree (the base revision's ``src`` from
``git archive``, and the working tree's), in alternating order: a real ``Broker`` on uvloop
subscribed to the seed's channel with the service's subscriber client
(``create_subscriber_client``), dispatching to a real ``Hub``. This process publishes
``--count`` stage updates (~300 bytes, increasing event ids) in pipelined bursts of ``--burst``
with a 2 ms pause between bursts, and the receiver reports its own process CPU from subscribed
to the last message dispatched, per message. The publishing side is not counted.

Cases: ``0`` streams (the pipeline's usual instance: nobody follows), ``4`` streams (one
unfiltered, three filtered to registrations in the mix; in-memory streams that count bytes, so
the kernel's writes are not measured). Medians over reps and the ratio of medians (base/now: how
many times less CPU now), with ``python -m timeit`` and the load average around it (noise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
EPOCH = "1700000000000000"
REGISTRATIONS = 10  # updates cycle through registrations 1..10; filtered streams follow 1, 2, 3


def _update(i: int) -> bytes:
    """A stage update as the publish script sends it (``eventId`` last), ~300 bytes."""
    rid, ms = 1 + i % REGISTRATIONS, 1_700_000_000_000 + i
    return orjson.dumps({
        "registrationId": rid, "status": "PENDING", "timestamp": ms, "stage": "t24_lookup",
        "stageStatus": "completed", "message": "T24 customer found",
        "details": {"customerId": f"C{rid:07d}", "accounts": 2, "durationMs": 51, "attempts": 1,
                    "operation": "get_customer"},
        "seq": 1 + i // REGISTRATIONS, "eventId": f"{EPOCH}_{ms}-0",
    })  # fmt: skip


def _resp(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%b\r\n" % (len(a), a))
    return b"".join(out)


# --------------------------------------------------------------------------- receiver process


async def _receive(port: int, count: int, streams: int, timeout: float) -> dict[str, float]:
    from redis.asyncio import Redis

    from regstream.realtime.broker import Broker
    from regstream.realtime.connections import create_subscriber_client
    from regstream.realtime.hub import Hub, Stream

    class NullStream(Stream):
        def __init__(self, rid: int | None) -> None:
            super().__init__(rid)
            self.bytes = 0

        def write(self, frame: bytes, chunk: bytes) -> None:
            self.bytes += len(chunk)

        def buffered(self) -> int:
            return 0

    url = f"redis://127.0.0.1:{port}"
    commands = Redis.from_url(url)
    hub = Hub()
    attached = [NullStream(None), NullStream(1), NullStream(2), NullStream(3)][:streams]
    for stream in attached:
        hub.attach(stream)
        stream.go_live()
    broker = Broker(
        subscriber=lambda: create_subscriber_client(url, name="bench-sub"),
        commands=commands, on_update=hub.publish, probe_interval=600.0,
    )  # fmt: skip
    task = asyncio.create_task(broker.run())
    try:
        await asyncio.wait_for(broker.connected.wait(), 10)
        cpu0 = time.process_time()
        print("ready", flush=True)
        end = time.monotonic() + timeout
        while broker.received < count and time.monotonic() < end:
            await asyncio.sleep(0.02)
        cpu = time.process_time() - cpu0
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        await commands.aclose()
    written = sum(s.bytes for s in attached)
    return {"received": broker.received, "us_per_msg": cpu / max(1, broker.received) * 1e6,
            "bytes_written": written}  # fmt: skip


def receiver_main(options: argparse.Namespace) -> None:
    import uvloop

    result = uvloop.run(_receive(options.port, options.count, options.streams, options.timeout))
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- orchestration


def _publish(port: int, count: int, burst: int) -> None:
    channel = b"service:registration-updates"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for start in range(0, count, burst):
            n = min(burst, count - start)
            sock.sendall(b"".join(_resp(b"PUBLISH", channel, _update(i))
                                  for i in range(start, start + n)))  # fmt: skip
            got = b""
            while got.count(b"\r\n") < n:  # one integer reply per PUBLISH
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("redis closed the connection")
                got += chunk
            time.sleep(0.002)


def _one(src: Path, port: int, options: argparse.Namespace, streams: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    argv = [sys.executable, __file__, "--receive", "--port", str(port), "--count",
            str(options.count), "--streams", str(streams)]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"receiver did not start: {line!r}")
        _publish(port, options.count, options.burst)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    result = json.loads(out.strip().splitlines()[-1])
    if result["received"] != options.count:
        raise RuntimeError(f"{src}: received {result['received']} of {options.count}")
    return float(result["us_per_msg"])


def _redis(tmp: str) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", tmp, "--loglevel", "warning"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare with")
    parser.add_argument("--now", default=str(ROOT / "src"), help="the tree to compare (its src)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--cases", default="0,4", help="stream counts, comma-separated (0-4)")
    parser.add_argument("--receive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.receive:
        receiver_main(options)
        return
    noise = subprocess.run([sys.executable, "-m", "timeit", "[i for i in range(10)]"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    print(f"timeit: {noise}; load average {os.getloadavg()}")
    cases = [int(c) for c in options.cases.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", options.base, "src"], cwd=ROOT,
                                 check=True, capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        trees = {"base": Path(tmp) / "src", "now": Path(options.now)}
        redis, port = _redis(tmp)
        results: dict[tuple[str, int], list[float]] = {(t, c): [] for t in trees for c in cases}
        try:
            for rep in range(options.reps):
                order = list(trees) if rep % 2 == 0 else list(reversed(trees))
                for case in cases:
                    for name in order:
                        results[name, case].append(_one(trees[name], port, options, case))
                print(
                    f"rep {rep}: "
                    + ", ".join(f"{n}/{c} {v[-1]:.1f}" for (n, c), v in results.items()),
                    flush=True,
                )
        finally:
            redis.terminate()
            redis.wait(10)
    print(f"base = {options.base}; us of receiver CPU per message, bursts of {options.burst}")
    for case in cases:
        base, now = results["base", case], results["now", case]
        ratios = " ".join(f"{b / n:.2f}" for b, n in zip(base, now, strict=True))
        print(
            f"{case} streams: base median {statistics.median(base):.1f} "
            f"({' '.join(f'{v:.1f}' for v in base)}), now median {statistics.median(now):.1f} "
            f"({' '.join(f'{v:.1f}' for v in now)}); base/now "
            f"{statistics.median(base) / statistics.median(now):.2f}x (per rep {ratios})"
        )
    print(f"timeit: {noise}; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
