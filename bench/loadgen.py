"""SSE load generator: W worker processes, each holding many raw-socket SSE connections.

A worker is one epoll loop over non-blocking sockets (no asyncio, no HTTP library): per received
chunk it does one `recvmsg` (with the kernel's receive timestamp, SO_TIMESTAMPNS) and one compiled
regex over the bytes. Every update frame carries `"bench":"<registrationId>:<seq>:<send_time_ns>"`
in its JSON, so latency = kernel receive time - send time (same machine, CLOCK_REALTIME). Using the
kernel timestamp means time a chunk waits inside this process behind other connections is not
charged to the server.

The orchestrator (`LoadGen`) talks to workers over a pipe: workers report "ready" after connecting,
then publish their delivery count into shared memory until told to stop, then return their results.
"""

from __future__ import annotations

import array
import contextlib
import errno
import multiprocessing as mp
import os
import re
import select
import signal
import socket
import struct
import time

MARK = re.compile(rb'"bench":\s*"(\d+):(\d+):(\d+)"')
HEAD = b'"bench"'
PING = b'"ping"'
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TS = struct.Struct("qq")
LINGER0 = struct.pack("ii", 1, 0)
STALLED_RCVBUF = 16384  # stalled clients shrink their kernel buffer so the server's one fills
IN, OUT, RDHUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP
ERR = select.EPOLLERR | select.EPOLLHUP

CONNECTING, HEADERS, FIRST, READY, STALLED, DEAD = range(6)


class Conn:
    __slots__ = (
        "j",
        "sock",
        "req",
        "fid",
        "stalled",
        "state",
        "buf",
        "count",
        "last_seq",
        "ooo",
        "mis",
        "last_ping",
        "t_start",
        "cut_at",
        "stalled_bytes",
    )

    def __init__(self, j: int, req: bytes, fid: bytes | None, stalled: bool) -> None:
        self.j, self.req, self.fid, self.stalled = j, req, fid, stalled
        self.sock: socket.socket | None = None
        self.state = CONNECTING
        self.buf = b""
        self.count = self.ooo = self.mis = self.stalled_bytes = 0
        self.last_seq = -1
        self.last_ping = 0
        self.t_start = 0.0
        self.cut_at: float | None = None


class Worker:
    def __init__(self, cfg: dict, pipe, counters, idx: int) -> None:
        self.cfg, self.pipe, self.counters, self.idx = cfg, pipe, counters, idx
        self.ep = select.epoll()
        self.by_fd: dict[int, Conn] = {}
        self.lat = array.array("q")
        self.failed: dict[str, int] = {}
        self.dropped = 0
        self.pings = 0
        self.ping_gap_max_ns = 0
        self.n_ready = 0
        self.stop = False

    # ---------------------------------------------------------------- connection handling
    def open(self, c: Conn) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        if c.stalled:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF)
        c.sock, c.t_start = s, time.monotonic()
        err = s.connect_ex((self.cfg["host"], self.cfg["port"]))
        if err not in (0, errno.EINPROGRESS):
            self.fail(c, f"connect:{errno.errorcode.get(err, err)}")
            return
        self.by_fd[s.fileno()] = c
        self.ep.register(s.fileno(), OUT | ERR)

    def fail(self, c: Conn, why: str) -> None:
        if c.state in (READY, STALLED):
            self.dropped += 1
        elif c.state != DEAD:
            self.failed[why] = self.failed.get(why, 0) + 1
        c.state = DEAD
        self.close(c)

    def close(self, c: Conn, abort: bool = False) -> None:
        s = c.sock
        if s is None or s.fileno() < 0:
            return
        fd = s.fileno()
        with contextlib.suppress(OSError):
            self.ep.unregister(fd)
        self.by_fd.pop(fd, None)
        if abort:  # RST instead of FIN: no TIME_WAIT pile-up between runs
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
        s.close()

    def on_event(self, c: Conn, ev: int) -> None:
        s = c.sock
        if c.state == CONNECTING:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err or ev & ERR:
                self.fail(c, f"connect:{errno.errorcode.get(err, err)}")
                return
            try:
                s.send(c.req)  # a few hundred bytes into an empty socket buffer
            except OSError as e:
                self.fail(c, f"send:{type(e).__name__}")
                return
            c.state = HEADERS
            self.ep.modify(s.fileno(), IN | ERR)
            return
        if c.state == STALLED:  # not reading: only a hang-up/reset wakes us
            if c.cut_at is None:
                c.cut_at = time.time()
            self.ep.unregister(s.fileno())  # HUP/ERR would fire on every poll otherwise
            return
        try:
            data, anc, _, _ = s.recvmsg(65536, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.fail(c, f"recv:{type(e).__name__}")
            return
        if not data:
            self.fail(c, "closed:eof")
            return
        if anc:
            sec, nsec = TS.unpack_from(anc[0][2])
            now = sec * 1_000_000_000 + nsec
        else:
            now = time.time_ns()
        if c.state != READY:
            self.handshake(c, data, now)
        else:
            self.feed(c, data, now)

    def handshake(self, c: Conn, data: bytes, now: int) -> None:
        c.buf += data
        if c.state == HEADERS:
            i = c.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            status = c.buf.split(b"\r\n", 1)[0]
            if b" 200" not in status:
                self.fail(c, "http:" + status.decode(errors="replace")[9:40])
                return
            c.buf = c.buf[i + 4 :]
            c.state = FIRST
        if b"\n\n" not in c.buf and b"\n\r\n" not in c.buf:
            return
        # ready once the first complete SSE block arrived (connected frame, nchan's ": hi", ...)
        self.n_ready += 1
        c.last_ping = now
        rest, c.buf = c.buf, b""
        if c.stalled:
            c.state = STALLED
            self.ep.modify(c.sock.fileno(), RDHUP | ERR)
            return
        c.state = READY
        self.feed(c, rest, now)

    def feed(self, c: Conn, data: bytes, now: int) -> None:
        buf = c.buf + data if c.buf else data
        pos = 0
        lat = self.lat
        for m in MARK.finditer(buf):
            rid, seq, ts = m.groups()
            lat.append((now - int(ts)) // 1000)
            s = int(seq)
            if s <= c.last_seq:
                c.ooo += 1
            c.last_seq = s
            if c.fid is not None and rid != c.fid:
                c.mis += 1
            c.count += 1
            pos = m.end()
        if PING in data:
            self.pings += 1
            gap = now - c.last_ping
            if gap > self.ping_gap_max_ns:
                self.ping_gap_max_ns = gap
            c.last_ping = now
        k = buf.find(HEAD, pos)  # keep a marker split across two chunks
        c.buf = buf[k:] if k >= 0 else buf[max(pos, len(buf) - len(HEAD)) :]

    # ---------------------------------------------------------------- phases
    def poll(self, timeout: float) -> None:
        for fd, ev in self.ep.poll(timeout, 1024):
            if fd == self.pipe_fd:
                self.command()
                continue
            c = self.by_fd.get(fd)
            if c is not None:
                self.on_event(c, ev)

    def command(self) -> None:
        msg = self.pipe.recv()
        if msg == "reset":  # forget what arrived before the measured window
            self.lat = array.array("q")
            self.pings = self.ping_gap_max_ns = 0
            for c in self.conns:
                c.count = c.ooo = c.mis = 0
        elif msg == "stop":
            self.stop = True

    def run(self) -> None:
        cfg = self.cfg
        self.pipe_fd = self.pipe.fileno()
        self.ep.register(self.pipe_fd, IN)
        host, port, auth = cfg["host"], cfg["port"], cfg.get("auth")
        extra = f"Authorization: {auth}\r\n" if auth else ""
        self.conns = [
            Conn(
                j,
                (
                    f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
                    f"Cache-Control: no-cache\r\n{extra}User-Agent: regstream-bench\r\n\r\n"
                ).encode(),
                None if fid is None else str(fid).encode(),
                stalled,
            )
            for j, path, fid, stalled in cfg["conns"]
        ]
        # connect: at most `concurrency` handshakes in flight, each bounded by connect_timeout
        t0 = time.monotonic()
        deadline = t0 + cfg["ready_timeout"]
        pending = list(reversed(self.conns))
        inflight: list[Conn] = []
        while time.monotonic() < deadline:
            inflight = [c for c in inflight if c.state in (CONNECTING, HEADERS, FIRST)]
            while pending and len(inflight) < cfg["concurrency"]:
                c = pending.pop()
                self.open(c)
                inflight.append(c)
            if not inflight and not pending:
                break
            self.poll(0.05)
            now = time.monotonic()
            for c in inflight:
                if (
                    c.state in (CONNECTING, HEADERS, FIRST)
                    and now - c.t_start > cfg["connect_timeout"]
                ):
                    self.fail(c, "timeout:first-frame")
        for c in self.conns:
            if c.state in (CONNECTING, HEADERS, FIRST):
                self.fail(c, "timeout:ready")
        self.pipe.send(
            {
                "ready": self.n_ready,
                "failed": self.failed,
                "failed_ids": [c.j for c in self.conns if c.state == DEAD],
                "stalled_ports": [
                    c.sock.getsockname()[1] for c in self.conns if c.state == STALLED
                ],
                "connect_s": round(time.monotonic() - t0, 2),
            }
        )
        # measured phase: bounded by the orchestrator's stop (and by max_s as a backstop)
        end = time.monotonic() + cfg["max_s"]
        counters, idx = self.counters, self.idx
        while not self.stop and time.monotonic() < end:
            self.poll(0.02)
            counters[idx] = len(self.lat)
        counters[idx] = len(self.lat)
        res = self.result()
        self.pipe.send(res)
        for c in self.conns:
            self.close(c, abort=True)

    def result(self) -> dict:
        # stalled clients start reading again: a connection the server cut ends (EOF/RST) quickly
        stalled = [c for c in self.conns if c.state == STALLED]
        for c in stalled:
            try:
                self.ep.modify(c.sock.fileno(), IN | ERR)
            except FileNotFoundError:
                self.ep.register(c.sock.fileno(), IN | ERR)
        resume_end = time.monotonic() + (self.cfg["resume_s"] if stalled else 0)
        while time.monotonic() < resume_end and any(c.state == STALLED for c in stalled):
            for fd, _ in self.ep.poll(0.05, 1024):
                c = self.by_fd.get(fd)
                if c is None or c.state != STALLED:
                    continue
                try:
                    data = c.sock.recv(1 << 20)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data:
                    c.stalled_bytes += len(data)
                    continue
                c.state = DEAD
                if c.cut_at is None:
                    c.cut_at = -1.0  # cut, but only noticed once we read again
                self.close(c)
        counts = [c.count for c in self.conns if not c.stalled and c.state == READY]
        return {
            "received": len(self.lat),
            "lat_us": self.lat.tobytes(),
            "ooo": sum(c.ooo for c in self.conns),
            "misdelivered": sum(c.mis for c in self.conns),
            "dropped": self.dropped,
            "min_per_conn": min(counts, default=0),
            "pings": self.pings,
            "ping_gap_max_s": round(self.ping_gap_max_ns / 1e9, 3),
            "stalled": len(stalled),
            "stalled_cut_at": [c.cut_at for c in stalled if c.cut_at is not None],
            "stalled_bytes": sum(c.stalled_bytes for c in stalled),
        }


def worker_main(cfg: dict, pipe, counters, idx: int) -> None:
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the bench
    if cfg.get("cpus"):
        os.sched_setaffinity(0, set(cfg["cpus"]))
    import resource

    with contextlib.suppress(ValueError, OSError):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator handles Ctrl-C
    Worker(cfg, pipe, counters, idx).run()


class LoadGen:
    """Orchestrator side: start workers, wait for readiness, read progress, collect results."""

    def __init__(self, conns: list[tuple[int, str, int | None, bool]], workers: int, cfg: dict):
        ctx = mp.get_context("spawn")
        workers = max(1, min(workers, len(conns) or 1))
        self.counters = ctx.RawArray("q", workers)
        self.procs: list = []
        for w in range(workers):
            wcfg = {**cfg, "conns": conns[w::workers]}
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(wcfg, child, self.counters, w), daemon=True)
            p.start()
            self.procs.append((p, parent))
        self.pids = [p.pid for p, _ in self.procs]

    def wait_ready(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        ready, failed, secs, ids, ports = 0, {}, 0.0, set(), set()
        for p, pipe in self.procs:
            if not pipe.poll(max(0.1, end - time.monotonic())):
                raise RuntimeError(f"client worker {p.pid} never reported readiness")
            m = pipe.recv()
            ready += m["ready"]
            secs = max(secs, m["connect_s"])
            ids.update(m["failed_ids"])
            ports.update(m["stalled_ports"])
            for k, v in m["failed"].items():
                failed[k] = failed.get(k, 0) + v
        return {
            "ready": ready,
            "failed": sum(failed.values()),
            "reasons": failed,
            "seconds": secs,
            "failed_ids": ids,
            "stalled_ports": ports,
        }

    def send(self, msg: str) -> None:
        for _, pipe in self.procs:
            pipe.send(msg)

    def delivered(self) -> int:
        return sum(self.counters)

    def results(self, timeout: float) -> list[dict]:
        self.send("stop")
        out = []
        end = time.monotonic() + timeout
        for p, pipe in self.procs:
            if not pipe.poll(max(0.1, end - time.monotonic())):
                raise RuntimeError(f"client worker {p.pid} returned no results")
            out.append(pipe.recv())
        return out

    def kill(self) -> None:
        for p, pipe in self.procs:
            if p.is_alive():
                with contextlib.suppress(OSError):
                    pipe.send("stop")
        for p, _ in self.procs:
            p.join(3)
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.join(2)
