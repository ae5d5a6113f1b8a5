"""Support for the fleet tests: Debian's nginx with the shipped configuration in front of
``regstream serve`` processes, and a client that follows a stream the way a browser does.

* ``render_nginx`` writes a main configuration and a ``regstream.d/`` for loopback ports. Both
  are *rendered from the shipped files* in ``deploy/nginx/`` (a few lines swapped: ports,
  certificate paths, pid and log files), and ``deploy/nginx/regstream.conf`` itself, where every
  proxy rule lives, is included from the repository as it is. Each swap checks that the line it
  replaces is there, so a change to the shipped files cannot silently leave the tests behind.
* ``NginxProcess`` runs ``nginx -g 'daemon off;'`` (never the system service), stopped by PID.
* ``Instance`` is one ``regstream serve`` subprocess on a port of its own.
* ``EventSourceClient`` reads a stream until the server ends it, waits its last ``retry:`` hint
  and reconnects with ``Last-Event-ID``, as a browser's ``EventSource`` does; what it saw is kept
  by a ``Viewer`` (``tests/integration/viewer.py``: duplicates, gaps, snapshots, resyncs).
* ``documented_acl`` reads the Redis ACL rules the service needs from ``docs/operations.md``
  ("Redis Cluster", the ``ACL SETUSER regstream`` block), so the tests use the documented ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.integration.viewer import Viewer

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
OPERATIONS = REPO / "docs" / "operations.md"
ACL_PASSWORD_PLACEHOLDER = ">CHANGE-ME"
NGINX_DIR = DEPLOY / "nginx"
STREAM_PATH = "/api/registrations/updates/stream"


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None
    )


# --- TLS -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestCert:
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """Trusts this certificate only (no verify=False anywhere)."""
        return ssl.create_default_context(cafile=str(self.cert))


def make_cert(directory: Path) -> TestCert:
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=regstream-test", "-keyout", str(key),
         "-out", str(cert), "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return TestCert(cert, key)


# --- the documented Redis ACL -------------------------------------------------------------------


def documented_acl(password: str) -> list[str]:
    """The rules of ``ACL SETUSER regstream`` in docs/operations.md's shell block (its line
    continuations joined, its quoting undone), with ``password`` for the placeholder."""
    blocks = re.findall(r"^```sh\n(.*?)^```", OPERATIONS.read_text(), re.M | re.S)
    found = [b for b in blocks if "ACL SETUSER regstream" in b]
    if len(found) != 1:
        raise AssertionError(f"docs/operations.md: expected one ACL SETUSER regstream block, "
                             f"found {len(found)}; update tests/fleet_support.py")  # fmt: skip
    words = shlex.split(found[0].replace("\\\n", " "))
    rules = words[words.index("SETUSER") + 2 :]
    if ACL_PASSWORD_PLACEHOLDER not in rules:
        raise AssertionError(f"docs/operations.md: no {ACL_PASSWORD_PLACEHOLDER!r} in the ACL")
    return [f">{password}" if rule == ACL_PASSWORD_PLACEHOLDER else rule for rule in rules]


# --- rendering the shipped configuration ---------------------------------------------------------


def _swap(text: str, old: str, new: str, where: str) -> str:
    """Replace ``old`` in the one configuration line (not a comment) that holds it."""
    lines = text.splitlines(keepends=True)
    hits = [n for n, line in enumerate(lines) if old in line and not line.lstrip().startswith("#")]
    if len(hits) != 1:
        raise AssertionError(f"{where}: expected one line with {old!r}, found {len(hits)}; "
                             "update tests/fleet_support.py")  # fmt: skip
    lines[hits[0]] = lines[hits[0]].replace(old, new)
    return "".join(lines)


def render_upstreams(ports: Sequence[int]) -> str:
    """The shipped upstreams.conf with its instances replaced by loopback ports (same options)."""
    shipped = (NGINX_DIR / "regstream.d" / "upstreams.conf").read_text()
    servers = re.findall(r"^server (\S+) (.*);$", shipped, re.M)
    if not servers:
        raise AssertionError("regstream.d/upstreams.conf: no `server host:port options;` line")
    options = servers[0][1]
    comments = "".join(line + "\n" for line in shipped.splitlines() if line.startswith("#"))
    return comments + "".join(f"server 127.0.0.1:{port} {options};\n" for port in ports)


def render_nginx(
    directory: Path, *, upstream_ports: Sequence[int], http_port: int, https_port: int,
    cert: TestCert, worker_connections: int = 4096,
) -> Path:  # fmt: skip
    """Write ``directory/nginx.conf`` and ``directory/regstream.d/`` from the shipped files;
    return the main file's path. ``deploy/nginx/regstream.conf`` is included in place."""
    site = directory / "regstream.d"
    site.mkdir(parents=True, exist_ok=True)
    (site / "upstreams.conf").write_text(render_upstreams(upstream_ports))
    http = (NGINX_DIR / "regstream.d" / "listen-http.conf").read_text()
    http = _swap(http, "listen 80;", f"listen 127.0.0.1:{http_port};", "listen-http.conf")
    (site / "listen-http.conf").write_text(http)
    tls = (NGINX_DIR / "regstream.d" / "listen-https.conf").read_text()
    tls = _swap(tls, "listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;",
                "listen-https.conf")  # fmt: skip
    tls = _swap(tls, "/etc/nginx/tls/tls.crt", str(cert.cert), "listen-https.conf")
    tls = _swap(tls, "/etc/nginx/tls/tls.key", str(cert.key), "listen-https.conf")
    (site / "listen-https.conf").write_text(tls)

    main = (NGINX_DIR / "nginx.conf").read_text()
    # root: workers as root (they read nothing but what the master opened); else no user switch
    user = f"user {pwd.getpwuid(0).pw_name};" if os.geteuid() == 0 else ""
    main = _swap(main, "user nginx;", user, "nginx.conf")
    main = _swap(main, "worker_processes auto;", "worker_processes 1;", "nginx.conf")
    main = _swap(main, "worker_rlimit_nofile 65536;", "worker_rlimit_nofile 20000;", "nginx.conf")
    main = _swap(main, "worker_connections 16384;", f"worker_connections {worker_connections};",
                 "nginx.conf")  # fmt: skip
    main = _swap(main, "error_log /dev/stderr warn;", f"error_log {directory / 'error.log'} warn;",
                 "nginx.conf")  # fmt: skip
    main = _swap(main, "pid /var/run/nginx.pid;", f"pid {directory / 'nginx.pid'};", "nginx.conf")
    main = _swap(main, "include mime.types;", "include /etc/nginx/mime.types;", "nginx.conf")
    main = _swap(main, "access_log /dev/stdout regstream;",
                 f"access_log {directory / 'access.log'} regstream;", "nginx.conf")  # fmt: skip
    temp = "".join(
        f"    {kind}_temp_path {directory / 'temp' / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = _swap(main, "include regstream.conf;",
                 f"include {NGINX_DIR / 'regstream.conf'};\n{temp}", "nginx.conf")  # fmt: skip
    (directory / "temp").mkdir(exist_ok=True)
    path = directory / "nginx.conf"
    path.write_text(main)
    return path


def nginx_argv(conf: Path, *extra: str) -> list[str]:
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed")
    # -e: the error log before the configuration is read (the default is under /var/log)
    return [binary, "-p", str(conf.parent), "-c", str(conf), "-e", str(conf.parent / "error.log"),
            *extra]  # fmt: skip


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: nothing listens on 127.0.0.1:{port} after {timeout} s")


def stop_tree(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0
) -> None:
    """Stop a process we started in a session of its own (``start_new_session``), by PID:
    ``sig``, a bounded wait, then SIGKILL for its process group (nginx's workers, should its
    master not have taken them down)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@contextlib.contextmanager
def running_nginx(conf: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A private nginx in the foreground (``daemon off``), listening once this yields."""
    with open(conf.parent / "nginx.out", "ab") as out:
        proc = subprocess.Popen(nginx_argv(conf, "-g", "daemon off;"), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    try:
        try:
            wait_port(port, proc, "nginx")
        except AssertionError as exc:
            log = (conf.parent / "error.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"{exc}\n{log}") from None
        yield proc
    finally:
        stop_tree(proc)


# --- regstream instances -------------------------------------------------------------------------


@dataclass
class Instance:
    """One ``regstream serve`` process (``python -m regstream serve``), restartable."""

    name: str
    port: int
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "regstream", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.log.parent,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def tail(self, size: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-size:]

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (the drain), then SIGKILL if it has not exited within ``timeout``."""
        if self.proc is not None:
            stop_tree(self.proc, signal.SIGTERM, timeout=timeout)


def wait_ready(instances: Sequence[Instance], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(instances)
    while pending:
        pending = [i for i in pending if not i.ready()]
        if pending and time.monotonic() > deadline:
            raise AssertionError(f"{pending[0].name} not ready:\n{pending[0].tail()}")
        if pending:
            time.sleep(0.1)


def regstream_cli(env: dict[str, str], *args: str, timeout: float = 60) -> str:
    """Run ``python -m regstream ARGS``; its stdout (raises with its output when it fails)."""
    out = subprocess.run(
        [sys.executable, "-m", "regstream", *args], env=env, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if out.returncode != 0:
        raise AssertionError(f"regstream {' '.join(args)} exited {out.returncode}:\n"
                             f"{out.stdout[-1500:]}\n{out.stderr[-1500:]}")  # fmt: skip
    return out.stdout


def admin_token(env: dict[str, str], name: str) -> str:
    out = regstream_cli(env, "users", "add", name, "--role", "admin", "--no-password", "--token")
    return [line.strip() for line in out.splitlines() if line.strip()][-1]


# --- a stream followed like a browser does ------------------------------------------------------


@dataclass
class EventSourceClient:
    """Follows one stream through reconnects, like ``EventSource``: when the response ends or the
    connection breaks it waits the last ``retry:`` hint (or a refused attempt's ``Retry-After``)
    and reconnects with ``Last-Event-ID``. An unfiltered stream's ``resync`` marker makes it
    re-read its registrations from the API, as the browser module does."""

    base_url: str
    headers: dict[str, str]
    verify: ssl.SSLContext
    registration_id: int | None = None
    retry_ms: int = 1000
    viewer: Viewer = field(init=False)
    refused: dict[int, int] = field(default_factory=dict)  # HTTP status → count
    drops: int = 0

    def __post_init__(self) -> None:
        self.viewer = Viewer(self.base_url, self.headers, registration_id=self.registration_id)

    async def follow(self, scope: list[int], until: asyncio.Event, deadline: float) -> None:
        """Read until ``until`` is set and every registration of ``scope`` has its final status
        (or the loop clock passes ``deadline``)."""
        loop = asyncio.get_running_loop()
        limits = httpx.Limits(max_keepalive_connections=1)
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, verify=self.verify, limits=limits,
            timeout=httpx.Timeout(10, read=None),
        ) as http:  # fmt: skip
            while loop.time() < deadline:
                if until.is_set() and self.viewer.complete(scope):
                    return
                wait = await self._session(http, scope, until, deadline)
                if until.is_set() and self.viewer.complete(scope):
                    return
                await asyncio.sleep(wait)

    async def _session(
        self, http: httpx.AsyncClient, scope: list[int], until: asyncio.Event, deadline: float
    ) -> float:
        """One connection; returns how long to wait before the next one (seconds)."""
        params = {"registrationId": str(self.registration_id)} if self.registration_id else {}
        headers = {"Last-Event-ID": self.viewer.last_id} if self.viewer.last_id else {}
        loop = asyncio.get_running_loop()
        try:
            async with http.stream("GET", STREAM_PATH, params=params, headers=headers) as response:
                if response.status_code != 200:
                    status = response.status_code
                    self.refused[status] = self.refused.get(status, 0) + 1
                    after = response.headers.get("retry-after", "")
                    if after.replace(".", "", 1).isdigit():
                        return float(after)
                    return self.retry_ms / 1000
                self.viewer.connections += 1
                buffer = ""
                async for text in response.aiter_text():
                    buffer += text
                    while "\n\n" in buffer:
                        block, buffer = buffer.split("\n\n", 1)
                        self._frame(block)
                        if self.viewer.needs_resync:
                            await self.viewer.resync(http, scope)
                    if until.is_set() and self.viewer.complete(scope) or loop.time() > deadline:
                        return 0.0
        except httpx.TransportError:
            self.drops += 1  # the connection broke (an instance killed behind nginx…)
        return self.retry_ms / 1000

    def _frame(self, block: str) -> None:
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


def stream_summary(client: EventSourceClient) -> dict[str, Any]:
    v = client.viewer
    return {"filter": client.registration_id, "connections": v.connections, "drops": client.drops,
            "refused": client.refused, "snapshots": v.snapshots, "resyncs": v.resyncs,
            "duplicates": v.duplicates, "gaps": v.gaps}  # fmt: skip
