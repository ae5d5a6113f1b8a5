"""Pipeline benchmark: validations/s, click -> final-frame latency, server CPU per validation.

  .venv/bin/python bench/pipeline_bench.py -k 2000

Starts a private redis-server (CPU 1) and `regstream serve` (CPU 0, zero-latency T24 simulator,
SQLite in a temp dir unless --database-url), or measures a server you started (--url and
--server-pid). Opens one unfiltered update stream, creates K registrations through the REST API
(POST /api/registrations, not timed), then clicks "process" for all of them
(POST /api/registrations/{id}/process, --concurrency requests in flight) and waits (bounded) until
every registration's final frame arrived on the stream. Reports validations/s, p50/p99 time from
click to final frame, and the server's CPU time per validation (its process tree, from /proc),
and how busy the load core was (this client, the simulator and Redis): at 90 % or more the
server waited for its clients and validations/s is a lower bound (flagged, with a warning).
Also where the whole machine's CPU went in that window, per validation (server, database,
simulator, Redis, this client, other) and the rate at which it would fill every core.
Appends one JSON line to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import shlex
import signal
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import httpx  # noqa: E402
import procs  # noqa: E402

from regstream.core_banking.simulator.dataset import load_applicant  # noqa: E402

STREAM = "/api/registrations/updates/stream"
DATA = re.compile(rb"^data: ?(.*)$", re.M)
EVENT_ID = re.compile(rb"^id: ?(.*)$", re.M)


def applicant(outcome: str, run: str, i: int) -> dict:
    """One valid registration request, unique per run so duplicate checks do not collapse them:
    a generated customer of the simulator (``dataset.load_applicant``, people below 10**8 are
    distinct), whose validation runs every stage and ends APPROVED. For ``not-found`` its CIF
    moves out of the simulator's load range (7nnnnnnnnn → 8nnnnnnnnn), so the run ends FAILED
    (CUSTOMER_NOT_FOUND) after one T24 call."""
    person = load_applicant(int(run[:2]) * 1_000_000 + i)
    if outcome == "not-found":
        person["customerNumber"] = "8" + person["customerNumber"][1:]
    return person


def admin_token(exe: str, env: dict[str, str], cwd: str) -> str:
    """Create an admin user in the server's database (same environment) and return its token."""
    import subprocess

    name = f"bench-{random.randrange(16**8):08x}"
    out = subprocess.run(
        [exe, "users", "add", name, "--role", "admin", "--no-password", "--token"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    lines = [x.strip() for x in out.stdout.splitlines() if x.strip()]
    if out.returncode or not lines:
        raise RuntimeError(f"users add exited {out.returncode}: {out.stderr[-500:]}")
    return lines[-1]


CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
CLOSE = re.compile(rb"(?i)\r\nconnection: *close")


async def raw_clicks(
    host: str, port: int, auth: str | None, ids: list[int], concurrency: int,
    clicked: dict[int, float], errors: dict[str, int],
) -> None:  # fmt: skip
    """One ``POST /api/registrations/{id}/process`` per id over ``concurrency`` keep-alive
    connections, HTTP/1.1 written by hand: httpx cost the client ~0.5 ms of CPU per request, so
    with one click per registration the load core, not the server, set the pace (78 % client CPU
    at 146 validations/s in run 9). A click whose connection failed is sent once more on a new
    connection; a 409 for that repeat means the first one was taken."""
    auth_line = f"Authorization: {auth}\r\n" if auth else ""
    pending = iter(ids)

    async def worker() -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        for rid in pending:
            request = (
                f"POST /api/registrations/{rid}/process HTTP/1.1\r\nHost: {host}\r\n"
                f"{auth_line}Content-Length: 0\r\n\r\n"
            ).encode()
            clicked[rid] = time.monotonic()
            status, failure = 0, ""
            for attempt in (1, 2):
                try:
                    if writer is None or reader is None:
                        reader, writer = await asyncio.wait_for(
                            asyncio.open_connection(host, port), 30
                        )
                    writer.write(request)
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                    length = CONTENT_LENGTH.search(head)
                    if length is None:  # FastAPI's JSON answers carry one; anything else: stop
                        raise ValueError(f"no Content-Length: {head[:80]!r}")
                    await asyncio.wait_for(reader.readexactly(int(length.group(1))), 30)
                    status = int(head[9:12])
                    if CLOSE.search(head):
                        writer.close()
                        reader = writer = None
                    if attempt == 2 and status == 409:
                        status = 202
                    break
                except (
                    OSError, TimeoutError, ValueError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError,
                ) as e:  # fmt: skip
                    failure = type(e).__name__  # counted once per click, below
                    if writer is not None:
                        writer.close()
                    reader = writer = None
            if not 200 <= status < 300:
                key = str(status) if status else failure
                errors[key] = errors.get(key, 0) + 1
                clicked.pop(rid, None)
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


class StreamFollower:
    """Unfiltered SSE stream; remembers when each registration's final frame arrived.

    Like a browser's EventSource it reconnects with ``Last-Event-ID`` when the server ends the
    stream (a burst of validations can outrun this reader on the shared load core, and the server
    cuts a stream that falls ``SSE_MAX_BUFFER_BYTES`` behind); the server replays what it missed
    from its history. Reconnects and snapshot frames (history could not cover the gap) are
    counted and reported.
    """

    MAX_RECONNECTS = 10

    def __init__(self, finals: set[str]) -> None:
        self.finals = finals
        self.final_at: dict[int, float] = {}
        self.outcomes: dict[str, int] = {}  # final status (and error code) -> count
        self.frames = 0
        self.reconnects = 0
        self.snapshots = 0
        self.last_id: bytes | None = None
        self.connected = asyncio.Event()

    async def run(self, host: str, port: int, auth: str | None) -> None:
        while True:
            await self._follow(host, port, auth)
            if self.reconnects == self.MAX_RECONNECTS:
                return
            self.reconnects += 1

    async def _follow(self, host: str, port: int, auth: str | None) -> None:
        r, w = await asyncio.open_connection(host, port)
        extra = f"Authorization: {auth}\r\n" if auth else ""
        if self.last_id is not None:
            extra += f"Last-Event-ID: {self.last_id.decode()}\r\n"
        w.write(
            f"GET {STREAM} HTTP/1.1\r\nHost: {host}\r\n{extra}"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        try:
            head = await r.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"stream: {head[:80]!r}")
            buf = b""
            while True:
                chunk = await r.read(65536)
                if not chunk:
                    return
                now = time.monotonic()
                buf += chunk
                blocks = buf.split(b"\n\n")
                buf = blocks.pop()
                for block in blocks:
                    for m in DATA.finditer(block):
                        self.on_data(m.group(1), now)
                for block in reversed(blocks):  # the last event id read, for a resume
                    if (m := EVENT_ID.search(block)) is not None:
                        self.last_id = m.group(1).strip()
                        break
        finally:
            w.close()

    def on_data(self, raw: bytes, now: float) -> None:
        if raw.startswith(b'{"type":"snapshot"'):
            self.snapshots += 1
            return
        if b'"final"' not in raw and b'"connected"' not in raw:  # only these are read
            self.frames += raw.startswith(b'{"type":"update"')  # the hub's frames are compact
            return
        try:
            frame = json.loads(raw)
        except ValueError:
            return  # chunked-encoding size lines and the like
        if not isinstance(frame, dict):
            return
        if frame.get("type") == "connected":
            self.connected.set()
        if frame.get("type") != "update":
            return
        self.frames += 1
        d = frame.get("data") or {}
        if d.get("status") in self.finals and "registrationId" in d:
            self.final_at[int(d["registrationId"])] = now
            outcome = f"{d['status']} {(d.get('details') or {}).get('error') or ''}".strip()
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


MEAN_PARTS = re.compile(
    r'^regstream_(stage_duration|t24_call)_seconds_(sum|count)\{([^}]*)\} (\S+)$', re.M
)


async def stage_means(base: str, headers: dict[str, str]) -> dict[str, float] | None:
    """Mean ms per pipeline stage and per T24 operation, from the server's ``/metrics``
    (``regstream_stage_duration_seconds``, ``regstream_t24_call_seconds``); None if unread."""
    try:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as http:
            answer = await http.get("/metrics")
    except httpx.HTTPError:
        return None
    if answer.status_code != 200:
        return None
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for _metric, kind, labels, value in MEAN_PARTS.findall(answer.text):
        names = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        what = names.get("stage") or names.get("operation")
        key = f"{what}:{names.get('result') or names.get('outcome')}"
        into = sums if kind == "sum" else counts
        into[key] = into.get(key, 0.0) + float(value)
    return {k: round(1000 * sums[k] / counts[k], 2) for k in sorted(sums) if counts.get(k)}


async def bench(args, base: str, server_pid: int | None, helpers: dict[str, int]) -> dict:
    host, port = "127.0.0.1", int(base.rsplit(":", 1)[1])
    headers = {"Authorization": args.auth_header} if args.auth_header else {}
    follower = StreamFollower(set(args.final_statuses.split(",")))
    ftask = asyncio.create_task(follower.run(host, port, args.auth_header))
    await asyncio.wait_for(follower.connected.wait(), 10)
    # Idle connections are dropped after 1 s, well inside the server's 5 s keep-alive: a request
    # on a connection the server was closing at that moment failed with ReadError (a few per run).
    limits = httpx.Limits(max_connections=args.concurrency, keepalive_expiry=1.0)
    sem = asyncio.Semaphore(args.concurrency)
    errors: dict[str, int] = {}
    run = f"{random.randrange(10**6):06d}"
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as cl:

        async def call(path: str, body: dict | None = None) -> httpx.Response | None:
            async with sem:
                try:
                    resp = await cl.post(path, json=body)
                except httpx.HTTPError as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    return None
            if resp.status_code >= 300:
                errors[str(resp.status_code)] = errors.get(str(resp.status_code), 0) + 1
                errors.setdefault(f"first {resp.status_code}", resp.text[:300])  # type: ignore
                return None
            return resp

        t = time.monotonic()
        created = await asyncio.gather(
            *(call("/api/registrations", applicant(args.outcome, run, i)) for i in range(args.k))
        )
        ids = []
        for resp in created:
            if resp is not None:
                body = resp.json()
                ids.append(int(body.get("id", body.get("registrationId"))))
        create_s = time.monotonic() - t
        if not ids:
            raise RuntimeError(f"no registration created: {errors}")

        # ---- measured: click "process" for every registration, wait for every final frame
        spids = procs.tree(server_pid) if server_pid else []
        cpu0 = procs.cpu(spids)
        main0 = procs.cpu([server_pid]) if server_pid else None
        cores0, own0 = procs.core_times(), time.process_time()
        every0, e0 = procs.every_cpu(), time.monotonic()
        clicked: dict[int, float] = {}

        async def click_many(chunk: list[int]) -> None:
            now = time.monotonic()
            clicked.update((rid, now) for rid in chunk)
            resp = await call("/api/registrations/process", {"registrationIds": chunk})
            accepted = set(resp.json()["accepted"]) if resp is not None else set()
            for rid in chunk:
                if rid not in accepted:
                    clicked.pop(rid, None)

        print(f"created {len(ids)} in {create_s:.1f} s; validating", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        if args.bulk:
            chunks = [ids[i : i + args.bulk] for i in range(0, len(ids), args.bulk)]
            await asyncio.gather(*(click_many(c) for c in chunks))
        else:
            await raw_clicks(host, port, args.auth_header, ids, args.concurrency, clicked, errors)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and any(r not in follower.final_at for r in clicked):
            await asyncio.sleep(0.02)
        cpu1 = procs.cpu(spids)
        main1 = procs.cpu([server_pid]) if server_pid else None
        cores1, own1 = procs.core_times(), time.process_time()
        every1, e1 = procs.every_cpu(), time.monotonic()
        groups = {"server": set(spids), "client": {os.getpid()}}
        groups.update((name, set(procs.tree(pid))) for name, pid in helpers.items())
        machine, other = procs.machine_usage(every0, every1, groups, {"postgres": "database"})
        # all cores' busy time (/proc/stat, interrupts included): what no process was charged
        # (loopback network work in interrupts, exited threads) is the rest of it
        busy_s = procs.busy_seconds(cores0, cores1)
        machine["interrupts_and_unattributed"] = max(busy_s - sum(machine.values()), 0.0)
    # The follower must still be reading: if its stream ended or it failed, the missing final
    # frames say nothing about the server's speed, and no rate is reported (main exits 1).
    stream_end = None
    if ftask.done():
        exc = None if ftask.cancelled() else ftask.exception()
        stream_end = (
            f"ended by the server {follower.reconnects + 1} times"
            if exc is None
            else f"{type(exc).__name__}: {exc}"
        )
    ftask.cancel()
    stage_ms = await stage_means(base, headers)
    done = sorted(follower.final_at[r] - clicked[r] for r in clicked if r in follower.final_at)
    last = max((follower.final_at[r] for r in clicked if r in follower.final_at), default=t0)
    window = max(last - t0, 1e-9)
    srv_s = cpu1["sched"] - cpu0["sched"]
    elapsed = time.monotonic() - t0
    cores = procs.core_usage(cores0, cores1)
    # The load side (this client, the simulator and Redis share the other core when pinned): when
    # that core is saturated, the server waits for it and validations/s is a lower bound.
    load_core = cores.get("cpu1", {}).get("busy_pct") if args.pin else None

    def q(p: float) -> float | None:
        return round(1000 * done[min(len(done) - 1, int(p / 100 * len(done)))], 1) if done else None

    return {
        "k": args.k,
        "created": len(ids),
        "create_s": round(create_s, 2),
        "clicked": len(clicked),
        "finished": len(done),
        "stream_end": stream_end,
        "stream_reconnects": follower.reconnects,
        "stream_snapshots": follower.snapshots,
        "http_errors": errors,
        "update_frames": follower.frames,
        "outcomes": follower.outcomes,
        "validations_per_s": round(len(done) / window, 1),
        "bench_client_core_pct": round(100 * (own1 - own0) / elapsed, 1),
        "load_core_busy_pct": load_core,
        "load_side_saturated": load_core is not None and load_core >= 90,
        "click_to_final_ms": {
            "p50": q(50),
            "p90": q(90),
            "p99": q(99),
            "max": round(1000 * done[-1], 1) if done else None,
        },
        # where a validation's time went: mean ms per stage and per T24 call (the server's
        # histograms, whole run); with the simulator's latency, Little's law's gap is here
        "stage_ms_mean": stage_ms,
        "server_cpu_s": round(srv_s, 3) if spids else None,
        "server_cpu_ms_per_validation": round(1000 * srv_s / len(done), 3)
        if spids and done
        else None,
        "server_core_pct": round(100 * srv_s / window, 1) if spids else None,
        # the server process alone (its tree also holds an embedded simulator, if any)
        "server_main_cpu_ms_per_validation": round(
            1000 * (main1["sched"] - main0["sched"]) / len(done), 3
        )
        if main0 and done
        else None,
        # Where the whole machine's CPU went in the same window, per validation: the server,
        # the database (every ``postgres`` process on the host: the bench's server may share
        # the machine with it), the simulator, Redis, this client, other processes, and the
        # busy time no process was charged (/proc/stat). All of it bounds this machine's rate,
        # whatever the server does: every core busy gives at most ``machine_ceiling_per_s``
        # (``os.cpu_count()`` cores); the server's own core may fill first
        # (``server_core_busy_pct``: that core's busy time, whoever used it).
        "machine_cpu_ms_per_validation": {
            name: round(1000 * used / len(done), 3) for name, used in machine.items()
        }
        if done
        else None,
        # the largest parts of "other" (kernel threads doing loopback network work, say)
        "machine_other_ms_per_validation": {
            comm: round(1000 * used / len(done), 3)
            for comm, used in sorted(other.items(), key=lambda kv: -kv[1])[:5]
        }
        if done
        else None,
        "machine_busy_cores": round(busy_s / max(e1 - e0, 1e-9), 2),
        "machine_ceiling_per_s": round((os.cpu_count() or 1) * len(done) / busy_s, 1)
        if done and busy_s
        else None,
        "server_core_busy_pct": cores.get("cpu0", {}).get("busy_pct") if args.pin else None,
        "server_main_user_sys_s": [
            round(main1["user"] - main0["user"], 2),
            round(main1["sys"] - main0["sys"], 2),
        ]
        if main0
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(f"terminated by signal {s}"))
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-k", type=int, default=1000, help="registrations to validate")
    ap.add_argument("--concurrency", type=int, default=64, help="HTTP requests in flight")
    ap.add_argument(
        "--bulk",
        type=int,
        default=0,
        metavar="N",
        help="start validations N at a time with POST /api/registrations/process (bulk "
        "validation) instead of one POST per registration",
    )
    ap.add_argument("--timeout", type=float, default=120, help="bound for all final frames, s")
    ap.add_argument(
        "--final-statuses",
        default="APPROVED,COMPLETED,DUPLICATE,FAILED",
        help="statuses whose frame ends a registration's pipeline",
    )
    ap.add_argument(
        "--outcome",
        choices=("approved", "not-found"),
        default="approved",
        help="what the registrations validate to: approved (every stage, two T24 calls, an "
        "enrolment) or not-found (one T24 call, FAILED with CUSTOMER_NOT_FOUND)",
    )
    ap.add_argument("--url", help="measure a running server (http://127.0.0.1:PORT) instead")
    ap.add_argument("--server-pid", type=int, help="with --url: PID whose tree's CPU is measured")
    ap.add_argument("--server-cmd", help="command to start (placeholders {port} {redis_url})")
    ap.add_argument("--database-url", help="DATABASE_URL for the started server (default SQLite)")
    ap.add_argument("--t24-latency-ms", type=float, default=0.0, help="T24 simulator latency")
    ap.add_argument(
        "--auth-header",
        help="Authorization value, e.g. 'Bearer x' (default for a started server: a fresh admin "
        "token from 'regstream users add')",
    )
    ap.add_argument("--no-auth", action="store_true", help="send no Authorization header")
    ap.add_argument(
        "--sim",
        choices=["separate", "embedded"],
        default="separate",
        help="T24 simulator: its own process on the load core (default), or the one `serve` "
        "starts itself (a child on the server's core, its CPU counted as the server's)",
    )
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the started server (repeatable)",
    )
    ap.add_argument("--no-pin", dest="pin", action="store_false")
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "pipeline_bench.jsonl"))
    args = ap.parse_args(argv)
    if any("=" not in kv for kv in args.server_env):
        ap.error("--server-env takes KEY=VALUE")
    args.server_env = dict(kv.split("=", 1) for kv in args.server_env)
    if not (1 <= args.k <= 100_000 and 1 <= args.concurrency <= 1000 and args.timeout <= 600):
        ap.error("bounds: 1<=k<=100000, concurrency<=1000, timeout<=600")
    if args.pin:
        os.sched_setaffinity(0, {1})
    children: list[procs.Child] = []
    rec: dict = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(args)}
    try:
        helpers: dict[str, int] = {}  # the started simulator and Redis, by name
        if args.url:
            base, pid = args.url.rstrip("/"), args.server_pid
        else:
            logdir = tempfile.mkdtemp(prefix="pipeline-bench-")
            redis, rport = procs.start_redis(logdir, {1} if args.pin else None)
            children.append(redis)
            helpers["redis"] = redis.pid
            port = procs.free_port()
            redis_url = f"redis://127.0.0.1:{rport}/0"
            data_dir = os.path.join(logdir, "data")
            os.makedirs(data_dir, exist_ok=True)
            env = {
                "REDIS_URL": redis_url,
                "REGSTREAM_DATA_DIR": data_dir,
                "T24_SIM_LATENCY_MS": str(args.t24_latency_ms),
                # the per-process `process` rate limit would otherwise be the bottleneck
                "REGSTREAM_PROCESS_RATE_PER_MINUTE": str(max(60, 10 * args.k)),
            }
            if args.database_url:
                env["DATABASE_URL"] = args.database_url
                # required with DATABASE_URL (one key for every instance of a fleet)
                env["REGSTREAM_SECRET_KEY"] = secrets.token_hex(32)
            exe = os.path.join(os.path.dirname(sys.executable), "regstream")
            if args.sim == "separate":
                # the simulator on the load core: otherwise `serve` forks it onto the server's
                # core and its CPU is charged to every validation
                sport = procs.free_port()
                sim = procs.Child(
                    "t24-sim",
                    [exe, "t24-sim", "--port", str(sport), "--latency-ms",
                     str(args.t24_latency_ms)],
                    {1} if args.pin else None,
                    logdir,
                )  # fmt: skip
                children.append(sim)
                helpers["simulator"] = sim.pid
                procs.wait_port(sport, sim, 30)
                env["T24_BASE_URL"] = f"http://127.0.0.1:{sport}/api/v1.0.0"
            env.update(args.server_env)
            if not args.auth_header and not args.no_auth:  # auth is on: a fresh admin token
                args.auth_header = "Bearer " + admin_token(exe, env, logdir)
                rec["auth"] = "admin token created by the bench"
            cmd = args.server_cmd or f"{exe} serve --host 127.0.0.1 --port {{port}}"
            argv_ = shlex.split(cmd.format(port=port, redis_url=redis_url))
            srv = procs.Child("regstream", argv_, {0} if args.pin else None, logdir, env=env)
            children.append(srv)
            procs.wait_port(port, srv, 60)
            base, pid = f"http://127.0.0.1:{port}", srv.pid
        rec.update(asyncio.run(bench(args, base, pid, helpers)))
        if rec["finished"] < rec["clicked"]:
            rec["error"] = (
                f"only {rec['finished']} of {rec['clicked']} final frames arrived within "
                f"{args.timeout} s (update stream: {rec['stream_end'] or 'still open'}); "
                "the rates above are not a measurement"
            )
    except Exception as e:  # noqa: BLE001 - reported, recorded, non-zero exit
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        for c in reversed(children):
            c.stop()
    rec["args"] = {**vars(args), "auth_header": "<set>" if args.auth_header else None}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    print(json.dumps({k: v for k, v in rec.items() if k != "args"}, indent=1))
    if rec.get("load_side_saturated"):
        print(
            f"warning: the load core was {rec['load_core_busy_pct']} % busy: the server waited for "
            "its clients, so validations/s is a lower bound (CPU per validation still holds)",
            file=sys.stderr,
        )
    if "error" in rec:
        print(f"error: {rec['error']}", file=sys.stderr)
    return 1 if "error" in rec else 0


if __name__ == "__main__":
    sys.exit(main())
