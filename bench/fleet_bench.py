"""Rolling restart of a fleet behind nginx with thousands of open streams: is any update lost or
delivered twice? (issue 15: 3 instances, 3,000 streams, 0 lost and 0 duplicated updates by
``(registrationId, seq)``.)

Starts, on loopback, and stops by PID at the end: a private redis-server, a fresh PostgreSQL
database (127.0.0.1:5432 unless ``--pg-admin-url``; dropped at the end), the T24 simulator
(``regstream t24-sim``), three ``regstream serve`` instances (migrated once with ``regstream
migrate``) and Debian's nginx with the shipped configuration (``deploy/nginx``, rendered for
loopback by ``tests/fleet_support.py``). Then:

1. creates ``-k`` registrations, opens ``-n`` streams through nginx over TLS (``--unfiltered`` of
   them unfiltered, the rest filtered, spread over the registrations) and waits until every one
   is connected;
2. validates the registrations in waves (``--wave`` every ``--wave-every`` s) while it restarts
   the instances one at a time: SIGTERM (the drain, with the service's default delay, spread
   and grace unless ``--server-env`` says otherwise), wait for the exit, start again, wait for
   ``/readyz``, next;
3. waits until every registration is final in the database and every stream has caught up,
   then compares each stream with the database's process log.

The streams are raw asyncio TLS connections (HTTP/1.1, chunked), one task each, that behave like
``EventSource``: on the end of a response or a broken connection they wait the last ``retry:``
(or a refusal's ``Retry-After``) and reconnect with ``Last-Event-ID``. What each one saw is kept
by ``tests/integration/viewer.py``'s ``Viewer`` (duplicates, gaps, snapshots, resyncs).

    .venv/bin/python bench/fleet_bench.py -n 3000 -k 1200

Prints one JSON object and appends it to ``bench/results/fleet_bench.jsonl``; exit status 1 when
any update was lost or duplicated or a stream did not catch up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import ssl
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import procs  # noqa: E402
from tests.fleet_support import make_cert, nginx_argv, render_nginx  # noqa: E402
from tests.integration.viewer import Viewer  # noqa: E402

from regstream.core_banking.simulator.dataset import load_applicant  # noqa: E402

STREAM = "/api/registrations/updates/stream"
FINAL = ("APPROVED", "COMPLETED", "DUPLICATE", "FAILED")


class RawStream:
    """One EventSource-like stream on a raw TLS connection through nginx."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, auth: str,
                 registration_id: int | None) -> None:  # fmt: skip
        self.host, self.port, self.ctx, self.auth = host, port, ctx, auth
        self.registration_id = registration_id
        self.viewer = Viewer(f"https://{host}:{port}", {"Authorization": auth},
                             registration_id=registration_id)  # fmt: skip
        self.retry_ms = 1000
        self.refused: dict[int, int] = {}
        self.drops = 0
        self.connected = asyncio.Event()
        self.reconnect_times: list[float] = []
        self.open = False  # a response is being read now
        self.deferred = 0  # start-ups the instance's admission gate told to come back later
        self.last_frame_at = 0.0

    def _request(self) -> bytes:
        target = STREAM + (
            f"?registrationId={self.registration_id}" if self.registration_id else ""
        )
        lines = [f"GET {target} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 f"Authorization: {self.auth}", "Accept: text/event-stream"]  # fmt: skip
        if self.viewer.last_id:
            lines.append(f"Last-Event-ID: {self.viewer.last_id}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def run(self, scope: list[int], until: asyncio.Event, deadline: float,
                  http: httpx.AsyncClient) -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        first = True
        while loop.time() < deadline:
            if until.is_set() and self.viewer.complete(scope):
                return
            if not first:
                self.reconnect_times.append(time.time())
            first = False
            wait = await self._session(scope, until, deadline, http)
            if until.is_set() and self.viewer.complete(scope):
                return
            await asyncio.sleep(wait)

    async def _session(self, scope: list[int], until: asyncio.Event, deadline: float,
                       http: httpx.AsyncClient) -> float:  # fmt: skip
        loop = asyncio.get_running_loop()
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                self.host, self.port, ssl=self.ctx, server_hostname=self.host), 20)  # fmt: skip
            writer.write(self._request())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                self.refused[status] = self.refused.get(status, 0) + 1
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"retry-after:"):
                        with contextlib.suppress(ValueError):
                            return float(line.split(b":", 1)[1])
                return self.retry_ms / 1000
            headers = head.lower()
            if b"transfer-encoding: chunked" not in headers:
                # a whole body with Content-Length: the admission gate's deferral ("retry: N",
                # ": busy", no id), which an EventSource reads and then reconnects after N ms
                length = 0
                for line in headers.split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await asyncio.wait_for(reader.readexactly(length), 30)
                for block in body.decode().split("\n\n"):
                    if block.strip():
                        self._frame(block)
                self.deferred += 1
                return self.retry_ms / 1000
            self.viewer.connections += 1
            self.connected.set()
            self.open = True
            buffer = b""
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    return self.retry_ms / 1000  # the server ended the stream
                chunk = await reader.readexactly(size + 2)
                buffer += chunk[:-2]
                while b"\n\n" in buffer:
                    block, buffer = buffer.split(b"\n\n", 1)
                    self._frame(block.decode())
                    if self.viewer.needs_resync:
                        await self.viewer.resync(http, scope)
                if (until.is_set() and self.viewer.complete(scope)) or loop.time() > deadline:
                    return 0.0
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ValueError, ssl.SSLError):  # fmt: skip
            self.drops += 1
            return self.retry_ms / 1000
        finally:
            self.open = False
            if writer is not None:
                writer.close()

    def _frame(self, block: str) -> None:
        self.last_frame_at = time.time()
        event_id, data = None, []
        for line in block.split("\n"):
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
            elif line.startswith("retry:") and line[6:].strip().isdigit():
                self.retry_ms = int(line[6:].strip())
        if data:
            self.viewer.apply(json.loads("\n".join(data)), event_id)


def regstream(env: dict[str, str], *args: str) -> str:
    import subprocess

    out = subprocess.run([sys.executable, "-m", "regstream", *args], env=env, capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"regstream {args[0]} exited {out.returncode}: {out.stderr[-800:]}")
    return out.stdout


def start_instance(n: int, gen: int, port: int, env: dict[str, str], logdir: str) -> procs.Child:
    argv = [sys.executable, "-m", "regstream", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return procs.Child(f"regstream-{n}-{gen}", argv, None, logdir, env=env)


async def wait_ready(port: int, child: procs.Child, timeout: float) -> None:
    end = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < end:
            if child.p.poll() is not None:
                raise RuntimeError(f"{child.name} exited: {child.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{child.name} not ready after {timeout} s: {child.tail()}")


async def bench(args: argparse.Namespace, logdir: str) -> dict[str, Any]:
    children: list[procs.Child] = []
    db_name = f"regstream_fleet_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.pg_admin_url, timeout=10)
    await admin.execute(f'CREATE DATABASE "{db_name}"')
    await admin.close()
    base_pg = args.pg_admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    db_url = f"{base_pg}/{db_name}"
    rec: dict[str, Any] = {"bench": "fleet_bench", "n": args.n, "k": args.k,
                           "unfiltered": args.unfiltered, "server_env": args.server_env}  # fmt: skip
    try:
        redis, redis_port = procs.start_redis(logdir, None)
        children.append(redis)
        sim_port = procs.free_port()
        sim = procs.Child("t24-sim", [sys.executable, "-m", "regstream", "t24-sim", "--port",
                                      str(sim_port), "--latency-ms", str(args.t24_latency_ms)],
                          None, logdir)  # fmt: skip
        children.append(sim)
        procs.wait_port(sim_port, sim, 30)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("REDIS_", "REGSTREAM_", "T24_", "DATABASE_", "SSE_"))}  # fmt: skip
        env.update(
            DATABASE_URL=db_url, REDIS_URL=f"redis://127.0.0.1:{redis_port}",
            T24_BASE_URL=f"http://127.0.0.1:{sim_port}/api/v1.0.0",
            REGSTREAM_SECRET_KEY="fleet-bench-" + uuid.uuid4().hex + uuid.uuid4().hex,
            REGSTREAM_DATA_DIR=os.path.join(logdir, "cli"), REGSTREAM_MIGRATE_ON_START="false",
            REGSTREAM_TRUST_PROXY="true", REGSTREAM_PROCESS_RATE_PER_MINUTE="1000000",
            REGSTREAM_STREAMS_PER_USER=str(args.n + 100), SSE_MAX_STREAMS=str(args.n + 100),
        )  # fmt: skip
        for item in args.server_env:
            key, _, value = item.partition("=")
            env[key] = value
        regstream(env, "migrate")
        token = regstream(env, "users", "add", f"bench-{random.randrange(16**8):08x}", "--role",
                          "admin", "--no-password", "--token").split()[-1]  # fmt: skip
        auth = f"Bearer {token}"
        ports = [procs.free_port() for _ in range(3)]
        envs = [{**env, "REGSTREAM_DATA_DIR": os.path.join(logdir, f"i{n}")} for n in range(3)]
        fleet = [start_instance(n, 0, ports[n], envs[n], logdir) for n in range(3)]
        children += fleet
        await asyncio.gather(*(wait_ready(p, c, 90) for p, c in zip(ports, fleet, strict=True)))

        cert = make_cert(Path(logdir) / "tls")
        https_port = procs.free_port()
        conf = render_nginx(Path(logdir) / "nginx", upstream_ports=ports, http_port=procs.free_port(),
                            https_port=https_port, cert=cert, worker_connections=16000)  # fmt: skip
        nginx = procs.Child("nginx", nginx_argv(conf, "-g", "daemon off;"), None, logdir)
        children.append(nginx)
        procs.wait_port(https_port, nginx, 15)
        ctx = cert.client_context()
        base = f"https://127.0.0.1:{https_port}"
        loop = asyncio.get_running_loop()
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=base, verify=ctx, headers={"Authorization": auth},
                                     timeout=30, limits=limits) as http:  # fmt: skip
            run = random.randrange(10, 99)
            gate = asyncio.Semaphore(16)

            async def create(i: int) -> int:
                body = load_applicant(run * 1_000_000 + i)
                async with gate:
                    resp = await http.post("/api/registrations", json=body)
                resp.raise_for_status()
                return int(resp.json()["id"])

            t = time.monotonic()
            rids = list(await asyncio.gather(*(create(i) for i in range(args.k))))
            rec["create_s"] = round(time.monotonic() - t, 1)

            streams = [RawStream("127.0.0.1", https_port, ctx, auth, None)
                       for _ in range(args.unfiltered)]  # fmt: skip
            streams += [RawStream("127.0.0.1", https_port, ctx, auth, rids[j % len(rids)])
                        for j in range(args.n - args.unfiltered)]  # fmt: skip
            until = asyncio.Event()
            deadline = loop.time() + args.timeout
            tasks = []
            t = time.monotonic()
            for j, stream in enumerate(streams):
                scope = [stream.registration_id] if stream.registration_id else rids
                tasks.append(asyncio.create_task(stream.run(scope, until, deadline, http)))
                if j % 100 == 99:
                    await asyncio.sleep(0.05)  # open at ~2,000/s, not all in one turn
            await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in streams)), 120)
            rec["connect_s"] = round(time.monotonic() - t, 1)
            rec["nginx_rss_kib"] = procs.rss_kib(procs.tree(nginx.pid))

            async def waves() -> None:
                for i in range(0, len(rids), args.wave):
                    chunk = rids[i : i + args.wave]
                    resp = await http.post("/api/registrations/process",
                                           json={"registrationIds": chunk})  # fmt: skip
                    resp.raise_for_status()
                    if sorted(resp.json()["accepted"]) != sorted(chunk):
                        raise RuntimeError(f"not all accepted: {resp.text[:300]}")
                    await asyncio.sleep(args.wave_every)

            cpu0 = {c.name: procs.cpu(procs.tree(c.pid)) for c in [*fleet, nginx, redis]}
            t0 = time.monotonic()
            wave_task = asyncio.create_task(waves())
            pg = await asyncpg.connect(db_url.replace("postgresql+asyncpg://", "postgresql://"))
            all_final = asyncio.Event()

            async def watch_final() -> None:
                while True:
                    done = await pg.fetchval(
                        "SELECT count(*) FROM registration_requests WHERE id = ANY($1::bigint[])"
                        " AND NOT in_progress AND status = ANY($2::text[])",
                        rids,
                        list(FINAL),
                    )
                    if done == len(rids):
                        rec["validate_s"] = round(time.monotonic() - t0, 1)
                        all_final.set()
                        return
                    await asyncio.sleep(0.25)

            final_task = asyncio.create_task(watch_final())
            await asyncio.sleep(args.first_restart_after)
            restarts = []
            for n in range(3):
                old = fleet[n]
                began = time.monotonic()
                os.kill(old.pid, 15)
                try:
                    await asyncio.to_thread(old.p.wait, 60)
                except Exception as exc:  # noqa: BLE001 - reported, and the bench fails
                    raise RuntimeError(f"{old.name} did not exit 60 s after SIGTERM") from exc
                exited = time.monotonic()
                new = start_instance(n, 1, ports[n], envs[n], logdir)
                children.append(new)
                fleet[n] = new
                await wait_ready(ports[n], new, 90)
                restarts.append({"instance": n, "at_s": round(began - t0, 1),
                                 "exit_s": round(exited - began, 1),
                                 "back_s": round(time.monotonic() - exited, 1)})  # fmt: skip
                await asyncio.sleep(args.pause)
            rec["restarts"] = restarts
            await wave_task

            try:
                await asyncio.wait_for(final_task, args.timeout)
                until.set()
                _, late = await asyncio.wait(tasks, timeout=60)
                now = time.time()
                rec["late_sample"] = [
                    {"filter": s.registration_id, "open": s.open, "connections": s.viewer.connections,
                     "drops": s.drops, "last_frame_ago_s": round(now - s.last_frame_at, 1),
                     "last_id": s.viewer.last_id,
                     "seen": {r: v.seqs[-1:] for r, v in list(s.viewer.views.items())[:3]}}
                    for s, t in zip(streams, tasks, strict=True) if t in late
                ][:8]  # fmt: skip
                rec["late_open"] = sum(1 for s, t in zip(streams, tasks, strict=True)
                                       if t in late and s.open)  # fmt: skip
                for task in late:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                rec["late_streams"] = len(late)
                rows = await pg.fetch(
                    "SELECT registration_id, seq FROM process_log"
                    " WHERE registration_id = ANY($1::bigint[]) ORDER BY registration_id, seq",
                    rids,
                )
                statuses = dict(
                    await pg.fetch(
                        "SELECT id, status FROM registration_requests WHERE id = ANY($1::bigint[])",
                        rids,
                    )
                )
                finals = await pg.fetchval(
                    "SELECT count(*) FROM process_log WHERE registration_id = ANY($1::bigint[])"
                    " AND stage IS NULL", rids)  # fmt: skip
            finally:
                await pg.close()
            cpu1 = {c.name: procs.cpu(procs.tree(c.pid)) for c in [*fleet, nginx, redis]}

        expected: dict[int, list[int]] = {}
        for row in rows:
            expected.setdefault(row["registration_id"], []).append(row["seq"])
        lost = duplicated = gaps = wrong_status = 0
        for stream in streams:
            viewer = stream.viewer
            duplicated += viewer.duplicates
            gaps += viewer.gaps
            scope = [stream.registration_id] if stream.registration_id else rids
            for rid in scope:
                view = viewer.views.get(rid)
                seen = set(view.seqs) if view else set()
                lost += len(set(expected.get(rid, [])) - seen)
                if view is None or view.status != statuses[rid]:
                    wrong_status += 1
        reconnects = sorted(t for s in streams for t in s.reconnect_times)
        per_second: dict[int, int] = {}
        for moment in reconnects:
            per_second[int(moment)] = per_second.get(int(moment), 0) + 1
        refused: dict[int, int] = {}
        for stream in streams:
            for status, count in stream.refused.items():
                refused[status] = refused.get(status, 0) + count
        rec.update(
            registrations=len(rids), final_rows=finals, updates_in_db=len(rows),
            lost=lost, duplicated=duplicated, gaps=gaps, wrong_final_status=wrong_status,
            streams=len(streams), reconnects=len(reconnects),
            reconnects_peak_per_s=max(per_second.values(), default=0),
            snapshots=sum(s.viewer.snapshots for s in streams),
            resyncs=sum(s.viewer.resyncs for s in streams),
            deferred=sum(s.deferred for s in streams),
            drops=sum(s.drops for s in streams), refused=refused,
            deliveries=sum(len(s.viewer.views.get(r).seqs) if s.viewer.views.get(r) else 0
                           for s in streams for r in ([s.registration_id] if s.registration_id
                                                      else rids)),
            cpu_s={name: round(cpu1[name]["user"] + cpu1[name]["sys"]
                               - cpu0[name]["user"] - cpu0[name]["sys"], 2)
                   for name in cpu1 if name in cpu0},
        )  # fmt: skip
        return rec
    finally:
        for child in reversed(children):
            with contextlib.suppress(Exception):
                child.stop()
        with contextlib.suppress(Exception):
            admin = await asyncpg.connect(args.pg_admin_url, timeout=10)
            await admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            await admin.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=3000, help="open streams")
    ap.add_argument("-k", type=int, default=1200, help="registrations validated")
    ap.add_argument(
        "--unfiltered",
        type=int,
        default=50,
        help="unfiltered streams among -n (each gets every update)",
    )
    ap.add_argument("--wave", type=int, default=40, help="registrations per bulk request")
    ap.add_argument("--wave-every", type=float, default=4.0, help="seconds between waves")
    ap.add_argument("--first-restart-after", type=float, default=3.0)
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between two restarts")
    ap.add_argument("--t24-latency-ms", type=float, default=100.0)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--pg-admin-url", default=os.environ.get(
        "TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test"))  # fmt: skip
    ap.add_argument("--logdir", help="keep every process's log here (default: a temporary dir)")
    args = ap.parse_args(argv)
    if args.unfiltered > args.n:
        ap.error("--unfiltered must not exceed -n")
    procs.raise_nofile()
    with contextlib.ExitStack() as stack:
        if args.logdir:
            os.makedirs(args.logdir, exist_ok=True)
            logdir = args.logdir
        else:
            logdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-bench-"))
        try:
            rec = asyncio.run(bench(args, logdir))
        except Exception as exc:
            print(f"fleet_bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    rec["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(json.dumps(rec, indent=1))
    os.makedirs(BENCH / "results", exist_ok=True)
    with open(BENCH / "results" / "fleet_bench.jsonl", "a") as out:
        out.write(json.dumps(rec) + "\n")
    ok = rec["lost"] == 0 and rec["duplicated"] == 0 and rec["late_streams"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
