"""Drain benchmark (issue 15, item 6): how one instance's streams come back to the fleet when it is
restarted.

  .venv/bin/python bench/drain_bench.py [-n 2000] [--reps 3]

Starts a private redis-server and the T24 simulator (CPU 1), then, per rep and configuration
(interleaved), one `regstream serve` (SQLite, CPU 0) with -n open streams (raw sockets in one
asyncio loop, CPU 1). Sends it SIGTERM and records, for each stream, when its end arrived and the
`retry:` hint it got last: a browser's EventSource reconnects that long after the end, so
end + hint is when the stream comes back to the rest of the fleet. Two configurations:

  at-once   REGSTREAM_DRAIN_DELAY=0 REGSTREAM_DRAIN_SPREAD=0 SSE_RETRY_MS=1000: the shape of the
            shutdown before the drain phases (every stream closed at once, `retry: 1000`; the hint
            is now jittered +-50 % whatever the settings, so this baseline already spreads a little)
  spread    REGSTREAM_DRAIN_SPREAD=--spread (5) SSE_RETRY_MS=--retry-ms (5000), the defaults
            (REGSTREAM_DRAIN_DELAY=--delay, 1 s here: the delay shifts the closes, it does not
            shape them)

Reports per configuration, medians over --reps: the window of the closes (first to last end seen),
the most reconnections in any 1 s and any 100 ms (as counts and as a share of -n), and the time
from SIGTERM to the process's exit. Appends one JSON line to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import uuid

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import procs  # noqa: E402
from pipeline_bench import admin_token  # noqa: E402

STREAM = "/api/registrations/updates/stream"
RETRY = re.compile(rb"^retry: ?(\d+)$", re.M)


async def _follow(
    port: int, auth: str, opened: asyncio.Event, out: list[tuple[float, int]]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {STREAM} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    tail = b""
    connected = False
    try:
        while chunk := await reader.read(65536):
            tail = (tail + chunk)[-4096:]
            if not connected and b'"connected"' in tail:
                connected = True
                opened.set()
    finally:
        writer.close()
    hints = RETRY.findall(tail)
    out.append((time.monotonic(), int(hints[-1]) if hints else -1))


def _peak(times: list[float], window: float) -> int:
    """The most events in any window of `window` seconds (two pointers over the sorted times)."""
    times, best, start = sorted(times), 0, 0
    for end, t in enumerate(times):
        while t - times[start] > window:
            start += 1
        best = max(best, end - start + 1)
    return best


async def _one(args: argparse.Namespace, port: int, auth: str, server: procs.Child) -> dict:
    ends: list[tuple[float, int]] = []
    events = [asyncio.Event() for _ in range(args.n)]
    tasks = []
    for k in range(0, args.n, 200):  # open in slices: the accept backlog is finite
        batch = [asyncio.create_task(_follow(port, auth, e, ends)) for e in events[k : k + 200]]
        tasks += batch
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events[k : k + 200])), 60)
    signalled = time.monotonic()
    os.kill(server.pid, signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), args.timeout)
    deadline = time.monotonic() + args.timeout
    while server.p.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    exited = time.monotonic() - signalled if server.p.poll() is not None else None
    closes = [t for t, _ in ends]
    back = [t + hint / 1000 for t, hint in ends if hint >= 0]
    return {
        "streams": len(ends),
        "without_hint": sum(hint < 0 for _, hint in ends),
        "close_window_s": round(max(closes) - min(closes), 3),
        "first_close_after_s": round(min(closes) - signalled, 3),
        "peak_reconnects_1s": _peak(back, 1.0),
        "peak_reconnects_100ms": _peak(back, 0.1),
        "exit_after_s": round(exited, 3) if exited is not None else None,
    }


def _serve(args: argparse.Namespace, logdir: str, env: dict[str, str], extra: dict[str, str],
           exe: str, name: str) -> tuple[procs.Child, int]:  # fmt: skip
    port = procs.free_port()
    server = procs.Child(
        name, [exe, "serve", "--host", "127.0.0.1", "--port", str(port)],
        {0} if args.pin else None, logdir, env={**env, **extra},
    )  # fmt: skip
    procs.wait_port(port, server, 60)
    return server, port


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="open streams per instance")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--delay", type=float, default=1.0)
    ap.add_argument("--spread", type=float, default=5.0)
    ap.add_argument("--retry-ms", type=int, default=5000)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--no-pin", dest="pin", action="store_false")
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "drain_bench.jsonl"))
    args = ap.parse_args(argv)
    if not (1 <= args.n <= 10_000 and 1 <= args.reps <= 20):
        ap.error("bounds: n 1..10000, reps 1..20")
    procs.raise_nofile()
    if args.pin:
        os.sched_setaffinity(0, {1})
    configs = {
        "at-once": {"REGSTREAM_DRAIN_DELAY": "0", "REGSTREAM_DRAIN_SPREAD": "0",
                    "SSE_RETRY_MS": "1000"},
        "spread": {"REGSTREAM_DRAIN_DELAY": str(args.delay),
                   "REGSTREAM_DRAIN_SPREAD": str(args.spread), "SSE_RETRY_MS": str(args.retry_ms)},
    }  # fmt: skip
    rec: dict = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(args), "runs": {}}
    children: list[procs.Child] = []
    try:
        logdir = tempfile.mkdtemp(prefix="drain-bench-")
        redis, rport = procs.start_redis(logdir, {1} if args.pin else None)
        children.append(redis)
        exe = os.path.join(os.path.dirname(sys.executable), "regstream")
        sport = procs.free_port()
        sim = procs.Child("t24-sim", [exe, "t24-sim", "--port", str(sport)],
                          {1} if args.pin else None, logdir)  # fmt: skip
        children.append(sim)
        procs.wait_port(sport, sim, 30)
        env = {
            "REDIS_URL": f"redis://127.0.0.1:{rport}/0",
            "REGSTREAM_DATA_DIR": os.path.join(logdir, "data"),
            "T24_BASE_URL": f"http://127.0.0.1:{sport}/api/v1.0.0",
            "REGSTREAM_SECRET_KEY": uuid.uuid4().hex + uuid.uuid4().hex,
            "REGSTREAM_STREAMS_PER_USER": str(args.n + 100),
            "SSE_MAX_STREAMS": str(args.n + 100),
        }
        os.makedirs(env["REGSTREAM_DATA_DIR"])
        auth = "Bearer " + admin_token(exe, env, logdir)
        for rep in range(args.reps):
            for name, extra in configs.items():
                server, port = _serve(args, logdir, env, extra, exe, f"regstream-{name}-{rep}")
                children.append(server)
                result = asyncio.run(_one(args, port, auth, server))
                server.stop()
                children.remove(server)
                rec["runs"].setdefault(name, []).append(result)
                print(name, rep, json.dumps(result), flush=True)
        rec["medians"] = {
            name: {key: statistics.median(r[key] for r in runs if r[key] is not None)
                   for key in runs[0] if any(r[key] is not None for r in runs)}
            for name, runs in rec["runs"].items()
        }  # fmt: skip
        lost = [r for runs in rec["runs"].values() for r in runs if r["streams"] != args.n]
        if lost or any(r["without_hint"] for runs in rec["runs"].values() for r in runs):
            rec["error"] = "a stream ended without its hint, or did not end"
    except Exception as e:  # noqa: BLE001 - reported, recorded, non-zero exit
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        for child in reversed(children):
            child.stop()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    print(json.dumps(rec.get("medians", {}), indent=1))
    if "error" in rec:
        print(f"error: {rec['error']}", file=sys.stderr)
    return 1 if "error" in rec else 0


if __name__ == "__main__":
    sys.exit(main())
