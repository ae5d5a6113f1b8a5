"""T24 over TLS: mutual TLS to the simulator, a client certificate missing or a CA not trusted,
a forward proxy, holdings v4 answers (issue 17 item 1); the client and the whole service.

Certificates are made at test time (``tests/t24_tls.py``). The simulator serves TLS through
uvicorn's ``ssl_*`` options and requires a client certificate signed by the test CA. The forward
proxy is ours (``ConnectProxy``: asyncio, real sockets, ``CONNECT`` tunnels only) and records the
tunnels it opened, so "through the proxy" is asserted, not assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from redis.asyncio import Redis

from regstream.config import ConfigError, load_settings
from regstream.core_banking import CoreTlsError, T24Client, T24ClientConfig
from regstream.core_banking.breaker import BreakerState
from regstream.core_banking.simulator import (
    RunningSimulator,
    SimulatorConfig,
    SimulatorTls,
    serve_in_thread,
)
from tests.conftest import SettingsFactory
from tests.support import LoopbackServer, StreamClient, auth_headers, free_port, serve_app
from tests.t24_tls import CLIENT_KEY_PASSWORD, Pki, make_pki

# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_sim(pki: Pki) -> Iterator[RunningSimulator]:
    """The simulator over HTTPS, requiring a client certificate signed by the test CA."""
    tls = SimulatorTls(cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca)
    with serve_in_thread(SimulatorConfig(latency_ms=0), tls=tls) as sim:
        yield sim


def _control_client(pki: Pki) -> httpx.Client:
    """A client with the test certificate, for the simulator's /_sim endpoints."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(pki.client_cert, pki.client_key, CLIENT_KEY_PASSWORD)
    return httpx.Client(verify=context, trust_env=False, timeout=5)


def _calls(sim: RunningSimulator, pki: Pki) -> dict[str, int]:
    with _control_client(pki) as http:
        response = http.get(f"{sim.control_url}/stats")
        response.raise_for_status()
        return dict(response.json()["calls"])


def _reset(sim: RunningSimulator, pki: Pki) -> None:
    with _control_client(pki) as http:
        http.post(f"{sim.control_url}/reset").raise_for_status()


def _mtls(pki: Pki) -> dict[str, Any]:
    """T24ClientConfig fields for mutual TLS with the test PKI."""
    return {
        "ca_bundle": str(pki.ca),
        "client_cert": str(pki.client_cert),
        "client_key": str(pki.client_key),
        "client_key_password": CLIENT_KEY_PASSWORD,
    }


class ConnectProxy(LoopbackServer):
    """A forward proxy for ``CONNECT host:port`` tunnels (what an HTTPS request through an HTTP
    proxy uses); anything else is answered 405. ``tunnels`` lists the targets it connected."""

    def __init__(self) -> None:
        super().__init__()
        self.tunnels: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            host, _, port = target.rpartition(":")
            up_reader, upstream = await asyncio.open_connection(host, int(port))
            self._writers.add(upstream)
            self.tunnels.append(target)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):  # b"" at EOF
            writer.write(chunk)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.write_eof()


@contextlib.contextmanager
def alerting_tls_server(pki: Pki) -> Iterator[int]:
    """A TLS server that, like most servers (Java, Go, OpenSSL's), refuses a connection without
    an acceptable client certificate with a TLS alert (asyncio's, uvicorn's, just close)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.load_verify_locations(cafile=str(pki.ca))
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True) as tls:  # the alert is sent here
                    tls.recv(65536)
                    body = b'{"header":{"status":"success"},"body":{}}'
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
            except (OSError, ssl.SSLError):
                conn.close()

    thread = threading.Thread(target=serve, name="alerting-tls", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.fixture
async def clients() -> AsyncIterator[list[T24Client]]:
    made: list[T24Client] = []
    yield made
    for client in made:
        await client.aclose()


def _client(made: list[T24Client], base_url: str, **fields: Any) -> T24Client:
    settings: dict[str, Any] = {"timeout": 2.0, "deadline": 5.0, "backoff_initial": 0.01,
                                "backoff_max": 0.05, **fields}  # fmt: skip
    client = T24Client(T24ClientConfig(base_url=base_url, **settings))
    made.append(client)
    return client


def _attempts(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [
        (r.t24_attempt, r.outcome)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "regstream.core_banking.client"
    ]


# --- the client -----------------------------------------------------------------------------------


async def test_mutual_tls_lookup(
    mtls_sim: RunningSimulator, pki: Pki, clients: list[T24Client]
) -> None:
    _reset(mtls_sim, pki)
    client = _client(clients, mtls_sim.base_url, **_mtls(pki))
    assert mtls_sim.base_url.startswith("https://127.0.0.1:")
    assert (await client.get_customer("100100")).customer_id == "100100"
    assert len(await client.list_accounts("100100")) == 3
    assert _calls(mtls_sim, pki) == {"customer": 1, "arrangements": 1, "holdings": 0}


async def test_without_a_client_certificate_one_attempt_fails_with_core_tls_error(
    mtls_sim: RunningSimulator, pki: Pki, clients: list[T24Client], caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn closes the connection after the handshake (no alert): a TLS failure, not retried,
    not counted by the breaker; the simulator's application never sees a request."""
    caplog.set_level(logging.INFO, logger="regstream.core_banking.client")
    _reset(mtls_sim, pki)
    client = _client(clients, mtls_sim.base_url, ca_bundle=str(pki.ca), breaker_threshold=2)
    for _ in range(4):
        with pytest.raises(CoreTlsError) as info:
            await client.get_customer("100100")
        assert (info.value.code.value, info.value.retryable) == ("CORE_TLS_ERROR", False)
    assert _attempts(caplog) == [(1, "core_tls_error")] * 4
    assert caplog.records[-1].getMessage().endswith(" tls=closed after the handshake, no answer")
    assert client.breaker.state is BreakerState.CLOSED
    assert _calls(mtls_sim, pki) == {"customer": 0, "arrangements": 0, "holdings": 0}


async def test_a_server_certificate_from_another_ca_is_core_tls_error(
    mtls_sim: RunningSimulator, pki: Pki, clients: list[T24Client], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="regstream.core_banking.client")
    fields = {**_mtls(pki), "ca_bundle": str(pki.other_ca)}
    with pytest.raises(CoreTlsError) as info:
        await _client(clients, mtls_sim.base_url, **fields).get_customer("100100")
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorCertificateError)
    assert _attempts(caplog) == [(1, "core_tls_error")]
    (line,) = [r.getMessage() for r in caplog.records if r.name.startswith("regstream.core")]
    assert "tls=CERTIFICATE_VERIFY_FAILED: self-signed certificate in certificate chain" in line
    # the system's CAs (no T24_CA_BUNDLE) do not know the test CA either
    without_bundle = {**_mtls(pki), "ca_bundle": None}
    with pytest.raises(CoreTlsError):
        await _client(clients, mtls_sim.base_url, **without_bundle).get_customer("100100")


async def test_a_tls_alert_from_the_core_is_core_tls_error(
    pki: Pki, clients: list[T24Client]
) -> None:
    with alerting_tls_server(pki) as port:
        base_url = f"https://127.0.0.1:{port}/api/v1.0.0"
        with pytest.raises(CoreTlsError) as info:
            await _client(clients, base_url, ca_bundle=str(pki.ca)).get_customer("100100")
        # the alert itself (ssl.SSLError) or, when the server's close overtakes it, a reset
        assert isinstance(info.value.__cause__, ssl.SSLError | aiohttp.ClientError)
        # with the certificate the same server answers (so the alert was about it)
        customer = await _client(clients, base_url, **_mtls(pki)).get_customer("100100")
        assert customer.customer_id == "100100"


async def test_through_a_forward_proxy(
    mtls_sim: RunningSimulator, pki: Pki, clients: list[T24Client]
) -> None:
    _reset(mtls_sim, pki)
    async with ConnectProxy() as proxy:
        client = _client(clients, mtls_sim.base_url, proxy_url=proxy.url, **_mtls(pki))
        assert (await client.get_customer("100100")).customer_id == "100100"
        assert len(await client.list_accounts("100100")) == 3
        assert proxy.tunnels == [f"127.0.0.1:{mtls_sim.port}"]  # one kept-alive tunnel
    assert _calls(mtls_sim, pki)["customer"] == 1


async def test_the_proxy_variables_are_ignored_unless_asked_for(
    mtls_sim: RunningSimulator, pki: Pki, clients: list[T24Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "")
        direct = _client(clients, mtls_sim.base_url, **_mtls(pki))
        assert (await direct.get_customer("100100")).customer_id == "100100"
        assert proxy.tunnels == []
        from_env = _client(clients, mtls_sim.base_url, trust_env=True, **_mtls(pki))
        assert (await from_env.get_customer("100100")).customer_id == "100100"
        assert proxy.tunnels == [f"127.0.0.1:{mtls_sim.port}"]


def test_config_needs_cert_and_key_together(pki: Pki) -> None:
    with pytest.raises(ValueError, match="client_cert and client_key"):
        T24ClientConfig(base_url="https://x", client_cert=str(pki.client_cert))
    with pytest.raises(ValueError, match="proxy_url"):
        T24ClientConfig(base_url="https://x", proxy_url="socks5://127.0.0.1:1080")
    secret = T24ClientConfig(
        base_url="https://x", proxy_url="http://user:Proxy-Pa55@proxy:3128", **_mtls(pki)
    )
    assert "Proxy-Pa55" not in repr(secret) and CLIENT_KEY_PASSWORD not in repr(secret)


# --- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"t24_ca_bundle": "/nonexistent/ca.pem"}, "T24_CA_BUNDLE: no such file",
                     id="ca-missing"),
        pytest.param({"t24_ca_bundle": "{client_key}"}, "T24_CA_BUNDLE: not a PEM file",
                     id="ca-not-certificates"),
        pytest.param({"t24_client_cert": "{client_cert}"}, "T24_CLIENT_CERT and T24_CLIENT_KEY",
                     id="cert-without-key"),
        pytest.param({"t24_client_cert": "{client_cert}", "t24_client_key": "{client_key}"},
                     "T24_CLIENT_KEY: cannot load it", id="encrypted-key-without-password"),
        pytest.param({"t24_client_cert": "{client_cert}", "t24_client_key": "{client_key}",
                      "t24_client_key_password": "wrong"}, "T24_CLIENT_KEY: cannot load it",
                     id="wrong-password"),
        pytest.param({"t24_client_cert": "{client_cert}", "t24_client_key": "{server_key}"},
                     "T24_CLIENT_KEY: cannot load it", id="key-of-another-certificate"),
        pytest.param({"t24_proxy_url": "socks5://127.0.0.1:1080"}, "T24_PROXY_URL: must be",
                     id="proxy-scheme"),
        pytest.param({"t24_proxy_url": "http://127.0.0.1:3128", "t24_trust_env": True},
                     "T24_TRUST_ENV: set either", id="proxy-and-trust-env"),
    ],
)  # fmt: skip
def test_settings_refuse_bad_tls_and_proxy_values(
    pki: Pki, overrides: dict[str, Any], message: str
) -> None:
    files = {"client_cert": pki.client_cert, "client_key": pki.client_key,
             "server_key": pki.server_key}  # fmt: skip
    values = {k: v.format(**files) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises(ConfigError) as info:
        load_settings(**values)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert CLIENT_KEY_PASSWORD not in str(info.value)


def test_settings_accept_a_complete_tls_set(pki: Pki) -> None:
    settings = load_settings(
        t24_ca_bundle=pki.ca, t24_client_cert=pki.client_cert, t24_client_key=pki.client_key,
        t24_client_key_password=CLIENT_KEY_PASSWORD, t24_proxy_url="http://u:Pw-1@proxy:3128",
    )  # fmt: skip
    assert settings.t24_client_key == pki.client_key
    assert "Pw-1" not in repr(settings) and CLIENT_KEY_PASSWORD not in repr(settings)


# --- the simulator's command ----------------------------------------------------------------------


def test_t24_sim_command_serves_mutual_tls(pki: Pki) -> None:
    port = free_port()
    exe = str(Path(sys.executable).with_name("regstream"))
    command = [exe, "t24-sim", "--port", str(port), "--latency-ms", "0",
               "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
               "--client-ca", str(pki.ca)]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy()
    )
    try:
        url = f"https://127.0.0.1:{port}/_sim/healthz"
        deadline = time.monotonic() + 30
        with _control_client(pki) as http:
            while True:
                try:
                    assert http.get(url).json() == {"status": "ok"}
                    break
                except httpx.ConnectError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        no_certificate = ssl.create_default_context(cafile=str(pki.ca))
        with (
            httpx.Client(verify=no_certificate, trust_env=False, timeout=5) as http,
            pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)),
        ):
            http.get(url)
    finally:
        process.terminate()
        process.wait(15)


# --- the whole service ----------------------------------------------------------------------------


async def _validate(live: Any, scenario: str = "approved") -> dict[str, Any]:
    """Process one demo registration; the final update."""
    rid = (await live.load_demo())[scenario]
    headers = auth_headers(live, "admin")
    async with (
        StreamClient(live.url, headers=headers, registration_id=rid) as sse,
        httpx.AsyncClient(base_url=live.url, headers=headers) as http,
    ):
        assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
        final: dict[str, Any] = await sse.wait_final(rid)
    return final


def _tls_settings(pki: Pki, **changes: Any) -> dict[str, Any]:
    return {
        "t24_ca_bundle": pki.ca,
        "t24_client_cert": pki.client_cert,
        "t24_client_key": pki.client_key,
        "t24_client_key_password": CLIENT_KEY_PASSWORD,
        **changes,
    }


async def test_service_approves_over_mutual_tls_and_through_a_proxy(
    make_settings: SettingsFactory, mtls_sim: RunningSimulator, pki: Pki, tmp_path: Path
) -> None:
    settings = make_settings(t24_base_url=mtls_sim.base_url, **_tls_settings(pki))
    with serve_app(settings) as live:
        final = await _validate(live)
    assert (final["status"], final["details"]["accountsFound"]) == ("APPROVED", 2)

    # A database of its own (the demo loads again, so registration 1 again) needs a Redis history
    # of its own: publishing is exactly once per (registrationId, seq) and epoch, so the same
    # Redis would skip this database's registration 1 as already published.
    redis = Redis.from_url(settings.effective_redis_url or "")
    try:
        await redis.flushall()
    finally:
        await redis.aclose()
    async with ConnectProxy() as proxy:
        settings = make_settings(
            data_dir=tmp_path / "proxied",
            t24_base_url=mtls_sim.base_url, t24_proxy_url=proxy.url, **_tls_settings(pki),
        )  # fmt: skip
        with serve_app(settings) as live:
            final = await _validate(live)
        assert (final["status"], final["details"]["accountsFound"]) == ("APPROVED", 2)
        assert proxy.tunnels == [f"127.0.0.1:{mtls_sim.port}"]


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"t24_client_cert": None, "t24_client_key": None,
                      "t24_client_key_password": None}, id="no-client-certificate"),
        pytest.param({"t24_ca_bundle": "{other_ca}"}, id="server-certificate-from-another-ca"),
    ],
)  # fmt: skip
async def test_service_fails_the_run_with_core_tls_error(
    make_settings: SettingsFactory, mtls_sim: RunningSimulator, pki: Pki, changes: dict[str, Any]
) -> None:
    changes = {k: Path(str(pki.other_ca)) if v == "{other_ca}" else v for k, v in changes.items()}
    _reset(mtls_sim, pki)
    settings = make_settings(t24_base_url=mtls_sim.base_url, **_tls_settings(pki, **changes))
    with serve_app(settings) as live:
        final = await _validate(live)
    assert final["status"] == "FAILED"
    assert final["message"] == "TLS connection to core banking failed (certificates)"
    assert final["details"] == {"error": "CORE_TLS_ERROR", "retryable": False}
    assert _calls(mtls_sim, pki)["customer"] == 0


async def test_service_approves_with_a_holdings_v4_core(make_settings: SettingsFactory) -> None:
    with serve_in_thread(SimulatorConfig(latency_ms=0, holdings_v4=True)) as sim:
        with httpx.Client(timeout=5) as http:  # the simulator answers in the v4 shape
            body = http.get(f"{sim.base_url}/party/customers/100100/arrangements").json()["body"]
        assert [sorted(holding) for holding in body] == [
            ["productLineId", "products", "totalAccountBalances"]
        ]
        with serve_app(make_settings(t24_base_url=sim.base_url)) as live:
            final = await _validate(live)
    assert final["status"] == "APPROVED"
    assert final["message"] == "Customer validated successfully. Found 2 accounts."
