"""Resume herd benchmark (issue 15, item 5): 2,000 resumes at once on one instance during a bulk.

  .venv/bin/python bench/resume_bench.py [--resumes 2000] [--database-url postgresql+asyncpg://…]

Starts a private redis-server and the T24 simulator (CPU 1), a fresh PostgreSQL database (dropped
at the end; SQLite with --sqlite) and `regstream serve` (CPU 0). Validates --static registrations
first (their updates fill the history, read back with their event ids by an unfiltered stream),
then starts a bulk validation of --bulk others and, at the same moment, opens --resumes streams
at once with a Last-Event-ID, like a neighbour's drain sends them:

  half filtered, resuming after one of their registration's updates (expected: exactly its later
  updates), a quarter unfiltered after an update of the history (expected: exactly the static
  updates after it, then live ones), a quarter with an id of another epoch (expected: one
  snapshot frame). Each client behaves like EventSource: `Accept: text/event-stream`; an answer
  without `connected` that ends after a `retry:` hint is a deferral, retried after that delay.

Reports, over the herd: /readyz status codes (polled every 100 ms; must all be 200), subscription
rebuilds (`regstream_redis_reconnects_total{connection="subscriber"}` before/after; must be 0),
how each resume ended (replay, snapshot, each after how many deferrals; `lost` = anything else:
a wrong or missing update, a duplicate, no end within --timeout), start-up latency percentiles,
the server's CPU. Then, in this process against the same Redis and its full history, the instance
CPU (and Redis CPU) of one filtered resume's history read: the path before this change
(`History.since` of the whole history, parsed, filtered) against the index (`History.since_for`),
interleaved over --reps, medians and the ratio. Appends one JSON line to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import httpx  # noqa: E402
import procs  # noqa: E402
from pipeline_bench import admin_token, applicant  # noqa: E402

from regstream.realtime import messages  # noqa: E402
from regstream.realtime.connections import create_client  # noqa: E402
from regstream.realtime.history import History  # noqa: E402
from regstream.realtime.messages import parse_resume_id  # noqa: E402

STREAM = "/api/registrations/updates/stream"
DATA = re.compile(rb"^data: ?(.*)$", re.M)
EVENT_ID = re.compile(rb"^id: ?(.*)$", re.M)
RETRY = re.compile(rb"^retry: ?(\d+)$", re.M)
PG_ADMIN = os.environ.get("TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass
class Resume:
    rid: int | None  # None: unfiltered
    last_id: str
    expected: list[tuple[int, int]]  # (registrationId, seq) the replay must be, exactly
    snapshot: bool
    deferred: int = 0
    outcome: str = "pending"
    why: str = ""
    started: float = 0.0
    ended: float = 0.0
    frames: list[dict[str, Any]] = field(default_factory=list)


class Follower:
    """The unfiltered stream: every update's (registrationId, seq) -> event id, and finals."""

    def __init__(self) -> None:
        self.ids: dict[tuple[int, int], str] = {}
        self.order: list[tuple[int, int]] = []
        self.finals: set[int] = set()
        self.connected = asyncio.Event()

    async def run(self, host: str, port: int, auth: str) -> None:
        r, w = await asyncio.open_connection(host, port)
        w.write(f"GET {STREAM} HTTP/1.1\r\nHost: b\r\nAuthorization: {auth}\r\n\r\n".encode())
        await r.readuntil(b"\r\n\r\n")
        buf = b""
        try:
            while chunk := await r.read(1 << 16):
                buf += chunk
                blocks = buf.split(b"\n\n")
                buf = blocks.pop()
                for block in blocks:
                    for raw in DATA.findall(block):
                        frame = json.loads(raw)
                        if frame.get("type") == "connected":
                            self.connected.set()
                        if frame.get("type") != "update":
                            continue
                        d = frame["data"]
                        key = (d["registrationId"], d["seq"])
                        self.ids[key] = d["eventId"]
                        self.order.append(key)
                        if d.get("final"):
                            self.finals.add(d["registrationId"])
        finally:
            w.close()


async def resume(host: str, port: int, auth: str, res: Resume, deadline: float) -> None:
    query = f"?registrationId={res.rid}" if res.rid is not None else ""
    request = (
        f"GET {STREAM}{query} HTTP/1.1\r\nHost: b\r\nAuthorization: {auth}\r\n"
        f"Accept: text/event-stream\r\nLast-Event-ID: {res.last_id}\r\n\r\n"
    ).encode()
    res.started = time.monotonic()
    try:
        while time.monotonic() < deadline:
            r, w = await asyncio.open_connection(host, port)
            try:
                w.write(request)
                left = deadline - time.monotonic()
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), left)
                status = int(head[9:12])
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if length is not None:  # not a stream: a deferral (200 + retry:) or an error
                    body = await asyncio.wait_for(r.readexactly(int(length.group(1))), left)
                    hint = RETRY.search(body)
                    if status == 200 and hint is not None and b"connected" not in body:
                        res.deferred += 1
                        await asyncio.sleep(int(hint.group(1)) / 1000)
                        continue
                    res.outcome, res.why = "lost", f"{status} {body[:120]!r}"
                    return
                buf = b""
                while not done(res):
                    chunk = await asyncio.wait_for(r.read(1 << 16), deadline - time.monotonic())
                    if not chunk:
                        res.outcome, res.why = "lost", "stream ended before its start-up"
                        return
                    buf += chunk
                    blocks = buf.split(b"\n\n")
                    buf = blocks.pop()
                    for block in blocks:
                        res.frames.extend(json.loads(raw) for raw in DATA.findall(block))
                res.ended = time.monotonic()
                res.outcome, res.why = judge(res)
                return
            finally:
                w.close()
        res.outcome, res.why = "unfinished", "still deferred at the deadline"
    except TimeoutError:
        res.outcome, res.why = "unfinished", "no end before the deadline"
    except (OSError, asyncio.IncompleteReadError) as e:
        res.outcome, res.why = "lost", type(e).__name__


def done(res: Resume) -> bool:
    if res.snapshot:
        return any(f.get("type") == "snapshot" for f in res.frames)
    wanted = {rid for rid, _ in res.expected}
    n = sum(
        1 for f in res.frames
        if f.get("type") == "update" and f["data"]["registrationId"] in wanted
    )  # fmt: skip
    return n >= len(res.expected)


def judge(res: Resume) -> tuple[str, str]:
    if not res.frames or res.frames[0].get("type") != "connected":
        return "lost", "no connected frame first"
    snaps = [f for f in res.frames if f.get("type") == "snapshot"]
    wanted = {rid for rid, _ in res.expected}
    got = [
        (f["data"]["registrationId"], f["data"]["seq"])
        for f in res.frames
        if f.get("type") == "update" and f["data"]["registrationId"] in wanted
    ]
    if res.snapshot:
        return ("snapshot", "") if len(snaps) == 1 else ("lost", f"{len(snaps)} snapshots")
    if snaps:
        return "lost", "snapshot instead of a replay"
    if got != res.expected:
        return "lost", f"replay {got[:5]}… != expected {res.expected[:5]}…"
    return "replay", ""


async def readiness(
    base: str, stop: asyncio.Event, out: list[tuple[int, float]], failures: list[str]
) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        while not stop.is_set():
            t = time.monotonic()
            try:
                answer = await http.get("/readyz")
                code = answer.status_code
                if code != 200 and len(failures) < 5:
                    failures.append(answer.text[:200])
            except httpx.HTTPError as e:
                code = 0
                failures.append(type(e).__name__)
            out.append((code, time.monotonic() - t))
            await asyncio.sleep(0.1)


def metric(text: str, name: str, labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{" + labels + "}"):
            return float(line.split()[-1])
    return 0.0


async def herd(args: argparse.Namespace, base: str, server_pid: int, auth: str) -> dict:
    host, port = "127.0.0.1", int(base.rsplit(":", 1)[1])
    headers = {"Authorization": auth}
    follower = Follower()
    ftask = asyncio.create_task(follower.run(host, port, auth))
    await asyncio.wait_for(follower.connected.wait(), 10)
    run = f"{random.randrange(10**6):06d}"
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as http:
        sem = asyncio.Semaphore(32)

        async def create(i: int) -> int:
            async with sem:
                r = await http.post("/api/registrations", json=applicant("approved", run, i))
                r.raise_for_status()
                return int(r.json()["id"])

        n = args.static + args.bulk
        ids = list(await asyncio.gather(*(create(i) for i in range(n))))
        static, bulk = ids[: args.static], ids[args.static :]

        async def validate(chunk: list[int]) -> None:
            r = await http.post("/api/registrations/process", json={"registrationIds": chunk})
            r.raise_for_status()

        for i in range(0, len(static), 100):
            await validate(static[i : i + 100])
        end = time.monotonic() + args.timeout
        while not set(static) <= follower.finals and time.monotonic() < end:
            await asyncio.sleep(0.05)
        if not set(static) <= follower.finals:
            raise RuntimeError("the static registrations did not finish")
        order = [k for k in follower.order if k[0] in set(static)]
        rng = random.Random(15)
        resumes: list[Resume] = []
        per = {rid: [k for k in order if k[0] == rid] for rid in static}
        for i in range(args.resumes):
            rid = static[i % len(static)]
            kind = i % 4
            if kind in (0, 1):
                mine = per[rid]
                at = rng.randrange(len(mine) - 1)
                resumes.append(Resume(rid, follower.ids[mine[at]], mine[at + 1 :], False))
            elif kind == 2:
                at = rng.randrange(len(order) - 1)
                resumes.append(Resume(None, follower.ids[order[at]], order[at + 1 :], False))
            else:
                resumes.append(Resume(rid if i % 8 == 3 else None, "1_1-0", [], True))
        before = (await http.get("/metrics")).text
        history_len = len(order)

        ready: list[tuple[int, float]] = []
        ready_failures: list[str] = []
        stop = asyncio.Event()
        poller = asyncio.create_task(readiness(base, stop, ready, ready_failures))
        spids = procs.tree(server_pid)
        cpu0, t0 = procs.cpu(spids), time.monotonic()
        cores0, own0 = procs.core_times(), time.process_time()
        bulk_task = asyncio.gather(*(validate(bulk[i : i + 100]) for i in range(0, len(bulk), 100)))
        deadline = time.monotonic() + args.timeout
        await asyncio.gather(*(resume(host, port, auth, r, deadline) for r in resumes), bulk_task)
        herd_s = time.monotonic() - t0
        cpu1 = procs.cpu(spids)
        cores, own1 = procs.core_usage(cores0, procs.core_times()), time.process_time()
        while not set(bulk) <= follower.finals and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await poller
        after = (await http.get("/metrics")).text
    ftask.cancel()
    outcomes: dict[str, int] = {}
    for r in resumes:
        key = r.outcome + (" after deferral" if r.deferred and r.ended else "")
        outcomes[key] = outcomes.get(key, 0) + 1
    lat = sorted(r.ended - r.started for r in resumes if r.outcome in ("replay", "snapshot"))
    codes: dict[str, int] = {}
    for code, _ in ready:
        codes[str(code)] = codes.get(str(code), 0) + 1
    sub = 'connection="subscriber"'
    return {
        "history_entries_of_static": history_len,
        "resumes": len(resumes),
        "outcomes": outcomes,
        # lost: a wrong replay, a duplicate, a missing update, an error answer, a cut stream;
        # unfinished: still deferred or starting when --timeout ran out (a slow machine)
        "lost": sum(r.outcome in ("lost", "pending") for r in resumes),
        "unfinished": sum(r.outcome == "unfinished" for r in resumes),
        "lost_examples": [f"{r.rid} {r.last_id}: {r.why}" for r in resumes if r.outcome == "lost"][
            :5
        ],
        "deferrals": sum(r.deferred for r in resumes),
        "resumes_deferred": sum(r.deferred > 0 for r in resumes),
        "max_deferrals_one_resume": max(r.deferred for r in resumes),
        "startup_s": {
            "p50": round(lat[len(lat) // 2], 3) if lat else None,
            "p99": round(lat[int(len(lat) * 0.99)], 3) if lat else None,
            "max": round(lat[-1], 3) if lat else None,
        },
        "herd_s": round(herd_s, 2),
        "server_cpu_s": round(cpu1["sched"] - cpu0["sched"], 2),
        # the load side (this client, Redis, the simulator) shares CPU 1 when pinned: when it is
        # saturated, start-up latencies measure the clients more than the server
        "bench_client_core_pct": round(100 * (own1 - own0) / herd_s, 1),
        "cores_busy_pct": {name: c["busy_pct"] for name, c in cores.items()},
        "steal_pct_max": max((c["steal_pct"] for c in cores.values()), default=None),
        "readyz": codes,
        "readyz_max_ms": round(1000 * max(t for _, t in ready), 1) if ready else None,
        "readyz_failures": ready_failures,
        "subscription_rebuilds": metric(after, "regstream_redis_reconnects_total", sub)
        - metric(before, "regstream_redis_reconnects_total", sub),
        "bulk_finished": len(set(bulk) & follower.finals),
        "bulk": len(bulk),
        "server_deferred": {
            reason: metric(
                after, "regstream_sse_stream_starts_deferred_total", f'reason="{reason}"'
            )
            - metric(before, "regstream_sse_stream_starts_deferred_total", f'reason="{reason}"')
            for reason in ("queue full", "waited too long")
        },
        # resume points of the CPU comparison: after the second update of each static
        # registration (validated before the herd: its index stream has expired by now, while
        # the history still holds everything after it)
        "_targets": [(rid, follower.ids[(rid, 2)]) for rid in static if (rid, 2) in follower.ids],
    }


async def cpu_per_filtered_resume(
    redis_url: str, redis_pid: int, targets: list[tuple[int, str]], reps: int, per_rep: int
) -> dict:
    """One filtered resume's history read, in this process: the whole history parsed and
    filtered (before) vs the index (after), for resume points whose index stream is there
    (indexed) and of registrations validated before the herd (expired: the script scans the
    history after the id itself). CPU of this process (time.process_time) and of Redis (/proc),
    per resume; medians over reps, each rep interleaving all four."""
    from regstream.realtime.publisher import RegistrationPubSub

    client = create_client(redis_url, name="bench-resume")
    history = History(client, channel=messages.ServiceChannel.REGISTRATION_UPDATES)
    points = {
        "expired": [
            (rid, key) for rid, last in targets if (key := parse_resume_id(last)[0]) is not None
        ]
    }
    # indexed: per_rep registrations of their own, one update each, then 2,000 updates of others,
    # then a second update each (all through the service's publisher script): resuming after
    # the first, the whole history read has >= 2,000 entries, the index one
    publisher = RegistrationPubSub(client)
    base = 2_000_000_000 + random.randrange(10**6) * 1000
    start = await history.position()
    for k in range(per_rep):
        await publisher.publish_stage_update(base + k, "t24_lookup", "started", "x", seq=1)
    for j in range(2000):
        await publisher.publish_stage_update(base + per_rep + j % 500, "t24_lookup", "started",
                                             "x", seq=j // 500 + 1)  # fmt: skip
    for k in range(per_rep):
        await publisher.publish_stage_update(base + k, "t24_lookup", "completed", "x", seq=2)
    await publisher.wait_flushed(60)
    await publisher.aclose()
    firsts = {
        p.registration_id: p.key
        for p in (await history.since(start)).entries
        if p.seq == 1
        and p.registration_id is not None
        and base <= p.registration_id < base + per_rep
    }
    points["indexed"] = sorted(firsts.items())

    async def before(rid: int, key: Any) -> int:
        replay = await history.since(key)
        frames = [messages.update_frame(p) for p in replay.entries if p.registration_id == rid]
        return len(replay.entries) if replay.complete else -1 - len(frames)

    async def index(rid: int, key: Any) -> int:
        replay = await history.since_for(key, (rid,))
        frames = [messages.update_frame(p) for p in replay.entries]
        return len(frames) if replay.complete else -1

    variants = [(f"{name} {age}", fn, age) for age in points for name, fn in
                (("before", before), ("index", index))]  # fmt: skip
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
    scanned = []
    try:
        for _ in range(reps):
            for name, fn, age in variants:
                picks = points[age]
                sample = random.sample(picks, min(per_rep, len(picks)))
                r0, c0, t0 = procs.cpu([redis_pid]), time.process_time(), time.perf_counter()
                for rid, key in sample:
                    got = await fn(rid, key)
                    if name.startswith("before"):
                        scanned.append(got)
                c1, t1, r1 = time.process_time(), time.perf_counter(), procs.cpu([redis_pid])
                rows[name].append({
                    "cpu_us": 1e6 * (c1 - c0) / len(sample),
                    "wall_us": 1e6 * (t1 - t0) / len(sample),
                    "redis_us": 1e6 * (r1["sched"] - r0["sched"]) / len(sample),
                })  # fmt: skip
    finally:
        await client.aclose()
    med = {
        name: {k: round(statistics.median(r[k] for r in v), 1) for k in v[0]}
        for name, v in rows.items()
    }
    out: dict[str, Any] = {
        "entries_read_before_median": statistics.median(scanned) if scanned else None,
        "per_resume": med,
        "reps": reps,
        "resumes_per_rep": {age: min(per_rep, len(p)) for age, p in points.items()},
    }
    for age in points:
        b, i = rows[f"before {age}"], rows[f"index {age}"]
        ratios = [y["cpu_us"] / x["cpu_us"] for x, y in zip(b, i, strict=True)]
        out[f"cpu_ratio_index_over_before_{age}"] = round(statistics.median(ratios), 3)
        out[f"cpu_ratio_per_rep_{age}"] = [round(x, 3) for x in ratios]
    return out


# The publish script before the per-registration index (commit c973f78^), the baseline of the
# Redis CPU per published update.
_PUBLISH_BEFORE_INDEX = """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  local t = redis.call('TIME')
  epoch = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', KEYS[2], epoch)
end
local ids = {}
for i = 4, #ARGV do
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'm', ARGV[i])
  local msg = string.sub(ARGV[i], 1, -2) .. ',"eventId":"' .. epoch .. '_' .. id .. '"}'
  redis.call('PUBLISH', ARGV[2], msg)
  ids[#ids + 1] = epoch .. '_' .. id
end
if ARGV[3] ~= '' then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[3])
end
return ids
"""


async def publish_cost(redis_url: str, redis_pid: int, n: int, reps: int) -> dict:
    """Redis CPU per published update: the publish script before the index vs the publisher
    (with the index), batches of 256, interleaved reps on their own keys, medians."""
    from regstream.realtime.publisher import RegistrationPubSub

    client = create_client(redis_url, name="bench-publish")
    old = client.register_script(_PUBLISH_BEFORE_INDEX)
    new = RegistrationPubSub(client, channel="bench:index")
    payloads = [
        messages.encode(messages.stage_update(
            1_000_000 + i % 5000, "t24_lookup", "completed", "found", seq=i // 5000 + 1,
            timestamp=messages.now_ms(), details={"accountsFound": 2},
        ))
        for i in range(n)
    ]  # fmt: skip
    rows: dict[str, list[float]] = {"before": [], "index": []}
    try:
        for _ in range(reps):
            r0 = procs.cpu([redis_pid])
            for i in range(0, n, 256):
                await old(
                    keys=["bench:before:history", "bench:before:epoch"],
                    args=["10000", "bench:before", "", *payloads[i : i + 256]],
                )
            r1 = procs.cpu([redis_pid])
            for i in range(0, n, 256):  # batches of 256, as above (and no outbox overflow)
                for payload in payloads[i : i + 256]:
                    await new.publish_raw(payload)
                await new.wait_flushed(10)
            r2 = procs.cpu([redis_pid])
            rows["before"].append(1e6 * (r1["sched"] - r0["sched"]) / n)
            rows["index"].append(1e6 * (r2["sched"] - r1["sched"]) / n)
    finally:
        await new.aclose()
        await client.aclose()
    ratios = [b / a for a, b in zip(rows["before"], rows["index"], strict=True)]
    return {
        "redis_us_per_update": {k: round(statistics.median(v), 2) for k, v in rows.items()},
        "ratio_index_over_before": round(statistics.median(ratios), 2),
        "ratio_per_rep": [round(x, 2) for x in ratios],
        "updates_per_rep": n,
    }


async def pg(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(f"terminated by signal {s}"))
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--resumes", type=int, default=2000)
    ap.add_argument("--static", type=int, default=200, help="registrations validated first")
    ap.add_argument("--bulk", type=int, default=300, help="registrations validated during")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    ap.add_argument("--reps", type=int, default=5, help="reps of the CPU-per-resume comparison")
    ap.add_argument("--per-rep", type=int, default=200, help="resumes per variant and rep")
    ap.add_argument(
        "--publish-updates", type=int, default=20_000, help="updates per rep, publish cost"
    )
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-pin", dest="pin", action="store_false")
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "resume_bench.jsonl"))
    args = ap.parse_args(argv)
    if not (1 <= args.resumes <= 10_000 and 2 <= args.static <= 450 and args.bulk <= 2000):
        ap.error("bounds: resumes 1..10000, static 2..450, bulk <= 2000")
    procs.raise_nofile()
    if args.pin:
        os.sched_setaffinity(0, {1})
    children: list[procs.Child] = []
    rec: dict = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(args)}
    database = None
    try:
        logdir = tempfile.mkdtemp(prefix="resume-bench-")
        redis, rport = procs.start_redis(logdir, {1} if args.pin else None)
        children.append(redis)
        redis_url = f"redis://127.0.0.1:{rport}/0"
        exe = os.path.join(os.path.dirname(sys.executable), "regstream")
        sport = procs.free_port()
        sim = procs.Child(
            "t24-sim", [exe, "t24-sim", "--port", str(sport), "--latency-ms", "0"],
            {1} if args.pin else None, logdir,
        )  # fmt: skip
        children.append(sim)
        procs.wait_port(sport, sim, 30)
        data_dir = os.path.join(logdir, "data")
        os.makedirs(data_dir)
        env = {
            "REDIS_URL": redis_url,
            "REGSTREAM_DATA_DIR": data_dir,
            "T24_BASE_URL": f"http://127.0.0.1:{sport}/api/v1.0.0",
            "REGSTREAM_SECRET_KEY": uuid.uuid4().hex + uuid.uuid4().hex,
            "REGSTREAM_STREAMS_PER_USER": str(args.resumes * 2 + 100),
            "SSE_MAX_STREAMS": str(args.resumes * 2 + 100),
            "REGSTREAM_PROCESS_RATE_PER_MINUTE": str(10 * (args.static + args.bulk)),
        }
        if not args.sqlite:
            database = f"resume_bench_{uuid.uuid4().hex[:10]}"
            asyncio.run(pg(f'CREATE DATABASE "{database}"'))
            base_pg = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
            env["DATABASE_URL"] = f"{base_pg}/{database}"
        env.update(dict(kv.split("=", 1) for kv in args.server_env))
        auth = "Bearer " + admin_token(exe, env, logdir)
        port = procs.free_port()
        srv = procs.Child(
            "regstream", [exe, "serve", "--host", "127.0.0.1", "--port", str(port)],
            {0} if args.pin else None, logdir, env=env,
        )  # fmt: skip
        children.append(srv)
        procs.wait_port(port, srv, 60)
        result = asyncio.run(herd(args, f"http://127.0.0.1:{port}", srv.pid, auth))
        targets = result.pop("_targets")
        rec.update(result)
        rec["cpu_per_filtered_resume"] = asyncio.run(
            cpu_per_filtered_resume(redis_url, redis.pid, targets, args.reps, args.per_rep)
        )
        rec["redis_cpu_per_publish"] = asyncio.run(
            publish_cost(redis_url, redis.pid, args.publish_updates, args.reps)
        )
        failed = []
        if rec["lost"] or rec["unfinished"]:
            failed.append(f"{rec['lost']} resumes lost, {rec['unfinished']} unfinished")
        if set(rec["readyz"]) != {"200"}:
            failed.append(f"/readyz {rec['readyz']}")
        if rec["subscription_rebuilds"]:
            failed.append(f"{rec['subscription_rebuilds']} subscription rebuilds")
        if failed:
            rec["error"] = "; ".join(failed)
    except Exception as e:  # noqa: BLE001 - reported, recorded, non-zero exit
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        for c in reversed(children):
            c.stop()
        if database is not None:
            asyncio.run(pg(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    rec["args"] = vars(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    print(json.dumps({k: v for k, v in rec.items() if k != "args"}, indent=1))
    if "error" in rec:
        print(f"error: {rec['error']}", file=sys.stderr)
    return 1 if "error" in rec else 0


if __name__ == "__main__":
    sys.exit(main())
