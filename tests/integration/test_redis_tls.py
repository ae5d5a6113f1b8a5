"""Redis over TLS with client certificates (issue 15 item 7): a private ``redis-server`` with
``--tls-port`` only, requiring client certificates signed by a throwaway CA made at test time with
``openssl``. The service connects through the URL form, the ``REDIS_HOST`` form and a TLS-only
sentinel (``rediss+sentinel://``); a wrong CA or a missing client certificate is refused with a
clear error, which the service's log repeats."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from redis.exceptions import ConnectionError as RedisConnectionError

from regstream.config import Settings
from regstream.core_banking.simulator.dataset import load_applicant
from regstream.core_banking.simulator.server import RunningSimulator
from regstream.realtime.connections import RedisTarget, TlsOptions, create_client
from regstream.realtime.embedded import find_server_binary
from tests.conftest import unavailable
from tests.support import StreamClient, auth_headers, free_port, serve_app


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # trusts nothing the server shows


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (EC keys: fast)."""
    if shutil.which("openssl") is None:
        unavailable("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *key, "-days", "1", "-subj", f"/CN=regstream test {ca}",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.crt", cwd=directory)  # fmt: skip
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", *key, "-subj", f"/CN=regstream test {name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
                 cwd=directory)  # fmt: skip
    return Pki(
        ca=directory / "ca.crt", server_cert=directory / "server.crt",
        server_key=directory / "server.key", client_cert=directory / "client.crt",
        client_key=directory / "client.key", other_ca=directory / "other-ca.crt",
    )  # fmt: skip


@dataclass
class TlsRedis:
    port: int
    pki: Pki
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def tls(self, *, ca: Path | None = None, client: bool = True) -> TlsOptions:
        return TlsOptions(
            ca=ca or self.pki.ca, cert=self.pki.client_cert if client else None,
            key=self.pki.client_key if client else None,
        )  # fmt: skip


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    """redis-server with TLS only (``--port 0``), client certificates required."""
    try:
        binary = find_server_binary()
    except Exception:  # noqa: BLE001
        unavailable("a redis-server binary")
        raise
    pki = _make_pki(tmp_path / "pki")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
         "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "yes",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    server = TlsRedis(port, pki, process)
    try:
        _wait_answers(server)
        yield server
    finally:
        process.kill()  # by PID
        process.wait(5)
        if process.stderr is not None:
            process.stderr.close()


def _wait_answers(server: TlsRedis, timeout: float = 10.0) -> None:
    import redis as redis_sync

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            err = server.process.stderr.read().decode() if server.process.stderr else ""
            if "TLS" in err and "not" in err.lower():
                unavailable(f"a redis-server built with TLS ({err.strip()[-120:]})")
            raise AssertionError(f"TLS redis-server exited: {err[-300:]}")
        client = redis_sync.Redis(
            port=server.port, ssl=True, ssl_ca_certs=str(server.pki.ca),
            ssl_certfile=str(server.pki.client_cert), ssl_keyfile=str(server.pki.client_key),
            socket_connect_timeout=0.5,
        )  # fmt: skip
        try:
            if client.ping():
                return
        except redis_sync.ConnectionError:
            time.sleep(0.05)
        finally:
            client.close()
    raise AssertionError("TLS redis-server did not answer in time")


def _settings(tmp_path: Path, t24: RunningSimulator, **redis: object) -> Settings:
    return Settings.model_validate(
        {
            "data_dir": tmp_path / "var",
            "t24_base_url": t24.base_url,
            "secret_key": SecretStr("tls-test-secret-key-0123456789abcdef"),
            "probe_interval": 1.0,
            **redis,
        }
    )


async def _validates_and_streams(live_url: str, headers: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=live_url, headers=headers) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        rid = (await client.post("/api/registrations", json=load_applicant(7_001))).json()["id"]
        async with StreamClient(live_url, registration_id=rid, headers=headers) as sse:
            assert (await client.post(f"/api/registrations/{rid}/process")).status_code == 202
            assert (await sse.wait_final(rid))["status"] == "APPROVED"


async def test_service_over_tls_with_a_client_certificate_url_form(
    tls_redis: TlsRedis, t24: RunningSimulator, tmp_path: Path
) -> None:
    settings = _settings(
        tmp_path, t24, redis_url=SecretStr(tls_redis.url), redis_tls_ca=tls_redis.pki.ca,
        redis_tls_cert=tls_redis.pki.client_cert, redis_tls_key=tls_redis.pki.client_key,
    )  # fmt: skip
    assert (
        RedisTarget.from_settings(settings).describe()
        == f"rediss://127.0.0.1:{tls_redis.port} (TLS)"
    )
    with serve_app(settings) as live:
        await _validates_and_streams(live.url, auth_headers(live, "operator"))


async def test_service_over_tls_with_a_client_certificate_host_form(
    tls_redis: TlsRedis, t24: RunningSimulator, tmp_path: Path
) -> None:
    """``REDIS_HOST`` + ``REDIS_TLS=true``: the URL it makes is ``redis://``, TLS all the same."""
    settings = _settings(
        tmp_path, t24, redis_host="127.0.0.1", redis_port=tls_redis.port, redis_tls=True,
        redis_tls_ca=tls_redis.pki.ca, redis_tls_cert=tls_redis.pki.client_cert,
        redis_tls_key=tls_redis.pki.client_key,
    )  # fmt: skip
    with serve_app(settings) as live:
        await _validates_and_streams(live.url, auth_headers(live, "operator"))


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        pytest.param("wrong-ca", ("CERTIFICATE_VERIFY_FAILED",), id="wrong-ca"),
        # the server's alert names the certificate; on a busy machine the client may see the
        # connection reset before it reads the alert (the good client below shows it was TLS)
        pytest.param("no-client-certificate", ("certificate", "reset", "EOF"),
                     id="no-client-certificate"),  # fmt: skip
    ],
)
async def test_tls_refusals_are_clear(
    tls_redis: TlsRedis, case: str, expected: tuple[str, ...]
) -> None:
    if case == "wrong-ca":
        tls = tls_redis.tls(ca=tls_redis.pki.other_ca)
    else:
        tls = tls_redis.tls(client=False)
    client = create_client(RedisTarget(url=tls_redis.url, tls=tls), name="tls-test", retries=0)
    try:
        with pytest.raises(RedisConnectionError) as info:
            await client.ping()
    finally:
        await client.aclose()
    assert any(text in str(info.value) for text in expected), str(info.value)
    # and with the right CA and certificate it answers (the refusal was about TLS, nothing else)
    good = create_client(RedisTarget(url=tls_redis.url, tls=tls_redis.tls()), name="tls-test")
    try:
        assert await good.ping() is True
    finally:
        await good.aclose()


@pytest.fixture
def tls_sentinel(tls_redis: TlsRedis, tmp_path: Path) -> Iterator[int]:
    """One sentinel, TLS only too (``tls-replication yes``: it talks TLS to the primary), watching
    ``tls_redis`` as ``mymaster``; yields its port."""
    import redis as redis_sync

    pki, port = tls_redis.pki, free_port()
    conf = tmp_path / "sentinel.conf"  # a sentinel rewrites its file: a private one
    conf.write_text(
        f"port 0\ntls-port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"tls-cert-file {pki.server_cert}\ntls-key-file {pki.server_key}\n"
        f"tls-ca-cert-file {pki.ca}\ntls-auth-clients yes\ntls-replication yes\n"
        f"sentinel monitor mymaster 127.0.0.1 {tls_redis.port} 1\n"
    )
    process = subprocess.Popen(
        [find_server_binary(), str(conf), "--sentinel"], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:
            client = redis_sync.Redis(
                port=port, ssl=True, ssl_ca_certs=str(pki.ca), ssl_certfile=str(pki.client_cert),
                ssl_keyfile=str(pki.client_key), socket_connect_timeout=0.5, decode_responses=True,
            )  # fmt: skip
            try:
                state = client.sentinel_master("mymaster")
                if isinstance(state, dict) and state.get("is_master") and not state.get("is_sdown"):
                    break
            except redis_sync.RedisError:
                pass
            finally:
                client.close()
            assert process.poll() is None, "the TLS sentinel exited"
            assert time.monotonic() < deadline, "the TLS sentinel did not see its primary"
            time.sleep(0.1)
        yield port
    finally:
        process.kill()  # by PID
        process.wait(5)


async def test_service_through_sentinel_over_tls(
    tls_redis: TlsRedis, tls_sentinel: int, t24: RunningSimulator, tmp_path: Path
) -> None:
    """``rediss+sentinel://``: TLS to the sentinel (discovery) and to the primary it names."""
    settings = _settings(
        tmp_path, t24, redis_url=SecretStr(f"rediss+sentinel://127.0.0.1:{tls_sentinel}/mymaster"),
        redis_tls_ca=tls_redis.pki.ca, redis_tls_cert=tls_redis.pki.client_cert,
        redis_tls_key=tls_redis.pki.client_key,
    )  # fmt: skip
    with serve_app(settings) as live:
        await _validates_and_streams(live.url, auth_headers(live, "operator"))


async def test_service_with_a_wrong_ca_says_why(
    tls_redis: TlsRedis, t24: RunningSimulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not ready, and the log names the TLS failure (not only "ConnectionError")."""
    settings = _settings(
        tmp_path, t24, redis_url=SecretStr(tls_redis.url), redis_tls_ca=tls_redis.pki.other_ca,
        redis_tls_cert=tls_redis.pki.client_cert, redis_tls_key=tls_redis.pki.client_key,
    )  # fmt: skip
    with serve_app(settings) as live:
        async with httpx.AsyncClient(base_url=live.url) as client:
            ready = await client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("down")
    lost = [r.getMessage() for r in caplog.records if "subscription lost" in r.getMessage()]
    assert lost and "CERTIFICATE_VERIFY_FAILED" in lost[0], lost[:1]
