"""Settings: environment names, derived URLs, one-line errors, secrets never printed; the Redis
target (URL, REDIS_HOST, Sentinel, TLS) resolved from them."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.asyncio import Redis

from regstream.config import ConfigError, load_settings, parse_sentinel_url
from regstream.realtime.connections import RedisTarget, create_client


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "REDIS_HOST", "DATABASE_URL", "T24_BASE_URL", "SSE_PING_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.effective_redis_url is None  # → embedded server
    assert settings.effective_database_url.startswith("sqlite+aiosqlite:///")
    assert settings.effective_database_url.endswith("var/regstream.sqlite3")
    assert settings.sse_ping_interval == 30.0


def test_seed_redis_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("REDIS_HOST", "cache.internal")
    monkeypatch.setenv("REDIS_PORT", "6380")
    monkeypatch.setenv("REDIS_PASSWORD", "p@ss word")
    settings = load_settings()
    assert settings.effective_redis_url == "redis://:p%40ss%20word@cache.internal:6380/0"
    assert "p@ss" not in repr(settings)


def test_postgres_url_is_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db/regstream")
    monkeypatch.setenv("REGSTREAM_SECRET_KEY", "k" * 32)  # a shared database needs one
    assert load_settings().effective_database_url == "postgresql+asyncpg://u@db/regstream"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        pytest.param("REDIS_PORT", "abc", "REDIS_PORT", id="port"),
        pytest.param("SSE_PING_INTERVAL", "-5", "SSE_PING_INTERVAL", id="ping"),
        pytest.param("DATABASE_URL", "mysql://x", "DATABASE_URL", id="database"),
        pytest.param("REDIS_URL", "http://secret-host", "REDIS_URL", id="redis-url"),
        # the seq keys' PX in ms: Redis refuses 0, after the script has published
        pytest.param("REGSTREAM_HISTORY_MAX_AGE", "0.5", "REGSTREAM_HISTORY_MAX_AGE", id="age"),
    ],
)
def test_bad_configuration_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("invalid configuration: ") and expected in text
    assert "secret-host" not in text


def test_an_outbox_too_small_for_the_pipeline_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runs in flight after the pipeline is held (half the outbox) must fit in the rest."""
    monkeypatch.setenv("REGSTREAM_PIPELINE_CONCURRENCY", "100")
    monkeypatch.setenv("REGSTREAM_OUTBOX_MAX", "1599")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == (
        "invalid configuration: REGSTREAM_OUTBOX_MAX (1599) must be at least 16 x "
        "REGSTREAM_PIPELINE_CONCURRENCY (100) = 1600"
    )
    monkeypatch.setenv("REGSTREAM_OUTBOX_MAX", "1600")
    assert load_settings().outbox_max == 1600


# --- Sentinel and TLS (issue 15 item 7) --------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "sentinels", "service", "db", "user", "password", "tls"),
    [
        pytest.param("redis+sentinel://s1:26379,s2:26380/mymaster",
                     (("s1", 26379), ("s2", 26380)), "mymaster", 0, None, None, False, id="plain"),
        pytest.param("redis+sentinel://s1,s2/cache/3", (("s1", 26379), ("s2", 26379)),
                     "cache", 3, None, None, False, id="default-port-and-db"),
        pytest.param("rediss+sentinel://app:p%40ss@[::1]:5000,s2:1/mymaster",
                     (("::1", 5000), ("s2", 1)), "mymaster", 0, "app", "p@ss", True,
                     id="tls-credentials-ipv6"),
        pytest.param("redis+sentinel://:only-secret@s1/m", (("s1", 26379),), "m", 0, None,
                     "only-secret", False, id="password-only"),
    ],
)  # fmt: skip
def test_sentinel_urls_are_parsed(
    url: str, sentinels: tuple[tuple[str, int], ...], service: str, db: int, user: str | None,
    password: str | None, tls: bool,
) -> None:  # fmt: skip
    address = parse_sentinel_url(url)
    assert (address.sentinels, address.service, address.db) == (sentinels, service, db)
    assert (address.username, address.password, address.tls) == (user, password, tls)
    if password:
        assert password not in repr(address)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("redis+sentinel://canary-secret@s1", "names its service", id="no-service"),
        pytest.param("redis+sentinel://u:canary-secret@s1/m/x", "/service or /service/db",
                     id="bad-db"),
        pytest.param("redis+sentinel://u:canary-secret@s1:port/m", "port is a number",
                     id="bad-port"),
        pytest.param("redis+sentinel://u:canary-secret@s1:99999/m", "between 1 and 65535",
                     id="port-range"),
        pytest.param("redis+sentinel://u:canary-secret@/m", "at least one sentinel",
                     id="no-host"),
        pytest.param("redis+sentinel://u:canary-secret@s1/m?db=1", "takes no query",
                     id="query"),
    ],
)  # fmt: skip
def test_bad_sentinel_urls_are_one_line_without_the_secret(
    monkeypatch: pytest.MonkeyPatch, url: str, expected: str
) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ConfigError) as info:
        load_settings()
    text = str(info.value)
    assert text.startswith("invalid configuration: REDIS_URL: ") and expected in text
    assert "\n" not in text and "canary-secret" not in text


def test_sentinels_from_their_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("REDIS_SENTINELS", "10.0.0.1:26379, 10.0.0.2 ,[fd00::3]:26380")
    monkeypatch.setenv("REDIS_SENTINEL_SERVICE", "regstream")
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", "sentinel-canary")
    monkeypatch.setenv("REDIS_PASSWORD", "redis canary")
    settings = load_settings()
    assert settings.effective_redis_url == (
        "redis+sentinel://:redis%20canary@10.0.0.1:26379,10.0.0.2:26379,[fd00::3]:26380/regstream/0"
    )
    target = RedisTarget.from_settings(settings)
    assert target.sentinel is not None
    assert target.sentinel.sentinels == (
        ("10.0.0.1", 26379), ("10.0.0.2", 26379), ("fd00::3", 26380),
    )  # fmt: skip
    assert (target.sentinel.service, target.sentinel.password) == ("regstream", "redis canary")
    assert target.sentinel_password == "sentinel-canary" and target.tls is None
    assert target.describe() == "Sentinel service 'regstream' (3 sentinels)"
    assert "canary" not in repr(target) and "canary" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({"REDIS_SENTINELS": "s1:26379"},
                     "REDIS_SENTINEL_SERVICE: required with REDIS_SENTINELS", id="no-service"),
        pytest.param({"REDIS_SENTINELS": "s1", "REDIS_SENTINEL_SERVICE": "m",
                      "REDIS_URL": "redis://h:6379/0"},
                     "REDIS_SENTINELS: set either REDIS_URL or REDIS_SENTINELS", id="both"),
        pytest.param({"REDIS_SENTINELS": "s1:x"}, "REDIS_SENTINELS: a sentinel's port",
                     id="bad-list"),
        pytest.param({"REDIS_TLS_CA": "/nonexistent/ca.pem"},
                     "REDIS_TLS_CA: no such file: /nonexistent/ca.pem", id="missing-ca"),
        pytest.param({"REDIS_TLS_CERT": "{file}"}, "REDIS_TLS_CERT and REDIS_TLS_KEY",
                     id="cert-without-key"),
        pytest.param({"REDIS_URL": "unix:///run/redis.sock", "REDIS_TLS": "true"},
                     "REDIS_TLS: a unix:// socket does not use TLS", id="unix-tls"),
        pytest.param({"REDIS_URL": "rediss://h:6380/0", "REDIS_TLS": "false"},
                     "REDIS_TLS: false contradicts", id="tls-false-rediss"),
        pytest.param({"REDIS_URL": "rediss://h:6380/0?ssl_cert_reqs=none"},
                     "REDIS_URL: TLS options go in REDIS_TLS", id="ssl-query"),
        pytest.param({"REDIS_TLS": "true"}, "REDIS_TLS: TLS needs a Redis to talk to",
                     id="tls-without-redis"),
    ],
)  # fmt: skip
def test_bad_sentinel_and_tls_settings_are_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    pem = tmp_path / "client.pem"
    pem.write_text("not checked here: redis-py reads it at connect\n")
    text = _refused(monkeypatch, {name: value.format(file=pem) for name, value in env.items()})
    assert expected in text, text


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ("REDIS_CLUSTER=true REDIS_SENTINELS=s1:26379 REDIS_SENTINEL_SERVICE=m",
         "REDIS_CLUSTER: a Redis Cluster is named"),
        ("REDIS_CLUSTER=true REDIS_URL=unix:///run/redis.sock",
         "REDIS_CLUSTER: a Redis Cluster is named"),
        ("REDIS_CLUSTER=true", "REDIS_CLUSTER: needs REDIS_URL"),
        ("REDIS_CLUSTER_NODES=n1:7000,n2:x", "REDIS_CLUSTER_NODES: a node's port is a number"),
        ("REDIS_CLUSTER_NODES=n1:7000 REDIS_CLUSTER=false", "REDIS_CLUSTER_NODES: the nodes"),
        ("REDIS_CLUSTER_NODES=n1:7000 REDIS_URL=unix:///run/redis.sock",
         "REDIS_CLUSTER_NODES: the nodes"),
        ("REGSTREAM_PARTITIONS=65", "REGSTREAM_PARTITIONS"),
    ],
)  # fmt: skip
def test_bad_cluster_settings_are_one_line(
    monkeypatch: pytest.MonkeyPatch, env: str, expected: str
) -> None:
    """A Redis Cluster (issue 18) is named by a node's URL (not Sentinel, not a unix socket);
    at most 64 partitions."""
    text = _refused(monkeypatch, dict(pair.split("=", 1) for pair in env.split()))
    assert expected in text, text


def _refused(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> str:
    """The one-line ConfigError of ``load_settings`` with ``env`` set and no other Redis named."""
    for name in ("REDIS_URL", "REDIS_HOST", "REDIS_SENTINELS", "REDIS_TLS", "REDIS_CLUSTER",
                 "REDIS_CLUSTER_NODES"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    text = str(info.value)
    assert "\n" not in text and text.startswith("invalid configuration: ")
    return text


@pytest.mark.parametrize(
    ("env", "tls", "scheme_class"),
    [
        pytest.param({"REDIS_URL": "rediss://cache:6380/0"}, True, None, id="rediss"),
        pytest.param({"REDIS_URL": "redis://cache:6379/0", "REDIS_TLS": "true"}, True,
                     "SSLConnection", id="redis-url-with-tls"),
        pytest.param({"REDIS_HOST": "cache", "REDIS_TLS_CA": "{ca}"}, True, "SSLConnection",
                     id="host-form-implied-by-a-file"),
        pytest.param({"REDIS_HOST": "cache"}, False, None, id="host-form-plain"),
    ],
)  # fmt: skip
def test_tls_settings_become_redis_py_ssl_options(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], tls: bool,
    scheme_class: str | None,
) -> None:  # fmt: skip
    ca, cert, key = (tmp_path / name for name in ("ca.pem", "client.pem", "client.key"))
    for path in (ca, cert, key):
        path.write_text("-")
    for name in ("REDIS_URL", "REDIS_HOST", "REDIS_SENTINELS", "REDIS_TLS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(ca=ca))
    if tls:
        monkeypatch.setenv("REDIS_TLS_CERT", str(cert))
        monkeypatch.setenv("REDIS_TLS_KEY", str(key))
    settings = load_settings()
    assert settings.redis_tls_enabled is tls
    target = RedisTarget.from_settings(settings)
    if not tls:
        assert target.tls is None
        return
    assert target.tls is not None
    options = target.tls.connection_kwargs()
    assert options["ssl_cert_reqs"] == "required" and options["ssl_check_hostname"] is True
    assert (options["ssl_certfile"], options["ssl_keyfile"]) == (str(cert), str(key))
    assert options.get("ssl_ca_certs") == (str(ca) if "REDIS_TLS_CA" in env else None)
    assert target.describe().endswith("(TLS)")
    # a redis:// URL (REDIS_HOST makes one) still gets a TLS connection class
    client = create_client(target, name="unit")
    assert isinstance(client, Redis)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs.get("ssl_certfile") == str(cert)
    assert client.connection_pool.connection_class.__name__ == (scheme_class or "SSLConnection")


def test_log_levels_per_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGSTREAM_LOG_LEVELS", "regstream.core_banking.client=debug")
    assert load_settings().log_levels == (("regstream.core_banking.client", "DEBUG"),)
    monkeypatch.setenv("REGSTREAM_LOG_LEVELS", "httpx=DEBUG")  # a library: not ours to open up
    with pytest.raises(ConfigError, match="REGSTREAM_LOG_LEVELS|log_levels"):
        load_settings()
    monkeypatch.delenv("REGSTREAM_LOG_LEVELS")
    assert load_settings().log_levels == ()
