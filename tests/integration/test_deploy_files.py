"""What CI can check of ``deploy/`` without a container engine: nginx runs the shipped proxy
configuration (``nginx -t``, and live: HTTP/2 by ALPN, the redirect, headers and keep-alive to
the upstream, an unbuffered stream), and the image definition, compose file and Kubernetes
manifests say what the drain, the probes and the migration need.

The upstream in the live nginx test is a small recording HTTP server on loopback, so the test
can see exactly what nginx sends; the fleet test (``test_fleet.py``) runs the same configuration
in front of real ``regstream serve`` processes.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import unavailable
from tests.fleet_support import (
    DEPLOY,
    NGINX_DIR,
    make_cert,
    nginx_argv,
    nginx_binary,
    render_nginx,
    running_nginx,
)
from tests.support import free_port

K8S = DEPLOY / "k8s"
# the drain's phases (REGSTREAM_DRAIN_DELAY, _SPREAD, REGSTREAM_SHUTDOWN_GRACE) and the outbox
# flush at the very end (drain.FLUSH, 2 s): the orchestrator's kill deadline must exceed the sum
DRAIN_SETTINGS = ("REGSTREAM_DRAIN_DELAY", "REGSTREAM_DRAIN_SPREAD", "REGSTREAM_SHUTDOWN_GRACE")
DRAIN_DEFAULTS = {"REGSTREAM_DRAIN_DELAY": 5.0, "REGSTREAM_DRAIN_SPREAD": 5.0,
                  "REGSTREAM_SHUTDOWN_GRACE": 10.0}  # fmt: skip
# after the grace: ~3 s of bookkeeping (cancelled runs, commits, releasing runs to the queue),
# the 2 s outbox flush, the process's own exit (2-3 s), and on a slow database up to two
# statements at REGSTREAM_DB_STATEMENT_TIMEOUT (5 s) for the release and the stopped mark
FLUSH_AND_EXIT = 3.0 + 2.0 + 3.0 + 2 * 5.0


def _drain_total(env: dict[str, str]) -> float:
    return sum(float(env.get(name, DRAIN_DEFAULTS[name])) for name in DRAIN_SETTINGS)


def _need_nginx() -> None:
    if nginx_binary() is None:
        unavailable("nginx (Debian package nginx)")


# --- nginx -------------------------------------------------------------------------------------


def test_nginx_accepts_the_shipped_configuration(tmp_path: Path) -> None:
    _need_nginx()
    cert = make_cert(tmp_path / "tls")
    conf = render_nginx(
        tmp_path / "nginx", upstream_ports=[free_port() for _ in range(3)],
        http_port=free_port(), https_port=free_port(), cert=cert,
    )  # fmt: skip
    out = subprocess.run(nginx_argv(conf, "-t"), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "test is successful" in out.stderr
    # the proxy rules are the shipped file itself, not a copy
    assert f"include {NGINX_DIR / 'regstream.conf'};" in conf.read_text()


def test_shipped_upstreams_name_the_compose_instances() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    upstreams = (NGINX_DIR / "regstream.d" / "upstreams.conf").read_text()
    hosts = re.findall(r"^server ([\w.-]+):8000 ", upstreams, re.M)
    instances = [n for n, s in compose["services"].items() if _is_instance(s)]
    assert sorted(hosts) == sorted(instances) and len(instances) == 3


@asynccontextmanager
async def _recording_upstream() -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
    """An HTTP/1.1 server that records each request (its connection, request line and headers)
    and answers keep-alive; ``/stream`` sends one chunk, waits, then ends."""
    requests: list[dict[str, Any]] = []
    connections = 0
    release = asyncio.Event()
    open_writers: set[asyncio.StreamWriter] = set()
    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        conn = connections
        open_writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = dict(
                    (k.strip().lower(), v.strip())
                    for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                )
                requests.append({"line": lines[0], "headers": headers, "connection": conn})
                if lines[0].startswith("GET /api/registrations/updates/stream "):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
                    writer.write(b"%x\r\n%s\r\n" % (len(b"data: first\n\n"), b"data: first\n\n"))
                    await writer.drain()
                    await asyncio.wait_for(release.wait(), 10)
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            open_writers.discard(writer)
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, requests
    finally:
        release.set()
        server.close()
        for writer in list(open_writers):  # nginx's idle keep-alive connections
            writer.close()
        if handlers:
            await asyncio.wait(handlers, timeout=5)
        await server.wait_closed()


async def test_nginx_proxies_as_documented(tmp_path: Path) -> None:
    _need_nginx()
    cert = make_cert(tmp_path / "tls")
    http_port, https_port = free_port(), free_port()
    async with _recording_upstream() as (upstream, seen):
        conf = render_nginx(tmp_path / "nginx", upstream_ports=[upstream], http_port=http_port,
                            https_port=https_port, cert=cert)  # fmt: skip
        with running_nginx(conf, https_port):
            # HTTP/2 offered to browsers (ALPN), so one connection carries many streams
            context = cert.client_context()
            context.set_alpn_protocols(["h2", "http/1.1"])
            with socket.create_connection(("127.0.0.1", https_port), 5) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    assert tls.selected_alpn_protocol() == "h2"
                    assert tls.version() in ("TLSv1.2", "TLSv1.3")
            async with httpx.AsyncClient(timeout=10) as plain:
                moved = await plain.get(f"http://127.0.0.1:{http_port}/registrations?page=2")
            assert moved.status_code == 308
            assert moved.headers["location"] == "https://127.0.0.1/registrations?page=2"

            base = f"https://127.0.0.1:{https_port}"
            async with httpx.AsyncClient(base_url=base, verify=cert.client_context(),
                                         timeout=10) as http:  # fmt: skip
                spoofed = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http"}
                for _ in range(3):
                    assert (await http.get("/api/registrations", headers=spoofed)).text == "ok"
                assert (await http.get("/metrics")).status_code == 404
                # the stream's first frame arrives while the upstream still holds the response
                async with http.stream("GET", "/api/registrations/updates/stream") as response:
                    assert response.status_code == 200
                    first = await asyncio.wait_for(anext(response.aiter_raw()), 5)
                    assert first == b"data: first\n\n"
            access_log = (conf.parent / "access.log").read_text()

    api = [r for r in seen if r["line"].startswith("GET /api/registrations HTTP")]
    assert len(api) == 3
    for request in api:
        assert request["line"].endswith("HTTP/1.1")
        assert "connection" not in request["headers"]  # keep-alive upstream (Connection "")
        # replaced, not appended: the client cannot choose the address the service audits
        assert request["headers"]["x-forwarded-for"] == "127.0.0.1"
        assert request["headers"]["x-forwarded-proto"] == "https"
        assert request["headers"]["x-forwarded-host"] == f"127.0.0.1:{https_port}"
    assert len({r["connection"] for r in api}) == 1  # one upstream connection, reused
    assert not any(r["line"].startswith("GET /metrics") for r in seen)
    assert "page=2" not in access_log and "/registrations " in access_log  # no query strings


async def test_nginx_sends_streams_to_an_instance_as_soon_as_it_is_back(tmp_path: Path) -> None:
    """The rolling-restart pattern: instance A is down, comes back, then B stops listening.
    New streams must go to A at once. With nginx's passive failure marking (max_fails=1) A
    stayed out until a request to it *completed*, which a stream does not: 502 "no live
    upstreams" (bench/fleet_bench.py, 794 of 1,051 reconnects)."""
    _need_nginx()
    cert = make_cert(tmp_path / "tls")
    port_a, port_b, https_port = free_port(), free_port(), free_port()
    release = asyncio.Event()
    handlers: set[asyncio.Task[Any]] = set()
    served = {port_a: 0, port_b: 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            served[writer.get_extra_info("sockname")[1]] += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n7\r\ndata:\n\n\r\n")  # fmt: skip
            await writer.drain()
            await release.wait()  # a stream stays open
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server_b = await asyncio.start_server(handle, "127.0.0.1", port_b)
    server_a = None
    conf = render_nginx(tmp_path / "nginx", upstream_ports=[port_a, port_b],
                        http_port=free_port(), https_port=https_port, cert=cert)  # fmt: skip
    streams: list[Any] = []
    try:
        with running_nginx(conf, https_port):
            async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{https_port}",
                                         verify=cert.client_context(), timeout=10) as http:  # fmt: skip

                async def open_stream() -> int:
                    cm = http.stream("GET", "/api/registrations/updates/stream")
                    response = await cm.__aenter__()
                    streams.append(cm)
                    return response.status_code

                # A is down: the streams land on B (a try of A is refused, then B)
                assert [await open_stream() for _ in range(2)] == [200, 200]
                server_a = await asyncio.start_server(handle, "127.0.0.1", port_a)  # A is back
                server_b.close()  # B stops listening (draining); its streams stay open
                statuses = [await open_stream() for _ in range(4)]
                assert statuses == [200] * 4, (statuses, served)
                assert served[port_a] == 4
                release.set()
                for cm in streams:
                    await cm.__aexit__(None, None, None)
    finally:
        release.set()
        server_b.close()
        if server_a is not None:
            server_a.close()
        if handlers:
            await asyncio.wait(handlers, timeout=5)


# --- the image ---------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_image_is_built_with_the_ci_install_script_and_runs_as_non_root() -> None:
    steps = _dockerfile()
    runs = [args for word, args in steps if word == "RUN"]
    assert any(args.startswith("scripts/install") for args in runs), runs
    assert "scripts/install" in (DEPLOY.parent / ".ci" / "run").read_text()
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    uid = int(users[-1].split(":")[0])
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid
    (health,) = [args for word, args in steps if word == "HEALTHCHECK"]
    assert "/healthz" in health
    (base,) = [args for word, args in steps if word == "FROM"]
    assert base.startswith("debian:bookworm")  # the release CI runs on (Debian 12)
    # everything COPY takes exists and is let through the build context's ignore file
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for word, args in steps:
        if word == "COPY":
            *sources, _dest = shlex.split(args)
            for source in sources:
                assert (DEPLOY.parent / source).exists(), source
                assert source.rstrip("/") in allowed, f"{source} not in Dockerfile.dockerignore"
    entrypoint = DEPLOY / "entrypoint.sh"
    assert entrypoint.stat().st_mode & 0o111
    assert subprocess.run(["sh", "-n", str(entrypoint)], timeout=10).returncode == 0


def test_commands_the_deploy_files_run_exist() -> None:
    for args in (["migrate", "--help"], ["serve", "--help"], ["t24-sim", "--help"]):
        out = subprocess.run([sys.executable, "-m", "regstream", *args], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, (args, out.stdout[-500:], out.stderr[-500:])
        if args[0] == "serve":
            assert "--host" in out.stdout and "--port" in out.stdout


# --- compose -----------------------------------------------------------------------------------


def _is_instance(service: dict[str, Any]) -> bool:
    return "build" in service and "command" not in service  # the image's CMD: serve


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", value)
    assert match, value
    return float(match[1]) * (60 if match[2] == "m" else 1)


def test_compose_file() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "nginx"} <= set(services)
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["restart"] == "no"
    instances = {name: s for name, s in services.items() if _is_instance(s)}
    assert len(instances) == 3
    keys = set()
    for name, service in instances.items():
        env = service["environment"]
        keys.add(env["REGSTREAM_SECRET_KEY"])
        assert env["REGSTREAM_SECRET_KEY"].startswith("${REGSTREAM_SECRET_KEY:?"), name
        assert env["DATABASE_URL"].startswith("postgresql+asyncpg://"), name
        assert "${POSTGRES_PASSWORD:?" in env["DATABASE_URL"]
        assert env["REGSTREAM_TRUST_PROXY"] == "true"
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert service["ulimits"]["nofile"]["soft"] >= 65536
        assert _seconds(service["stop_grace_period"]) >= _drain_total(env) + FLUSH_AND_EXIT
        assert "ports" not in service  # only nginx is reachable from outside
    assert len(keys) == 1  # one secret for the fleet
    nginx = services["nginx"]
    assert set(nginx["depends_on"]) == set(instances)
    for volume in nginx["volumes"]:
        source = volume.split(":")[0]
        if source != "./tls":
            assert (DEPLOY / source).exists(), source


# --- Kubernetes --------------------------------------------------------------------------------


def _manifests() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
            out[doc["kind"]] = doc
    return out


def test_kubernetes_manifests() -> None:
    docs = _manifests()
    assert {"Deployment", "PodDisruptionBudget", "Service", "Job", "Secret"} <= set(docs)
    deployment = docs["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert pod["terminationGracePeriodSeconds"] >= _drain_total(env) + FLUSH_AND_EXIT
    # out of rotation (readiness failures) before the drain starts closing streams
    probe = container["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] < float(
        env.get("REGSTREAM_DRAIN_DELAY", DRAIN_DEFAULTS["REGSTREAM_DRAIN_DELAY"])
    )
    assert "lifecycle" not in container  # no preStop: the service delays itself
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    job = docs["Job"]["spec"]["template"]["spec"]
    assert job["containers"][0]["args"] == ["migrate"]
    assert job["restartPolicy"] in ("Never", "OnFailure")
    assert job["containers"][0]["image"] == container["image"]
    secret = docs["Secret"]
    assert "REGSTREAM_SECRET_KEY" in secret["stringData"]
    for name in ("Deployment", "Job"):
        spec = docs[name]["spec"]["template"]["spec"]["containers"][0]
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in spec["envFrom"], name
    annotations = docs["Ingress"]["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    # the pods trust X-Forwarded-*: only the ingress controller (and monitoring) may reach them
    assert env["REGSTREAM_TRUST_PROXY"] == "true"
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress"] and len(policy["ingress"]) == 1


def test_stream_read_timeouts_exceed_the_ping_interval() -> None:
    from regstream.config import Settings

    ping = Settings.model_fields["sse_ping_interval"].default
    conf = (NGINX_DIR / "regstream.conf").read_text()
    stream = conf.split("location = /api/registrations/updates/stream {", 1)[1].split("}", 1)[0]
    assert "proxy_buffering off;" in stream
    (timeout,) = re.findall(r"proxy_read_timeout (\d+)s;", stream)
    assert int(timeout) > ping
    ingress = _manifests()["Ingress"]["metadata"]["annotations"]
    assert int(ingress["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > ping
