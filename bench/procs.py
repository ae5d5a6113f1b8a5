"""Process control and /proc readers for the benchmarks (Linux only).

Every process the benchmarks start goes through `Child`: pinned with sched_setaffinity (what
`taskset -c` does), given PR_SET_PDEATHSIG so it dies with the bench even on SIGKILL, and stopped by
PID (SIGTERM, then SIGKILL for the root and every descendant that is still alive).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import subprocess
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def set_pdeathsig(sig: int = signal.SIGTERM) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, sig)


def raise_nofile() -> None:
    with contextlib.suppress(ValueError, OSError):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ /proc


def _stat(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    return raw[raw.rfind(b")") + 2 :].split()  # comm may hold spaces and parens


def alive(pid: int) -> bool:
    try:
        return _stat(pid)[0] != b"Z"
    except (OSError, IndexError):
        return False


def tree(pid: int) -> list[int]:
    """pid and every descendant alive now."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                kids.setdefault(int(_stat(int(d))[1]), []).append(int(d))
    out, stack = [pid], [pid]
    while stack:
        for c in kids.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def cpu(pids: list[int]) -> dict[str, float]:
    """CPU used so far by pids: user/sys from /proc/PID/stat ticks, on-CPU ns from schedstat."""
    ut = st = ns = 0
    for p in pids:
        try:
            f = _stat(p)
            ut += int(f[11])
            st += int(f[12])
            for t in os.listdir(f"/proc/{p}/task"):
                with (
                    contextlib.suppress(OSError, ValueError),
                    open(f"/proc/{p}/task/{t}/schedstat") as fh,
                ):
                    ns += int(fh.read().split()[0])
        except (OSError, IndexError, ValueError):
            pass
    return {"user": ut / CLK_TCK, "sys": st / CLK_TCK, "sched": ns / 1e9}


def every_cpu() -> dict[int, tuple[str, int, float]]:
    """Every process now: its name (``comm``), its start time (clock ticks since boot: a PID
    used again is another process) and its on-CPU seconds so far (schedstat, summed over the
    threads it has now). Taken before and after a window, the differences say where a whole
    machine's CPU went (``machine_usage``)."""
    out: dict[int, tuple[str, int, float]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        ns = 0
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{d}/comm") as fh:
                comm = fh.read().strip()
            started = int(_stat(int(d))[19])
            for t in os.listdir(f"/proc/{d}/task"):
                with (
                    contextlib.suppress(OSError, ValueError),
                    open(f"/proc/{d}/task/{t}/schedstat") as fh,
                ):
                    ns += int(fh.read().split()[0])
            out[int(d)] = (comm, started, ns / 1e9)
    return out


def machine_usage(
    before: dict[int, tuple[str, int, float]],
    after: dict[int, tuple[str, int, float]],
    groups: dict[str, set[int]],
    by_name: dict[str, str],
) -> tuple[dict[str, float], dict[str, float]]:
    """On-CPU seconds between two ``every_cpu`` readings per group: a process is in the group
    whose PID set holds it, else in the group ``by_name`` gives its ``comm``, else in
    ``other``; and ``other``'s seconds by ``comm``. A process is the same one when its PID and
    start time are (a kernel worker's comm names its current job, so not the comm); one not
    there before counts whole. Missed: a process, or a thread, that ended within the window (a
    database connection closed mid-run, say), and interrupt time, which no process is charged
    (the caller compares with ``/proc/stat``)."""
    owner = {pid: name for name, pids in groups.items() for pid in pids}
    used: dict[str, float] = {name: 0.0 for name in [*groups, *by_name.values(), "other"]}
    other: dict[str, float] = {}
    for pid, (comm, started, seconds) in after.items():
        start = before.get(pid)
        same = start is not None and start[1] == started
        delta = max(seconds - (start[2] if same and start is not None else 0.0), 0.0)
        group = owner.get(pid) or by_name.get(comm, "other")
        used[group] += delta
        if group == "other" and delta:
            name = comm.split("-", 1)[0] if comm.startswith("kworker/") else comm
            other[name] = other.get(name, 0.0) + delta
    return used, other


def busy_seconds(before: dict[str, list[int]], after: dict[str, list[int]]) -> float:
    """CPU seconds all cores were busy between two ``core_times`` readings (interrupts
    included; idle, iowait and steal not)."""
    busy = 0
    for name, a in after.items():
        d = [x - y for x, y in zip(a, before.get(name, a), strict=True)]
        busy += sum(d) - d[3] - d[4] - d[7]
    return busy / CLK_TCK


def rss_kib(pids: list[int]) -> int:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def core_times() -> dict[str, list[int]]:
    """/proc/stat per CPU: [user, nice, system, idle, iowait, irq, softirq, steal] jiffies."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                p = line.split()
                out[p[0]] = [int(x) for x in p[1:9]]
    return out


def core_usage(before: dict, after: dict) -> dict[str, dict[str, float]]:
    res = {}
    for name, a in after.items():
        d = [x - y for x, y in zip(a, before.get(name, a), strict=True)]
        total = sum(d) or 1
        res[name] = {
            "busy_pct": round(100 * (total - d[3] - d[4] - d[7]) / total, 1),
            "steal_pct": round(100 * d[7] / total, 1),
            # interrupt work on this core (loopback TCP input runs here too): not charged to
            # any process, so it shows up in "other load", not in the server's CPU
            "softirq_pct": round(100 * (d[5] + d[6]) / total, 1),
            "user_pct": round(100 * (d[0] + d[1]) / total, 1),
            "system_pct": round(100 * d[2] / total, 1),
        }
    return res


# ------------------------------------------------------------------------------------ children


class Child:
    """A started process, pinned to `cpus`, killed with the bench, stopped by PID."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        cpus: set[int] | None,
        logdir: str,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.log_path = os.path.join(logdir, f"{name}.log")
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()

        def pre() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)
            raise_nofile()
            set_pdeathsig()

        self.p = subprocess.Popen(
            argv,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            preexec_fn=pre,
        )
        self.pid = self.p.pid

    def tail(self, n: int = 1500) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def stop(self, timeout: float = 8.0) -> list[int]:
        """SIGTERM the root, wait (bounded), SIGKILL whatever of its tree survived."""
        pids = tree(self.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while time.monotonic() < end and any(alive(p) for p in pids):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, os.WNOHANG)
            time.sleep(0.05)
        left = [p for p in pids if alive(p)]
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(5)
        self.log.close()
        return left


def wait_port(port: int, child: Child, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if child.p.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.p.returncode}:\n{child.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{child.name}: nothing listens on 127.0.0.1:{port} after {timeout}s")


# ------------------------------------------------------------------------------------ redis


def resp(*args: str) -> bytes:
    """One command in Redis's protocol (RESP2)."""
    out = [b"*%d\r\n" % len(args)]
    for x in args:
        b = x.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def redis_cmd(port: int, *args: str, timeout: float = 5.0) -> object:
    """One command on a fresh connection named bench-ctl (excluded from the counts)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(resp("CLIENT", "SETNAME", "bench-ctl") + resp(*args))
        f = s.makefile("rb")

        def read() -> object:
            line = f.readline()
            kind, rest = line[:1], line[1:-2]
            if kind == b"+":
                return rest.decode()
            if kind == b"-":
                raise RuntimeError(rest.decode())
            if kind == b":":
                return int(rest)
            if kind == b"$":
                n = int(rest)
                return None if n < 0 else f.read(n + 2)[:-2].decode(errors="replace")
            if kind == b"*":
                return [read() for _ in range(int(rest))]
            raise RuntimeError(f"bad reply {line!r}")

        read()
        return read()


def redis_clients(port: int) -> dict[str, int]:
    """CLIENT LIST without the bench's own connections (all named bench-*)."""
    total = subscribed = 0
    for line in str(redis_cmd(port, "CLIENT", "LIST")).splitlines():
        kv = dict(p.split("=", 1) for p in line.split() if "=" in p)
        if kv.get("name", "").startswith("bench-"):
            continue
        total += 1
        if int(kv.get("sub", 0)) + int(kv.get("psub", 0)) + int(kv.get("ssub", 0)) > 0:
            subscribed += 1
    return {"clients": total, "subscribed": subscribed}


def start_redis(logdir: str, cpus: set[int] | None) -> tuple[Child, int]:
    port = free_port()
    argv = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        logdir,
        "--daemonize",
        "no",
        "--maxclients",
        "10000",
        "--loglevel",
        "warning",
    ]
    child = Child("redis", argv, cpus, logdir)
    wait_port(port, child, 10)
    end = time.monotonic() + 10
    while True:
        try:
            if redis_cmd(port, "PING") == "PONG":
                return child, port
        except (OSError, RuntimeError):
            if time.monotonic() > end:
                child.stop()
                raise
            time.sleep(0.05)


class CutWatcher:
    """When did the server let go of each stalled stream? A client that does not read cannot see
    it: the server's close sits behind megabytes of unsent data in the server's kernel send buffer.
    So we look at the server's side of each connection in /proc/net/tcp (loopback, same machine):
    gone, no longer ESTABLISHED, or orphaned (inode 0: the process closed it) counts as cut."""

    def __init__(self, server_port: int, client_ports: set[int], every: float = 0.5) -> None:
        self.sport = f"{server_port:04X}"
        self.ports = {f"{p:04X}": p for p in client_ports}
        self.cut: dict[int, float] = {}
        self.every, self.next = every, 0.0

    def poll(self) -> None:
        now = time.monotonic()
        if not self.ports or now < self.next or len(self.cut) == len(self.ports):
            return
        self.next = now + self.every
        held = set()
        for path in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(path) as f:
                next(f, None)
                for line in f:
                    p = line.split()
                    if p[1].endswith(":" + self.sport) and p[3] == "01" and p[9] != "0":
                        rport = p[2].rsplit(":", 1)[1]
                        if rport in self.ports:
                            held.add(rport)
        wall = time.time()
        for hexport, port in self.ports.items():
            if hexport not in held and port not in self.cut:
                self.cut[port] = wall
