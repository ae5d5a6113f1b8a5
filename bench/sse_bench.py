"""SSE fan-out benchmark: regstream's update stream against a baseline (nchan, floor), one command.

  .venv/bin/python bench/sse_bench.py --targets regstream,baseline,nchan,floor -n 1000 --rate 20

Targets: regstream (the service), baseline (FastAPI + sse-starlette, baseline_app.py), nchan
(nginx + nchan, C) and floor (floor_app.py: the cheapest pure-Python fan-out, asyncio + uvloop and
one pre-encoded chunk written to every stream; what one Python process can do at best here).
regstream-cluster is the service on a private Redis Cluster (tests/cluster_support.py: 3 masters +
3 replicas, CPU 1; REDIS_CLUSTER=true, 16 partitions), published through the service's own
publisher (the Lua script, SPUBLISH per partition); `--publisher script` publishes the other
targets' messages that way too, so `--targets regstream,regstream-cluster --publisher script`
compares the two Redis modes like for like (ratio regstream-cluster/regstream).

For every rep and every target (targets interleaved within a rep) one run: start a private
redis-server (CPU 1) and the target (CPU 0), open N SSE streams from --workers client processes
(CPU 1), measure memory and Redis connections with the streams idle, publish rate x duration
messages (CPU 1), wait (bounded) for the deliveries, read CPU from /proc, stop everything by PID.
Prints one line per run, then a table of medians over the reps and the per-rep ratios; appends
one JSON line per run to --out. Exits 3 (numbers not reported) when a client process used more
than 70% of a core: then the run measured the load generator, not the server.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import string
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Coroutine
from typing import Any, TypeVar

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.dirname(BENCH))  # the repository: tests.cluster_support

import orjson  # noqa: E402
import procs  # noqa: E402
from capacity_bench import service_publisher  # noqa: E402
from loadgen import LoadGen  # noqa: E402
from tests.cluster_support import PrivateCluster  # noqa: E402

CHANNEL = "service:registration-updates"
STREAM = "/api/registrations/updates/stream"
RID_BASE = 100_000
CLIENT_BOUND_PCT = 70.0
SERVER_CPUS, LOAD_CPUS = {0}, {1}
TARGETS = ("regstream", "baseline", "nchan", "floor", "regstream-cluster")
SERVICE = ("regstream", "regstream-cluster")  # the service (auth, --server-env, tokens)
PARTITIONS = 16
T = TypeVar("T")
NCHAN_MODULE = "/usr/lib/nginx/modules/ngx_nchan_module.so"
MSG = (
    b'{"registrationId":%d,"status":"PENDING","timestamp":%d,"stage":"duplicate_check",'
    b'"stageStatus":"started","message":"started: duplicate_check","seq":%d,'
    b'"bench":"%d:%d:%d"}'
)


def payload(rid: int, seq: int) -> bytes:
    t = time.time_ns()
    return MSG % (rid, t // 1_000_000, seq, rid, seq, t)


# ------------------------------------------------------------------------------------ publishers


class Publisher:
    """Paced sends over one pipelined socket (keeps order); replies are counted, never awaited."""

    reply: re.Pattern[bytes]  # one match per reply, group 1 = its kind

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.settimeout(None)  # blocking sends; replies are read with MSG_DONTWAIT
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tail = b""
        self.replies: dict[str, int] = {}

    def read_replies(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                return
            buf = self.tail + data
            cut = buf.rfind(b"\n") + 1  # complete lines only; the rest waits for more bytes
            for m in self.reply.finditer(buf, 0, cut):
                k = m.group(1).decode()
                self.replies[k] = self.replies.get(k, 0) + 1
            self.tail = buf[cut:]

    def finish(self, expect: int, timeout: float) -> dict[str, int]:
        end = time.monotonic() + timeout
        while sum(self.replies.values()) < expect and time.monotonic() < end:
            self.read_replies()
            time.sleep(0.01)
        self.sock.close()
        return self.replies


class RedisPublisher(Publisher):
    reply = re.compile(rb"^([:\-])", re.M)  # ":<receivers>" or "-ERR"

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.sock.sendall(b"*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$9\r\nbench-pub\r\n")
        self.sock.recv(64)
        self.ch = CHANNEL.encode()

    def send(self, rid: int, seq: int) -> None:
        p, ch = payload(rid, seq), self.ch
        self.sock.sendall(
            b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(ch), ch, len(p), p)
        )


class ScriptPublisher:
    """The service's publisher (capacity_bench.service_publisher: the Lua script, event ids, the
    history; SPUBLISH per partition on a cluster) on an asyncio loop in a thread of its own.
    ``send`` queues one update (the send time is taken then); ``finish`` waits for the flush."""

    def __init__(self, redis_url: str, partitions: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.redis, self.pubsub = self._run(self._make(redis_url, partitions), 10)
        self.sent = 0

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _make(self, redis_url: str, partitions: int) -> tuple[Any, Any]:
        return service_publisher(redis_url, partitions, outbox_max=100_000)

    def send(self, rid: int, seq: int) -> None:
        # seq + 1: the script skips an update whose seq is not above the registration's last
        # (none yet: 0), and the service's seqs start at 1
        update = orjson.loads(payload(rid, seq + 1))
        self.loop.call_soon_threadsafe(self.pubsub.enqueue_update, update)
        self.sent += 1

    def read_replies(self) -> None:
        pass

    def finish(self, expect: int, timeout: float) -> dict[str, int]:
        flushed = self._run(self.pubsub.wait_flushed(timeout), timeout + 5)
        pending = self.pubsub.pending
        self._run(self.pubsub.aclose(), 10)
        self._run(self.redis.aclose(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        return {"published": self.sent - pending, "flushed": int(flushed)}


class HttpPublisher(Publisher):
    """nchan: POST /pub/<rid>; the body is the whole frame data {"type":"update","data":...}."""

    reply = re.compile(rb"HTTP/1\.1 (\d{3})")

    def send(self, rid: int, seq: int) -> None:
        body = b'{"type":"update","data":' + payload(rid, seq) + b"}"
        self.sock.sendall(
            b"POST /pub/%d HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Accept: text/json\r\nContent-Length: %d\r\n\r\n%s" % (rid, len(body), body)
        )


# ------------------------------------------------------------------------------------ targets


def nchan_available() -> str | None:
    """None when nginx with nchan can run here, else why not."""
    if not shutil.which("nginx"):
        return "nginx not installed"
    if not os.path.exists(NCHAN_MODULE):
        return f"{NCHAN_MODULE} missing (apt-get install libnginx-mod-nchan)"
    return None


def start_target(name: str, args, port: int, redis_port: int, logdir: str) -> procs.Child:
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {"REDIS_URL": redis_url}
    if args.ping_interval:
        env["SSE_PING_INTERVAL"] = str(args.ping_interval)
    if name in SERVICE:
        if name == "regstream-cluster":  # redis_port: a master of the private cluster
            env.update(REDIS_CLUSTER="true", REGSTREAM_PARTITIONS=str(PARTITIONS))
        env.update(args.server_env)
        exe = os.path.join(os.path.dirname(sys.executable), "regstream")
        exe = exe if os.path.exists(exe) else "regstream"
        if args.auto_auth:  # one-command default: an admin token, the per-user cap lifted for N
            env.setdefault("REGSTREAM_STREAMS_PER_USER", str(max(20, args.clients + 100)))
            env.setdefault("SSE_MAX_STREAMS", str(max(20_000, args.clients + 100)))
        if args.server_cmd:
            argv = shlex.split(
                args.server_cmd.format(
                    port=port, redis_url=redis_url, redis_port=redis_port, host="127.0.0.1"
                )
            )
        else:
            argv = [
                exe,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
        data_dir = os.path.join(logdir, "data")
        os.makedirs(data_dir, exist_ok=True)
        env["REGSTREAM_DATA_DIR"] = data_dir
        setup_cmd = args.setup_cmd
        if args.auto_auth and not setup_cmd:  # the data dir is fresh per run; the name is too
            name_ = "bench-" + "".join(random.choices(string.ascii_lowercase + string.digits, k=8))
            setup_cmd = f"{shlex.quote(exe)} users add {name_} --role admin --no-password --token"
        if setup_cmd:  # e.g. create a user and print its API token
            args.token = setup(setup_cmd, env, logdir)
        return procs.Child(name, argv, SERVER_CPUS if args.pin else None, logdir, env=env)
    if name == "baseline":
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "baseline_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
            "--backlog",
            "4096",
        ]
        return procs.Child(
            name, argv, SERVER_CPUS if args.pin else None, logdir, env=env, cwd=BENCH
        )
    if name == "floor":
        argv = [sys.executable, os.path.join(BENCH, "floor_app.py"), "--port", str(port)]
        return procs.Child(
            name, argv, SERVER_CPUS if args.pin else None, logdir, env=env, cwd=BENCH
        )
    if name == "nchan":
        prefix = os.path.join(logdir, "nginx")
        os.makedirs(prefix, exist_ok=True)
        with open(os.path.join(BENCH, "nchan.conf.tmpl")) as f:
            conf = string.Template(f.read()).substitute(
                PREFIX=prefix,
                PORT=port,
                REDIS_PORT=redis_port,
                PING_S=int(args.ping_interval or 30),
            )
        path = os.path.join(prefix, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        argv = [
            "nginx",
            "-p",
            prefix,
            "-c",
            path,
            "-e",
            os.path.join(prefix, "error.log"),
            "-g",
            "daemon off;",
        ]
        return procs.Child(name, argv, SERVER_CPUS if args.pin else None, logdir)
    raise SystemExit(f"unknown target {name!r} ({', '.join(TARGETS)})")


def setup(cmd: str, env: dict[str, str], logdir: str) -> str:
    """Run --setup-cmd with the server's environment (bounded); its last stdout line is returned
    (the token used by --auth-header auto)."""
    import subprocess

    out = subprocess.run(
        shlex.split(cmd),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=logdir,
        stdin=subprocess.DEVNULL,
    )
    if out.returncode:
        raise RuntimeError(f"--setup-cmd exited {out.returncode}: {out.stderr[-500:]}")
    lines = [x.strip() for x in out.stdout.splitlines() if x.strip()]
    return lines[-1] if lines else ""


def warm_up(port: int, auth: str | None, timeout: float) -> bytes:
    """One stream opened end to end (retried, bounded): bytes up to its first SSE block."""
    end = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                extra = f"Authorization: {auth}\r\n" if auth else ""
                s.sendall(
                    f"GET {STREAM} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}"
                    "Accept: text/event-stream\r\n\r\n".encode()
                )
                buf = b""
                while time.monotonic() < end:
                    d = s.recv(65536)
                    if not d:
                        break
                    buf += d
                    i = buf.find(b"\r\n\r\n")
                    if i >= 0 and not buf.startswith(b"HTTP/1.1 200"):
                        raise RuntimeError(f"stream answered {buf[:i].decode(errors='replace')}")
                    if i >= 0 and (b"\n\n" in buf[i + 4 :] or b"\n\r\n" in buf[i + 4 :]):
                        return buf
        except (OSError, RuntimeError) as e:
            last = e
        time.sleep(0.5)
    raise RuntimeError(f"warm-up: no SSE frame from 127.0.0.1:{port}{STREAM}: {last}")


# ------------------------------------------------------------------------------------ one run


def pct(sorted_us: list[int], q: float) -> float | None:
    if not sorted_us:
        return None
    return round(sorted_us[min(len(sorted_us) - 1, int(q / 100 * len(sorted_us)))] / 1000, 2)


def run_once(target: str, args, rep: int) -> dict:
    rec: dict = {
        "target": target,
        "rep": rep,
        "scenario": args.scenario,
        "n": args.clients,
        "rate": args.rate,
        "duration": args.duration,
        "workers": args.workers,
        "idle_only": args.idle_only,
        "stall_fraction": args.stall_fraction,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    logdir = tempfile.mkdtemp(prefix=f"sse-bench-{target}-")
    rec["logdir"] = logdir
    load_cpus = LOAD_CPUS if args.pin else None
    children: list[procs.Child] = []
    lg: LoadGen | None = None
    cluster: PrivateCluster | None = None
    try:
        if target == "regstream-cluster":
            cluster = PrivateCluster()
            cluster.start()
            redis_pids = [node.pid for node in cluster.nodes() if node.pid is not None]
            for pid in redis_pids:
                os.sched_setaffinity(pid, load_cpus or range(os.cpu_count() or 1))
            redis_port = cluster.masters()[0].port
        else:
            redis, redis_port = procs.start_redis(logdir, load_cpus)
            children.append(redis)
            redis_pids = [redis.pid]
        port = args.port or procs.free_port()
        args.token = None
        server = start_target(target, args, port, redis_port, logdir)
        children.append(server)
        auth = args.auth_header
        if auth == "auto":  # the token --setup-cmd printed (regstream only)
            auth = f"Bearer {args.token}" if target in SERVICE and args.token else None
        procs.wait_port(port, server, args.start_timeout)
        warm_up(port, auth, args.start_timeout)
        time.sleep(args.settle)
        rss0 = procs.rss_kib(procs.tree(server.pid))

        # ---- N streams, a fraction of them stalled (they stop reading once connected)
        n = args.clients
        rnd = random.Random(args.seed + rep)
        stalled = set(rnd.sample(range(n), int(round(args.stall_fraction * n))))
        conns = []
        for j in range(n):
            fid = RID_BASE + j if args.scenario == "filtered" else None
            path = STREAM if fid is None else f"{STREAM}?registrationId={fid}"
            conns.append((j, path, fid, j in stalled))
        cfg = {
            "host": "127.0.0.1",
            "port": port,
            "auth": auth,
            "cpus": sorted(load_cpus) if load_cpus else None,
            "concurrency": 200,
            "connect_timeout": 20.0,
            "ready_timeout": args.ready_timeout,
            "max_s": args.duration + args.drain + args.ready_timeout + 60,
            "resume_s": 3.0,
        }
        lg = LoadGen(conns, args.workers, cfg)
        conn = lg.wait_ready(args.ready_timeout + 30)
        failed_ids = conn.pop("failed_ids")
        watcher = procs.CutWatcher(port, conn.pop("stalled_ports"))
        rec["connect"] = conn
        ready = conn["ready"]

        # ---- idle: memory per stream, Redis connections held by the server, idle CPU
        spids = procs.tree(server.pid)
        c0 = procs.cpu(spids)
        time.sleep(args.idle_settle)
        c1 = procs.cpu(spids)
        rss1 = procs.rss_kib(procs.tree(server.pid))
        rec["idle"] = {
            "rss_kib_before": rss0,
            "rss_kib_after": rss1,
            "rss_kib_per_stream": round((rss1 - rss0) / ready, 2) if ready else None,
            "server_cpu_pct": round(100 * (c1["sched"] - c0["sched"]) / args.idle_settle, 1),
            "redis": procs.redis_clients(redis_port),
        }
        if ready == 0:
            rec["error"] = f"no stream connected: {conn['reasons']}"
            return rec

        active = [j for j in range(n) if j not in failed_ids and j not in stalled]
        alive = [j for j in range(n) if j not in failed_ids]
        if args.idle_only:
            m_total, schedule, expected = 0, [], 0
        elif args.scenario == "filtered":  # shuffled round robin over the connected streams
            m_total = int(round(args.rate * args.duration))
            order = alive[:]
            rnd.shuffle(order)
            schedule = [RID_BASE + order[i % len(order)] for i in range(m_total)]
            act = {RID_BASE + j for j in active}
            expected = sum(1 for rid in schedule if rid in act)
        else:
            m_total = int(round(args.rate * args.duration))
            schedule = [RID_BASE + rnd.randrange(n) for _ in range(m_total)]
            expected = m_total * len(active)

        # ---- measured window: publish at a fixed rate, then drain (bounded)
        spids = procs.tree(server.pid)
        wpids = lg.pids
        lg.send("reset")
        pub: RedisPublisher | HttpPublisher | ScriptPublisher | None = None
        if schedule and (target == "regstream-cluster" or args.publisher == "script"):
            pub = ScriptPublisher(f"redis://127.0.0.1:{redis_port}/0",
                                  PARTITIONS if cluster is not None else 0)  # fmt: skip
        elif schedule:
            pub = HttpPublisher(port) if target == "nchan" else RedisPublisher(redis_port)
        cpu0 = (
            procs.cpu(spids),
            procs.cpu(redis_pids),
            [procs.cpu([p]) for p in wpids],
            procs.cpu([os.getpid()]),
            procs.core_times(),
        )
        t0 = time.monotonic()
        t0_wall = time.time()
        max_lag = 0.0
        for i, rid in enumerate(schedule):
            due = t0 + i / args.rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                max_lag = max(max_lag, now - due)
            pub.send(rid, i)
            pub.read_replies()
            watcher.poll()
        t_pub = time.monotonic()
        if args.idle_only:  # hold the idle streams (pings are counted)
            time.sleep(args.duration)
        end = time.monotonic() + args.drain
        last, last_change = -1, time.monotonic()
        while expected and time.monotonic() < end:
            got = lg.delivered()
            if got != last:
                last, last_change = got, time.monotonic()
            if got >= expected or time.monotonic() - last_change > args.stall_timeout:
                break
            watcher.poll()
            time.sleep(0.01)
        watcher.poll()
        wall = time.monotonic() - t0
        cpu1 = (
            procs.cpu(spids),
            procs.cpu(redis_pids),
            [procs.cpu([p]) for p in wpids],
            procs.cpu([os.getpid()]),
            procs.core_times(),
        )
        rss_end = procs.rss_kib(procs.tree(server.pid))
        replies = pub.finish(len(schedule), 2.0) if pub else {}
        results = lg.results(30)

        # ---- numbers
        lat: list[int] = []
        for r in results:
            a = array.array("q")
            a.frombytes(r["lat_us"])
            lat.extend(a)
        lat.sort()
        got = len(lat)
        d_srv = {k: cpu1[0][k] - cpu0[0][k] for k in cpu1[0]}
        srv_s = d_srv["sched"]
        ticks = (d_srv["user"] + d_srv["sys"]) or 1
        redis_s = cpu1[1]["sched"] - cpu0[1]["sched"]
        clients = [
            round(100 * (b["sched"] - a["sched"]) / wall, 1)
            for a, b in zip(cpu0[2], cpu1[2], strict=True)
        ]
        cores = procs.core_usage(cpu0[4], cpu1[4])
        per = (lambda s: round(1e6 * s / got, 2)) if got else (lambda s: None)
        rec["publish"] = {
            "messages": len(schedule),
            "seconds": round(t_pub - t0, 3),
            "max_lag_ms": round(1000 * max_lag, 1),
            "replies": replies,
        }
        rec["delivery"] = {
            "expected": expected,
            "delivered": got,
            "delivered_pct": round(100 * got / expected, 3) if expected else None,
            "loss_pct": round(100 * (expected - got) / expected, 3) if expected else None,
            "out_of_order": sum(r["ooo"] for r in results),
            "misdelivered": sum(r["misdelivered"] for r in results),
            "dropped_streams": sum(r["dropped"] for r in results),
            "per_s": round(got / max(wall, args.duration), 1),
            "offered_per_s": round(expected / args.duration, 1),
            "window_s": round(wall, 3),
        }
        rec["latency_ms"] = {
            "p50": pct(lat, 50),
            "p90": pct(lat, 90),
            "p99": pct(lat, 99),
            "max": round(lat[-1] / 1000, 2) if lat else None,
        }
        rec["cpu"] = {
            "server_s": round(srv_s, 4),
            "server_us_per_delivery": per(srv_s),
            "server_user_us_per_delivery": per(srv_s * d_srv["user"] / ticks),
            "server_sys_us_per_delivery": per(srv_s * d_srv["sys"] / ticks),
            "server_core_pct": round(100 * srv_s / wall, 1),
            "redis_us_per_delivery": per(redis_s),
            "clients_pct": clients,
            "clients_max_pct": max(clients, default=0.0),
            "clients_total_pct": round(sum(clients), 1),
            "bench_pct": round(100 * (cpu1[3]["sched"] - cpu0[3]["sched"]) / wall, 1),
            "cores": cores,
            "steal_pct": max((c["steal_pct"] for c in cores.values()), default=0.0),
            # CPU 0 busy beyond the server itself: another process on the server's core (a
            # shared machine); the run's latency and throughput are then not the server's alone
            "foreign_cpu0_pct": round(
                cores.get("cpu0", {}).get("busy_pct", 0.0) - 100 * srv_s / wall, 1
            ),
        }
        rec["pings"] = {
            "received": sum(r["pings"] for r in results),
            "max_gap_s": max((r["ping_gap_max_s"] for r in results), default=0),
        }
        if stalled:
            # cut: the server let go of the stream (seen in /proc/net/tcp during the window, or
            # the stream ended when its client resumed reading after the window)
            ended = sum(len(r["stalled_cut_at"]) for r in results)
            seen = sorted(t - t0_wall for t in watcher.cut.values())
            rec["stall"] = {
                "stalled": sum(r["stalled"] for r in results),
                "cut": max(ended, len(seen)),
                "cut_seen_in_window": len(seen),
                "ended_after_resume": ended,
                "cut_first_s": round(seen[0], 2) if seen else None,
                "cut_last_s": round(seen[-1], 2) if seen else None,
                "bytes_read_after_resume": sum(r["stalled_bytes"] for r in results),
                "server_rss_growth_kib": rss_end - rss1,
            }
        rec["client_bound"] = rec["cpu"]["clients_max_pct"] > CLIENT_BOUND_PCT
        return rec
    except Exception as e:  # noqa: BLE001 - a failed run is a result (recorded, reported)
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc(limit=4)
        srv = next((c for c in children if c.name == target), None)
        if srv is not None:
            rec["server_log_tail"] = srv.tail(800)
        return rec
    finally:
        if lg is not None:
            lg.kill()
        for c in reversed(children):
            left = c.stop()
            if left:
                rec.setdefault("warnings", []).append(f"{c.name}: SIGKILLed {left}")
        if cluster is not None:
            cluster.stop()


# ------------------------------------------------------------------------------------ report


def brief(rec: dict) -> str:
    if "error" in rec:
        return f"{rec['target']:>9} rep {rec['rep']}: ERROR {rec['error']}"
    i = rec["idle"]
    head = (
        f"{rec['target']:>9} rep {rec['rep']}: {rec['connect']['ready']}/{rec['n']} streams, "
        f"{i['rss_kib_per_stream']} KiB/stream, redis conns {i['redis']['clients']}"
    )
    if "delivery" not in rec:
        return head
    if rec["idle_only"]:
        p = rec["pings"]
        return (
            f"{head}, idle server core {i['server_cpu_pct']}%, pings {p['received']} "
            f"(max gap {p['max_gap_s']} s)"
        )
    if rec["client_bound"]:
        return (
            f"{head} | CLIENT-BOUND, numbers not reported (client process at "
            f"{rec['cpu']['clients_max_pct']}% of a core)"
        )
    d, lat, c = rec["delivery"], rec["latency_ms"], rec["cpu"]
    s = (
        f"{head} | {d['delivered']}/{d['expected']} delivered, {d['per_s']}/s, "
        f"p50/p99 {lat['p50']}/{lat['p99']} ms, {c['server_us_per_delivery']} us/deliv, "
        f"server {c['server_core_pct']}%, clients {c['clients_pct']}%, steal {c['steal_pct']}%"
    )
    if c["foreign_cpu0_pct"] > 10:
        s += f" | WARNING: other processes used {c['foreign_cpu0_pct']}% of the server's core"
    if "stall" in rec:
        st = rec["stall"]
        s += f" | stalled cut {st['cut']}/{st['stalled']} (first {st['cut_first_s']} s)"
    return s


def med(vals: list) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:,.{nd}f}" if isinstance(v, float) else f"{v:,}"


def get(rec: dict, path: str):
    for k in path.split("."):
        if not isinstance(rec, dict) or k not in rec:
            return None
        rec = rec[k]
    return rec


COLUMNS = [  # (header, path in the record, decimals)
    ("delivered %", "delivery.delivered_pct", 2),
    ("deliveries/s", "delivery.per_s", 0),
    ("p50 ms", "latency_ms.p50", 2),
    ("p90 ms", "latency_ms.p90", 2),
    ("p99 ms", "latency_ms.p99", 1),
    ("max ms", "latency_ms.max", 1),
    ("server µs/deliv", "cpu.server_us_per_delivery", 1),
    ("user", "cpu.server_user_us_per_delivery", 1),
    ("sys", "cpu.server_sys_us_per_delivery", 1),
    ("server core %", "cpu.server_core_pct", 0),
    ("KiB/idle stream", "idle.rss_kib_per_stream", 1),
    ("Redis conns", "idle.redis.clients", 0),
    ("clients max/total %", None, 0),
    ("steal %", "cpu.steal_pct", 0),
    ("other load CPU0 %", "cpu.foreign_cpu0_pct", 0),
]
IDLE_COLUMNS = [
    ("streams", "connect.ready", 0),
    ("failed", "connect.failed", 0),
    ("connect s", "connect.seconds", 1),
    ("KiB/idle stream", "idle.rss_kib_per_stream", 1),
    ("server RSS MiB", None, 0),
    ("idle core %", "idle.server_cpu_pct", 1),
    ("Redis conns", "idle.redis.clients", 0),
    ("subscribed", "idle.redis.subscribed", 0),
    ("pings", "pings.received", 0),
    ("max ping gap s", "pings.max_gap_s", 1),
]


def table(recs: list[dict], targets: list[str], idle: bool) -> str:
    cols = IDLE_COLUMNS if idle else COLUMNS
    stall = any("stall" in r for r in recs)
    heads = ["target", "runs ok"] + [h for h, _, _ in cols]
    if stall:
        heads += ["stalled cut", "first/last cut s", "RSS growth MiB"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for t in targets:
        mine = [r for r in recs if r["target"] == t]
        ok = [r for r in mine if "error" not in r and not r.get("client_bound")]
        row = [t, f"{len(ok)}/{len(mine)}"]
        for h, path, nd in cols:
            if h == "clients max/total %":
                row.append(
                    f"{fmt(med([get(r, 'cpu.clients_max_pct') for r in ok]), 0)}/"
                    f"{fmt(med([get(r, 'cpu.clients_total_pct') for r in ok]), 0)}"
                )
            elif h == "server RSS MiB":
                row.append(fmt(med([get(r, "idle.rss_kib_after") / 1024 for r in ok]), 0))
            else:
                row.append(fmt(med([get(r, path) for r in ok]), nd))
        if stall:
            row += [
                f"{fmt(med([get(r, 'stall.cut') for r in ok]), 0)}/"
                f"{fmt(med([get(r, 'stall.stalled') for r in ok]), 0)}",
                f"{fmt(med([get(r, 'stall.cut_first_s') for r in ok]), 1)}/"
                f"{fmt(med([get(r, 'stall.cut_last_s') for r in ok]), 1)}",
                fmt(med([(get(r, "stall.server_rss_growth_kib") or 0) / 1024 for r in ok]), 1),
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def ratios(recs: list[dict], targets: list[str], reps: int) -> str:
    """Per-rep ratios (runs of one rep ran back to back) of each target to baseline and nchan,
    and to floor (×floor: how many times the pure-Python floor's cost; floor is never the
    numerator)."""
    pairs: list[tuple[str, str]] = [
        (t, ref)
        for ref in ("baseline", "nchan", "floor")
        if ref in targets
        for t in targets
        if t not in (ref, "floor") and (t, ref) != ("baseline", "nchan")
    ]
    if "regstream" in targets and "regstream-cluster" in targets:
        pairs.append(("regstream-cluster", "regstream"))
    if not pairs:
        return ""
    ok = {
        (r["target"], r["rep"]): r for r in recs if "error" not in r and not r.get("client_bound")
    }
    heads = ["rep"] + [f"{a}/{b} {m}" for a, b in pairs for m in ("CPU/deliv", "p99")]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    cols: list[list] = [[] for _ in range(2 * len(pairs))]
    for rep in range(reps):
        row = [str(rep + 1)]
        for k, (a, b) in enumerate(pairs):
            for m, path in enumerate(("cpu.server_us_per_delivery", "latency_ms.p99")):
                x, y = get(ok.get((a, rep), {}), path), get(ok.get((b, rep), {}), path)
                v = round(x / y, 2) if x is not None and y else None
                cols[2 * k + m].append(v)
                row.append(fmt(v, 2))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| median | " + " | ".join(fmt(med(c), 2) for c in cols) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main


def parse(argv: list[str] | None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--targets",
        default="regstream,baseline",
        help="comma list of regstream, baseline, nchan, floor, regstream-cluster "
        "(default %(default)s)",
    )
    ap.add_argument(
        "--publisher",
        choices=["raw", "script"],
        default="raw",
        help="raw: PUBLISH the message on the seed's channel (nchan: POST); script: through the "
        "service's publisher, its Lua script and ids (regstream-cluster always does)",
    )
    ap.add_argument(
        "--scenario",
        choices=["broadcast", "filtered"],
        default="broadcast",
        help="broadcast: no filter, every message to all N; filtered: stream j asks for "
        "registrationId=100000+j, each message goes to one stream",
    )
    ap.add_argument("-n", "--clients", type=int, default=1000, help="SSE streams (default 1000)")
    ap.add_argument("--rate", type=float, default=20.0, help="messages published per second")
    ap.add_argument("--duration", type=float, default=10.0, help="publishing window, seconds")
    ap.add_argument("--reps", type=int, default=3, help="runs per target (medians are reported)")
    ap.add_argument("--workers", type=int, default=2, help="client processes (default 2)")
    ap.add_argument(
        "--idle-only",
        action="store_true",
        help="connect N streams, measure RSS per idle stream and Redis connections, "
        "hold them --duration seconds (pings counted), publish nothing",
    )
    ap.add_argument(
        "--stall-fraction",
        type=float,
        default=0.0,
        help="fraction of streams that stop reading once connected",
    )
    ap.add_argument(
        "--server-cmd",
        help="command for the regstream target; placeholders {port} {redis_url} "
        "{redis_port} {host}; REDIS_URL is also in its environment",
    )
    ap.add_argument(
        "--auth-header",
        help="Authorization value every client sends, e.g. 'Bearer x'; 'auto' = 'Bearer <last "
        "line --setup-cmd printed>' (regstream target only). Default for regstream: a fresh "
        "admin token per run (see --no-auth)",
    )
    ap.add_argument(
        "--no-auth",
        action="store_true",
        help="regstream target: send no Authorization header and create no token (default: a "
        "fresh admin token per run via 'regstream users add', REGSTREAM_STREAMS_PER_USER and "
        "SSE_MAX_STREAMS raised to fit N, unless --auth-header or --server-env say otherwise)",
    )
    ap.add_argument(
        "--setup-cmd",
        help="run before each regstream start with its environment, e.g. "
        "'regstream users add bench --role viewer --no-password --token'",
    )
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the regstream target (repeatable), "
        "e.g. REGSTREAM_STREAMS_PER_USER=20000",
    )
    ap.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    ap.add_argument(
        "--ping-interval",
        type=float,
        help="SSE_PING_INTERVAL given to the servers (default: theirs)",
    )
    ap.add_argument(
        "--drain",
        type=float,
        default=10.0,
        help="max seconds to wait for deliveries after publishing",
    )
    ap.add_argument(
        "--stall-timeout",
        type=float,
        default=3.0,
        help="stop draining after this long without progress",
    )
    ap.add_argument("--settle", type=float, default=1.0, help="pause before the first RSS reading")
    ap.add_argument("--idle-settle", type=float, default=2.0, help="idle pause before measuring")
    ap.add_argument("--start-timeout", type=float, default=60.0, help="server start bound, seconds")
    ap.add_argument("--ready-timeout", type=float, default=90.0, help="bound for connecting N")
    ap.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin (default: server on CPU 0; Redis, clients, publisher on CPU 1)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--out",
        default=os.path.join(BENCH, "results", "sse_bench.jsonl"),
        help="JSON lines appended here (default %(default)s)",
    )
    a = ap.parse_args(argv)
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    if any("=" not in kv for kv in a.server_env):
        ap.error("--server-env takes KEY=VALUE")
    a.server_env = dict(kv.split("=", 1) for kv in a.server_env)
    if a.auth_header and a.auth_header.lower().startswith("authorization:"):
        a.auth_header = a.auth_header.split(":", 1)[1].strip()
    # default for regstream (auth is on): create an admin token per run and send it
    a.auto_auth = bool(set(SERVICE) & set(a.targets)) and not a.auth_header and not a.no_auth
    if a.auto_auth:
        a.auth_header = "auto"
    bad = [t for t in a.targets if t not in TARGETS]
    if bad:
        ap.error(f"unknown targets {bad}")
    if not (
        1 <= a.clients <= 20000
        and 0 < a.duration <= 120
        and 0 < a.rate <= 20000
        and a.rate * a.duration <= 500_000
        and 1 <= a.reps <= 10
        and 1 <= a.workers <= 16
        and 0 <= a.stall_fraction < 1
    ):
        ap.error(
            "bounds: 1<=n<=20000, duration<=120 s, rate*duration<=500000, reps<=10, "
            "workers<=16, 0<=stall-fraction<1"
        )
    if a.pin and os.cpu_count() < 2:
        ap.error("pinning needs 2 CPUs (use --no-pin)")
    return a


def _sigterm(signum, frame):
    raise SystemExit(f"terminated by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    args = parse(argv)
    if args.pin:
        os.sched_setaffinity(0, LOAD_CPUS)  # the publisher shares the load core
    procs.raise_nofile()
    targets = list(args.targets)
    if "nchan" in targets and (why := nchan_available()):
        print(f"nchan: skipped ({why})")
        targets.remove("nchan")
    invocation = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
    what = "idle-only" if args.idle_only else f"rate {args.rate:g} msg/s for {args.duration:g} s"
    print(
        f"# {args.scenario}, N={args.clients}, {what}, stall {args.stall_fraction:g}, "
        f"{args.reps} reps, targets {','.join(targets)}, {args.workers} client processes"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    recs = []
    for rep in range(args.reps):
        for t in targets:
            rec = run_once(t, args, rep)
            rec["invocation"] = invocation
            recs.append(rec)
            with open(args.out, "a") as f:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
            print(brief(rec), flush=True)
    print()
    print(table(recs, targets, args.idle_only))
    if not args.idle_only:
        r = ratios(recs, targets, args.reps)
        if r:
            print(
                "\nper-rep ratios (server CPU µs per delivery, p99 latency; < 1 = cheaper/faster)"
            )
            print(r)
    bound = [r for r in recs if r.get("client_bound")]
    errors = [r for r in recs if "error" in r]
    print(f"\nresults appended to {args.out} (invocation {invocation})")
    if bound:
        print(
            f"CLIENT-BOUND, numbers not reported: {len(bound)} run(s) had a client process above "
            f"{CLIENT_BOUND_PCT:.0f}% of a core; lower --rate or add --workers"
        )
        return 3
    if errors:
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
