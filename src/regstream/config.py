"""Settings, read once from the environment and validated at start.

Every knob is an environment variable (see the README's configuration table). The names the issue
and the seed fix (``REDIS_URL``, ``REDIS_HOST``/``REDIS_PORT``/``REDIS_PASSWORD``, ``DATABASE_URL``,
``T24_BASE_URL``, ``SSE_PING_INTERVAL``) are used as they are; our own knobs start with
``REGSTREAM_``. Secrets are ``SecretStr`` and never printed.

Build a ``Settings`` in ``app``/``cli`` and pass it down; nothing imports a global instance.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


#: shortest REGSTREAM_SECRET_KEY accepted (see ``Settings._check_secret_key``)
MIN_SECRET_KEY_LENGTH = 32


class ConfigError(Exception):
    """Bad configuration; ``str(exc)`` is one line fit for a terminal."""


SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")


@dataclass(frozen=True)
class SentinelAddress:
    """A parsed ``redis+sentinel://[user:password@]host:port[,host:port…]/service[/db]``.

    Credentials in the URL are the Redis servers' (as in a ``redis://`` URL); the sentinels'
    own are ``REDIS_SENTINEL_USERNAME``/``REDIS_SENTINEL_PASSWORD``. ``rediss+sentinel://``
    means TLS to both. redis-py has no URL form for Sentinel, hence this parser.
    """

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = dataclass_field(default=None, repr=False)
    tls: bool = False


def parse_sentinel_url(url: str) -> SentinelAddress:
    """Parse a Sentinel URL; ``ValueError`` says what is wrong without echoing the URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis+sentinel", "rediss+sentinel"):
        raise ValueError("a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://")
    rest, _, _fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    if query:
        raise ValueError("a Sentinel URL takes no query; use the REDIS_* settings")
    netloc, slash, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = parse_host_list(netloc, default_port=26379)
    parts = [unquote(p) for p in path.split("/")] if slash else []
    if not parts or not parts[0]:
        raise ValueError("a Sentinel URL names its service: redis+sentinel://hosts/mymaster")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError("a Sentinel URL's path is /service or /service/db (a number)")
    db = int(parts[1]) if len(parts) == 2 else 0
    return SentinelAddress(
        sentinels=sentinels, service=parts[0], db=db, username=username, password=password,
        tls=scheme == "rediss+sentinel",
    )  # fmt: skip


def parse_host_list(
    text: str, *, default_port: int = 26379, kind: str = "sentinel"
) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` (``[v6]:port`` too; the port defaults to Sentinel's 26379);
    ``kind`` names an item in the errors (``sentinel``, ``node``)."""
    hosts = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.startswith("["):
            host, bracket, tail = item[1:].partition("]")
            if not bracket or (tail and not tail.startswith(":")):
                raise ValueError(f"an IPv6 {kind} is written [address]:port")
            port_text = tail[1:]
        else:
            host, _, port_text = item.partition(":")
        if not host or any(c in host for c in "/@?# "):
            raise ValueError(f"a {kind} is host:port, separated by commas")
        if port_text and not port_text.isdigit():
            raise ValueError(f"a {kind}'s port is a number")
        port = int(port_text) if port_text else default_port
        if not 0 < port < 65536:
            raise ValueError(f"a {kind}'s port is between 1 and 65535")
        hosts.append((host, port))
    if not hosts:
        raise ValueError(f"needs at least one {kind} as host:port")
    return tuple(hosts)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_LOG_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "ERROR"})


def parse_log_levels(text: str) -> tuple[tuple[str, str], ...]:
    """``REGSTREAM_LOG_LEVELS``: comma-separated ``logger=LEVEL`` pairs, e.g.
    ``regstream.core_banking.client=DEBUG`` (a successful T24 attempt's line). Only the service's
    own loggers (``regstream``, ``regstream.…``): libraries' DEBUG lines may carry query
    parameters, and ``logs.configure`` holds some of them at WARNING. ``ValueError`` otherwise."""
    levels = []
    for item in text.split(","):
        name, sep, level = (part.strip() for part in item.partition("="))
        if not item.strip():
            continue
        if not sep or not (name == "regstream" or name.startswith("regstream.")):
            raise ValueError("expected regstream[.module]=LEVEL pairs, comma-separated")
        if level.upper() not in _LOG_LEVELS:
            raise ValueError("a level must be DEBUG, INFO, WARNING or ERROR")
        levels.append((name, level.upper()))
    return tuple(levels)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    # --- where things live -------------------------------------------------------------------
    data_dir: Path = Field(Path("var"), validation_alias=_env("REGSTREAM_DATA_DIR"))
    database_url: str | None = Field(None, validation_alias=_env("DATABASE_URL"))
    migrate_on_start: bool = Field(True, validation_alias=_env("REGSTREAM_MIGRATE_ON_START"))
    redis_url: SecretStr | None = Field(None, validation_alias=_env("REDIS_URL"))
    redis_host: str | None = Field(None, validation_alias=_env("REDIS_HOST"))
    redis_port: int = Field(6379, ge=1, le=65535, validation_alias=_env("REDIS_PORT"))
    redis_password: SecretStr | None = Field(None, validation_alias=_env("REDIS_PASSWORD"))
    redis_username: str | None = Field(None, validation_alias=_env("REDIS_USERNAME"))
    # Sentinel (docs/operations.md): REDIS_SENTINELS + REDIS_SENTINEL_SERVICE, or a
    # redis+sentinel:// REDIS_URL; REDIS_SENTINEL_PASSWORD authenticates to the sentinels only.
    redis_sentinels: Annotated[tuple[tuple[str, int], ...], NoDecode] = Field(
        (), validation_alias=_env("REDIS_SENTINELS")
    )
    redis_sentinel_service: str | None = Field(
        None, validation_alias=_env("REDIS_SENTINEL_SERVICE")
    )
    redis_sentinel_username: str | None = Field(
        None, validation_alias=_env("REDIS_SENTINEL_USERNAME")
    )
    redis_sentinel_password: SecretStr | None = Field(
        None, validation_alias=_env("REDIS_SENTINEL_PASSWORD")
    )
    # TLS to Redis (and to the sentinels): on with rediss://, REDIS_TLS=true or any file below
    redis_tls: bool | None = Field(None, validation_alias=_env("REDIS_TLS"))
    redis_tls_ca: Path | None = Field(None, validation_alias=_env("REDIS_TLS_CA"))
    redis_tls_cert: Path | None = Field(None, validation_alias=_env("REDIS_TLS_CERT"))
    redis_tls_key: Path | None = Field(None, validation_alias=_env("REDIS_TLS_KEY"))
    redis_tls_check_hostname: bool = Field(
        True, validation_alias=_env("REDIS_TLS_CHECK_HOSTNAME")
    )

    # --- T24 core banking --------------------------------------------------------------------
    t24_base_url: str | None = Field(None, validation_alias=_env("T24_BASE_URL"))
    t24_username: str | None = Field(None, validation_alias=_env("T24_USERNAME"))
    t24_password: SecretStr | None = Field(None, validation_alias=_env("T24_PASSWORD"))
    t24_company_id: str = Field("GB0010001", validation_alias=_env("T24_COMPANY_ID"))
    t24_timeout: PositiveFloat = Field(5.0, validation_alias=_env("T24_TIMEOUT"))
    t24_deadline: PositiveFloat = Field(15.0, validation_alias=_env("T24_DEADLINE"))
    t24_max_attempts: Annotated[int, Field(ge=1, le=10)] = Field(
        3, validation_alias=_env("T24_MAX_ATTEMPTS")
    )
    # TLS to T24 (docs/operations.md "T24 core"): CAs to trust, our client certificate (mutual
    # TLS); an explicit proxy; the standard proxy variables only with T24_TRUST_ENV=true
    t24_ca_bundle: Path | None = Field(None, validation_alias=_env("T24_CA_BUNDLE"))
    t24_client_cert: Path | None = Field(None, validation_alias=_env("T24_CLIENT_CERT"))
    t24_client_key: Path | None = Field(None, validation_alias=_env("T24_CLIENT_KEY"))
    t24_client_key_password: SecretStr | None = Field(
        None, validation_alias=_env("T24_CLIENT_KEY_PASSWORD")
    )
    t24_proxy_url: SecretStr | None = Field(None, validation_alias=_env("T24_PROXY_URL"))
    t24_trust_env: bool = Field(False, validation_alias=_env("T24_TRUST_ENV"))
    t24_sim_latency_ms: Annotated[float, Field(ge=0)] = Field(
        50.0, validation_alias=_env("T24_SIM_LATENCY_MS")
    )

    # --- streaming ---------------------------------------------------------------------------
    sse_ping_interval: PositiveFloat = Field(30.0, validation_alias=_env("SSE_PING_INTERVAL"))
    sse_retry_ms: PositiveInt = Field(5000, validation_alias=_env("SSE_RETRY_MS"))
    sse_max_buffer_bytes: PositiveInt = Field(
        256 * 1024, validation_alias=_env("SSE_MAX_BUFFER_BYTES")
    )
    sse_max_streams: PositiveInt = Field(20_000, validation_alias=_env("SSE_MAX_STREAMS"))
    # false: every stream on the portable queued path, not taken over from uvicorn (api/takeover.py)
    stream_fast_path: bool = Field(True, validation_alias=_env("REGSTREAM_STREAM_FAST_PATH"))
    # stream start-ups (history read or snapshot) at once, waiting, and how long (api/admission.py)
    resume_concurrency: Annotated[int, Field(ge=1, le=256)] = Field(
        16, validation_alias=_env("REGSTREAM_RESUME_CONCURRENCY")
    )
    resume_queue: Annotated[int, Field(ge=0, le=100_000)] = Field(
        1000, validation_alias=_env("REGSTREAM_RESUME_QUEUE")
    )
    resume_wait: Annotated[float, Field(ge=0, le=60)] = Field(
        5.0, validation_alias=_env("REGSTREAM_RESUME_WAIT")
    )
    history_maxlen: PositiveInt = Field(10_000, validation_alias=_env("REGSTREAM_HISTORY_MAXLEN"))
    # Redis Cluster (docs/operations.md "Redis Cluster"): detected from the server when unset
    # (INFO cluster); true/false forces it. In cluster mode updates go to REGSTREAM_PARTITIONS
    # partitions by registration id (fixed per deployment: changing it re-syncs every stream),
    # each a hash-tagged channel + history published with SPUBLISH; the seed's channel then gets
    # a copy of every update only with REGSTREAM_SEED_CHANNEL_MIRROR (a cluster-wide broadcast).
    redis_cluster: bool | None = Field(None, validation_alias=_env("REDIS_CLUSTER"))
    # more startup nodes (host:port,...) besides REDIS_URL's: a client asks the next one when one
    # is down (at start, at detection, at each refresh of the slot map); REDIS_URL still gives
    # the scheme, credentials and TLS (without it: redis:// to the first node)
    redis_cluster_nodes: Annotated[tuple[tuple[str, int], ...], NoDecode] = Field(
        (), validation_alias=_env("REDIS_CLUSTER_NODES")
    )
    partitions: int = Field(16, ge=1, le=64, validation_alias=_env("REGSTREAM_PARTITIONS"))
    seed_channel_mirror: bool = Field(
        False, validation_alias=_env("REGSTREAM_SEED_CHANNEL_MIRROR")
    )
    # a partition no stream of this instance follows any more is unsubscribed after this long
    partition_linger: PositiveFloat = Field(
        30.0, validation_alias=_env("REGSTREAM_PARTITION_LINGER")
    )
    # at least 1 s: it is also the seq keys' PX, in ms, which Redis refuses at 0
    history_max_age: Annotated[float, Field(ge=1.0)] = Field(
        3600.0, validation_alias=_env("REGSTREAM_HISTORY_MAX_AGE")
    )
    outbox_max: PositiveInt = Field(10_000, validation_alias=_env("REGSTREAM_OUTBOX_MAX"))
    probe_interval: PositiveFloat = Field(5.0, validation_alias=_env("REGSTREAM_PROBE_INTERVAL"))

    # --- pipeline ----------------------------------------------------------------------------
    pipeline_concurrency: PositiveInt = Field(
        64, validation_alias=_env("REGSTREAM_PIPELINE_CONCURRENCY")
    )
    lease_seconds: PositiveFloat = Field(60.0, validation_alias=_env("REGSTREAM_LEASE_SECONDS"))
    # young-generation threshold of the garbage collector once started (gc_tuning.py; the
    # start-up heap is frozen too); 0: the interpreter's collector as it is
    gc_gen0_threshold: Annotated[int, Field(ge=0)] = Field(
        10_000, validation_alias=_env("REGSTREAM_GC_GEN0_THRESHOLD")
    )
    # the shared work queue (pipeline/fleet.py): a dead instance's runs are taken over once its
    # heartbeat is older than the timeout; queued runs are looked for at least every poll
    heartbeat_interval: PositiveFloat = Field(
        2.0, validation_alias=_env("REGSTREAM_HEARTBEAT_INTERVAL")
    )
    heartbeat_timeout: PositiveFloat = Field(
        10.0, validation_alias=_env("REGSTREAM_HEARTBEAT_TIMEOUT")
    )
    queue_poll_interval: Annotated[float, Field(gt=0, le=60)] = Field(
        1.0, validation_alias=_env("REGSTREAM_QUEUE_POLL_INTERVAL")
    )
    shutdown_grace: Annotated[float, Field(ge=0)] = Field(
        10.0, validation_alias=_env("REGSTREAM_SHUTDOWN_GRACE")
    )
    # a rolling restart (drain.py): readiness off first, then streams closed over a spread
    drain_delay: Annotated[float, Field(ge=0, le=600)] = Field(
        5.0, validation_alias=_env("REGSTREAM_DRAIN_DELAY")
    )
    drain_spread: Annotated[float, Field(ge=0, le=600)] = Field(
        5.0, validation_alias=_env("REGSTREAM_DRAIN_SPREAD")
    )
    db_statement_timeout: PositiveFloat = Field(
        5.0, validation_alias=_env("REGSTREAM_DB_STATEMENT_TIMEOUT")
    )
    # connections to the database per instance: up to twice this (pool + overflow), plus the
    # work queue's LISTEN connection (docs/capacity.md: instances x that <= max_connections)
    db_pool_size: Annotated[int, Field(ge=1, le=500)] = Field(
        20, validation_alias=_env("REGSTREAM_DB_POOL_SIZE")
    )
    # national-id HMAC keys (docs/operations.md "Secret key"): required with DATABASE_URL
    secret_key: SecretStr | None = Field(None, validation_alias=_env("REGSTREAM_SECRET_KEY"))
    previous_secret_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), validation_alias=_env("REGSTREAM_PREVIOUS_SECRET_KEYS")
    )

    # --- security (docs/security.md) ---------------------------------------------------------
    session_lifetime: PositiveFloat = Field(
        8 * 3600.0, validation_alias=_env("REGSTREAM_SESSION_LIFETIME")
    )
    cookie_secure: Literal["auto", "always", "never"] = Field(
        "auto", validation_alias=_env("REGSTREAM_COOKIE_SECURE")
    )
    trust_proxy: bool = Field(False, validation_alias=_env("REGSTREAM_TRUST_PROXY"))
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), validation_alias=_env("REGSTREAM_CORS_ORIGINS")
    )
    max_body_bytes: PositiveInt = Field(
        64 * 1024, validation_alias=_env("REGSTREAM_MAX_BODY_BYTES")
    )
    streams_per_user: PositiveInt = Field(20, validation_alias=_env("REGSTREAM_STREAMS_PER_USER"))
    process_rate_per_minute: PositiveInt = Field(
        600, validation_alias=_env("REGSTREAM_PROCESS_RATE_PER_MINUTE")
    )
    login_attempts_per_minute: PositiveInt = Field(
        10, validation_alias=_env("REGSTREAM_LOGIN_ATTEMPTS_PER_MINUTE")
    )
    login_attempts_per_address_per_minute: PositiveInt = Field(
        30, validation_alias=_env("REGSTREAM_LOGIN_ATTEMPTS_PER_ADDRESS_PER_MINUTE")
    )
    stream_ticket_ttl: Annotated[float, Field(gt=0, le=600)] = Field(
        60.0, validation_alias=_env("REGSTREAM_STREAM_TICKET_TTL")
    )
    metrics_public: bool = Field(False, validation_alias=_env("REGSTREAM_METRICS_PUBLIC"))

    # --- logging -----------------------------------------------------------------------------
    log_level: str = Field("INFO", validation_alias=_env("REGSTREAM_LOG_LEVEL"))
    log_json: bool = Field(False, validation_alias=_env("REGSTREAM_LOG_JSON"))
    # per-logger levels, "regstream.core_banking.client=DEBUG[,…]" (parse_log_levels)
    log_levels: Annotated[tuple[tuple[str, str], ...], NoDecode] = Field(
        (), validation_alias=_env("REGSTREAM_LOG_LEVELS")
    )

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if value.startswith("postgresql://") or value.startswith("postgres://"):
            value = "postgresql+asyncpg://" + value.split("://", 1)[1]
        if not (
            value.startswith("postgresql+asyncpg://") or value.startswith("sqlite+aiosqlite://")
        ):
            raise ValueError("must start with postgresql+asyncpg:// or sqlite+aiosqlite://")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        url = value.get_secret_value()
        if url.startswith(SENTINEL_SCHEMES):
            parse_sentinel_url(url)  # a ValueError names the part that is wrong, never a secret
            return value
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "must start with redis://, rediss://, unix://, redis+sentinel:// or "
                "rediss+sentinel://"
            )
        query = urlsplit(url).query
        if any(name.startswith("ssl") for name, _ in parse_qsl(query)):
            raise ValueError(
                "TLS options go in REDIS_TLS, REDIS_TLS_CA, REDIS_TLS_CERT and REDIS_TLS_KEY, "
                "not in the URL's query"
            )
        return value

    @field_validator("redis_sentinels", "redis_cluster_nodes", mode="before")
    @classmethod
    def _check_host_list(cls, value: object, info: ValidationInfo) -> tuple[tuple[str, int], ...]:
        if value is None or value == "":
            return ()
        if not isinstance(value, str):
            return tuple(value)  # type: ignore[arg-type]  # already parsed (model_copy, tests)
        if info.field_name == "redis_cluster_nodes":
            return parse_host_list(value, default_port=6379, kind="node")
        return parse_host_list(value)

    @field_validator(
        "redis_tls_ca", "redis_tls_cert", "redis_tls_key",
        "t24_ca_bundle", "t24_client_cert", "t24_client_key",
    )  # fmt: skip
    @classmethod
    def _check_readable_file(cls, value: Path | None) -> Path | None:
        if value is None or str(value) == "":
            return None
        if not value.is_file():
            raise ValueError(f"no such file: {value}")
        if not os.access(value, os.R_OK):
            raise ValueError(f"not readable by this process: {value}")
        return value

    @model_validator(mode="after")
    def _check_redis_target(self) -> Settings:
        url = self.redis_url.get_secret_value() if self.redis_url is not None else ""
        if self.redis_sentinels and url:
            raise ValueError("REDIS_SENTINELS: set either REDIS_URL or REDIS_SENTINELS, not both")
        if self.redis_sentinels and not self.redis_sentinel_service:
            raise ValueError("REDIS_SENTINEL_SERVICE: required with REDIS_SENTINELS")
        not_a_node = self.redis_sentinels or url.startswith(
            ("unix://", "redis+sentinel", "rediss+sentinel")
        )
        if self.redis_cluster and not_a_node:
            raise ValueError(
                "REDIS_CLUSTER: a Redis Cluster is named by one node's redis:// or rediss:// URL "
                "(no Sentinel, no unix socket)"
            )
        if self.redis_cluster_nodes and (not_a_node or self.redis_cluster is False):
            raise ValueError(
                "REDIS_CLUSTER_NODES: the nodes of a Redis Cluster (not with Sentinel, a unix "
                "socket or REDIS_CLUSTER=false)"
            )
        if self.redis_cluster and not (url or self.redis_host or self.redis_cluster_nodes):
            raise ValueError(
                "REDIS_CLUSTER: needs REDIS_URL, REDIS_HOST or REDIS_CLUSTER_NODES naming a node"
            )
        if (self.redis_tls_cert is None) != (self.redis_tls_key is None):
            raise ValueError("REDIS_TLS_CERT and REDIS_TLS_KEY: a client certificate needs both")
        files = (self.redis_tls_ca, self.redis_tls_cert, self.redis_tls_key)
        if url.startswith("unix://") and (self.redis_tls or any(f is not None for f in files)):
            raise ValueError("REDIS_TLS: a unix:// socket does not use TLS")
        if self.redis_tls is False and (
            url.startswith(("rediss://", "rediss+sentinel://")) or any(f is not None for f in files)
        ):
            raise ValueError("REDIS_TLS: false contradicts rediss:// or REDIS_TLS_* files")
        tls = self.redis_tls or any(f is not None for f in files)
        if tls and not (
            url or self.redis_host or self.redis_sentinels or self.redis_cluster_nodes
        ):
            raise ValueError(
                "REDIS_TLS: TLS needs a Redis to talk to (REDIS_URL, REDIS_HOST, REDIS_SENTINELS "
                "or REDIS_CLUSTER_NODES); the embedded one is a local socket"
            )
        return self

    @field_validator("t24_proxy_url")
    @classmethod
    def _check_t24_proxy_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be http://[user:password@]host:port or https://...")
        return value

    @model_validator(mode="after")
    def _check_t24_tls(self) -> Settings:
        cert, key = self.t24_client_cert, self.t24_client_key
        if (cert is None) != (key is None):
            raise ValueError("T24_CLIENT_CERT and T24_CLIENT_KEY: a client certificate needs both")
        if self.t24_client_key_password is not None and key is None:
            raise ValueError("T24_CLIENT_KEY_PASSWORD: set without T24_CLIENT_KEY")
        if self.t24_proxy_url is not None and self.t24_trust_env:
            raise ValueError("T24_TRUST_ENV: set either T24_PROXY_URL or T24_TRUST_ENV=true")
        # Load them as the client will (core_banking.client.tls_context): a wrong password, a
        # key of another certificate or a file that is not PEM stops the start, not each call.
        context = ssl.create_default_context()
        if self.t24_ca_bundle is not None:
            try:
                context.load_verify_locations(cafile=self.t24_ca_bundle)
            except (ssl.SSLError, ValueError):
                raise ValueError("T24_CA_BUNDLE: not a PEM file of CA certificates") from None
        if cert is not None and key is not None:
            password = self.t24_client_key_password
            try:
                context.load_cert_chain(  # (never OpenSSL's terminal prompt: b"" if unset)
                    cert, key, password=password.get_secret_value() if password else b""
                )
            except (ssl.SSLError, ValueError):
                raise ValueError(
                    "T24_CLIENT_KEY: cannot load it with T24_CLIENT_CERT (not PEM, another "
                    "certificate's key, or an encrypted key without the right "
                    "T24_CLIENT_KEY_PASSWORD)"
                ) from None
        return self

    @field_validator("secret_key")
    @classmethod
    def _check_secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        key = value.get_secret_value()
        # 32 characters: 128 bits or more from any random source (`openssl rand -hex 32` gives
        # 64). A shorter key already in use can still match as a previous key while rotating.
        if len(key) < MIN_SECRET_KEY_LENGTH:
            raise ValueError(
                f"must be at least {MIN_SECRET_KEY_LENGTH} characters (e.g. openssl rand -hex 32);"
                " a shorter key in use goes to REGSTREAM_PREVIOUS_SECRET_KEYS (docs/operations.md)"
            )
        if key != key.strip() or "," in key:
            raise ValueError(
                "must not contain commas or surrounding whitespace (a key rotated out is listed"
                " in the comma-separated REGSTREAM_PREVIOUS_SECRET_KEYS)"
            )
        return value

    @field_validator("previous_secret_keys", mode="before")
    @classmethod
    def _split_previous_secret_keys(cls, value: object) -> tuple[SecretStr, ...]:
        if value is None or value == "":
            return ()
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
        keys = (i.get_secret_value() if isinstance(i, SecretStr) else str(i) for i in items)
        return tuple(SecretStr(key.strip()) for key in keys if key.strip())

    @field_validator("log_levels", mode="before")
    @classmethod
    def _check_log_levels(cls, value: object) -> tuple[tuple[str, str], ...]:
        if value is None or value == "":
            return ()
        if not isinstance(value, str):
            return tuple(value)  # type: ignore[arg-type]  # already parsed (model_copy, tests)
        return parse_log_levels(value)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _check_cors_origins(cls, value: object) -> tuple[str, ...]:
        if value is None or value == "":
            return ()
        items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
        origins = []
        for item in (str(i).strip().rstrip("/") for i in items):
            if not item:
                continue
            parts = urlsplit(item)
            if item == "*" or parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(
                    "must be a comma-separated list of origins like https://ops.example"
                )
            if parts.path or parts.query or parts.fragment:
                raise ValueError("an origin is scheme://host[:port] without a path")
            origins.append(item)
        return tuple(origins)

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return level

    @model_validator(mode="after")
    def _check_outbox_fits_the_pipeline(self) -> Settings:
        # The pipeline holds new runs once the outbox is half full (publisher.wait_for_room);
        # the runs already in flight (~8 updates each) must fit in the other half, or a burst
        # could still overflow it while Redis is healthy.
        if self.outbox_max < 16 * self.pipeline_concurrency:
            raise ValueError(
                f"REGSTREAM_OUTBOX_MAX ({self.outbox_max}) must be at least 16 x "
                f"REGSTREAM_PIPELINE_CONCURRENCY ({self.pipeline_concurrency}) = "
                f"{16 * self.pipeline_concurrency}"
            )
        return self

    @model_validator(mode="after")
    def _check_heartbeat(self) -> Settings:
        # one late beat (a busy event loop, a slow database) must not make an instance dead
        if self.heartbeat_timeout < 2 * self.heartbeat_interval:
            raise ValueError(
                f"REGSTREAM_HEARTBEAT_TIMEOUT ({self.heartbeat_timeout:g}) must be at least "
                f"twice REGSTREAM_HEARTBEAT_INTERVAL ({self.heartbeat_interval:g})"
            )
        return self

    @model_validator(mode="after")
    def _check_fleet_secret(self) -> Settings:
        if self.database_url is not None and self.secret_key is None:
            # issue 15: instances that each generate a key hash the same national id differently
            raise ValueError(
                "REGSTREAM_SECRET_KEY is required with DATABASE_URL: without it each instance "
                "generates its own key and hashes national ids differently, so the duplicate "
                "check and the unique index on the hash silently stop working; set the same key "
                f"of at least {MIN_SECRET_KEY_LENGTH} characters on every instance "
                "(e.g. openssl rand -hex 32)"
            )
        previous = [key.get_secret_value() for key in self.previous_secret_keys]
        if self.secret_key is not None and self.secret_key.get_secret_value() in previous:
            raise ValueError(
                "REGSTREAM_PREVIOUS_SECRET_KEYS repeats REGSTREAM_SECRET_KEY: the current key "
                "must be the new one (docs/operations.md)"
            )
        return self

    # --- derived -----------------------------------------------------------------------------
    @property
    def redis_tls_enabled(self) -> bool:
        """TLS to Redis: ``REDIS_TLS``, a ``rediss`` scheme or any ``REDIS_TLS_*`` file."""
        url = self.redis_url.get_secret_value() if self.redis_url is not None else ""
        if self.redis_tls is not None:
            return self.redis_tls
        files = (self.redis_tls_ca, self.redis_tls_cert, self.redis_tls_key)
        return url.startswith(("rediss://", "rediss+sentinel://")) or any(
            f is not None for f in files
        )

    @property
    def effective_redis_url(self) -> str | None:
        """The configured Redis URL, or ``None`` when the embedded server should be started.

        ``REDIS_SENTINELS`` + ``REDIS_SENTINEL_SERVICE`` come back as a ``redis+sentinel://``
        URL, ``REDIS_HOST`` as a ``redis://`` one: ``realtime.connections.RedisTarget`` reads
        every form from this one string (plus the TLS and sentinel-auth settings).
        """
        if self.redis_url is not None:
            url = self.redis_url.get_secret_value()
            # REDIS_PASSWORD / REDIS_USERNAME also apply to a REDIS_URL without credentials
            # (so the secret can live in its own variable, e.g. a mounted secret file).
            if self.redis_password is not None and url.startswith(
                ("redis://", "rediss://", *SENTINEL_SCHEMES)
            ):
                scheme, rest = url.split("://", 1)
                if "@" not in rest.split("/", 1)[0]:
                    user = quote(self.redis_username or "", safe="")
                    secret = quote(self.redis_password.get_secret_value(), safe="")
                    url = f"{scheme}://{user}:{secret}@{rest}"
            return url
        auth = ""
        if self.redis_password is not None:
            user = quote(self.redis_username or "", safe="")
            auth = f"{user}:{quote(self.redis_password.get_secret_value(), safe='')}@"
        if self.redis_sentinels:
            hosts = ",".join(_host_port(host, port) for host, port in self.redis_sentinels)
            service = quote(self.redis_sentinel_service or "", safe="")
            return f"redis+sentinel://{auth}{hosts}/{service}/0"
        if self.redis_host:
            return f"redis://{auth}{self.redis_host}:{self.redis_port}/0"
        if self.redis_cluster_nodes:  # (REDIS_TLS: TLS on this redis:// URL, as with REDIS_HOST)
            return f"redis://{auth}{_host_port(*self.redis_cluster_nodes[0])}/0"
        return None

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'regstream.sqlite3').resolve()}"


def load_settings(**overrides: object) -> Settings:
    """Read the environment; raise ``ConfigError`` with one readable line on bad input."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = err.get("loc") or ()
            if not loc:  # a check across settings names them itself
                problems.append(str(err["msg"]).removeprefix("Value error, "))
                continue
            name = str(loc[0])
            field = Settings.model_fields.get(name)
            if field is not None and isinstance(field.validation_alias, AliasChoices):
                name = str(field.validation_alias.choices[0])
            problems.append(f"{name}: {str(err['msg']).removeprefix('Value error, ')}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
