"""Settings, read once from the environment and validated at start.

Every knob is an environment variable (see the README's configuration table). The names the issue
and the seed fix (``REDIS_URL``, ``REDIS_HOST``/``REDIS_PORT``/``REDIS_PASSWORD``, ``DATABASE_URL``,
``T24_BASE_URL``, ``SSE_PING_INTERVAL``) are used as they are; our own knobs start with
``REGSTREAM_``. Secrets are ``SecretStr`` and never printed.

Build a ``Settings`` in ``app``/``cli`` and pass it down; nothing imports a global instance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote, urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class ConfigError(Exception):
    """Bad configuration; ``str(exc)`` is one line fit for a terminal."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    # --- where things live -------------------------------------------------------------------
    data_dir: Path = Field(Path("var"), validation_alias=_env("REGSTREAM_DATA_DIR"))
    database_url: str | None = Field(None, validation_alias=_env("DATABASE_URL"))
    redis_url: SecretStr | None = Field(None, validation_alias=_env("REDIS_URL"))
    redis_host: str | None = Field(None, validation_alias=_env("REDIS_HOST"))
    redis_port: int = Field(6379, ge=1, le=65535, validation_alias=_env("REDIS_PORT"))
    redis_password: SecretStr | None = Field(None, validation_alias=_env("REDIS_PASSWORD"))
    redis_username: str | None = Field(None, validation_alias=_env("REDIS_USERNAME"))

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
    history_maxlen: PositiveInt = Field(10_000, validation_alias=_env("REGSTREAM_HISTORY_MAXLEN"))
    history_max_age: PositiveFloat = Field(
        3600.0, validation_alias=_env("REGSTREAM_HISTORY_MAX_AGE")
    )
    outbox_max: PositiveInt = Field(10_000, validation_alias=_env("REGSTREAM_OUTBOX_MAX"))
    probe_interval: PositiveFloat = Field(5.0, validation_alias=_env("REGSTREAM_PROBE_INTERVAL"))

    # --- pipeline ----------------------------------------------------------------------------
    pipeline_concurrency: PositiveInt = Field(
        64, validation_alias=_env("REGSTREAM_PIPELINE_CONCURRENCY")
    )
    lease_seconds: PositiveFloat = Field(60.0, validation_alias=_env("REGSTREAM_LEASE_SECONDS"))
    shutdown_grace: Annotated[float, Field(ge=0)] = Field(
        10.0, validation_alias=_env("REGSTREAM_SHUTDOWN_GRACE")
    )
    secret_key: SecretStr | None = Field(None, validation_alias=_env("REGSTREAM_SECRET_KEY"))

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
    stream_ticket_ttl: Annotated[float, Field(gt=0, le=600)] = Field(
        60.0, validation_alias=_env("REGSTREAM_STREAM_TICKET_TTL")
    )
    metrics_public: bool = Field(False, validation_alias=_env("REGSTREAM_METRICS_PUBLIC"))

    # --- logging -----------------------------------------------------------------------------
    log_level: str = Field("INFO", validation_alias=_env("REGSTREAM_LOG_LEVEL"))
    log_json: bool = Field(False, validation_alias=_env("REGSTREAM_LOG_JSON"))

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
        if not value.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

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

    # --- derived -----------------------------------------------------------------------------
    @property
    def effective_redis_url(self) -> str | None:
        """The configured Redis URL, or ``None`` when the embedded server should be started."""
        if self.redis_url is not None:
            url = self.redis_url.get_secret_value()
            # REDIS_PASSWORD / REDIS_USERNAME also apply to a REDIS_URL without credentials
            # (so the secret can live in its own variable, e.g. a mounted secret file).
            if self.redis_password is not None and url.startswith(("redis://", "rediss://")):
                scheme, rest = url.split("://", 1)
                if "@" not in rest.split("/", 1)[0]:
                    user = quote(self.redis_username or "", safe="")
                    secret = quote(self.redis_password.get_secret_value(), safe="")
                    url = f"{scheme}://{user}:{secret}@{rest}"
            return url
        if self.redis_host:
            auth = ""
            if self.redis_password is not None:
                user = quote(self.redis_username or "", safe="")
                auth = f"{user}:{quote(self.redis_password.get_secret_value(), safe='')}@"
            return f"redis://{auth}{self.redis_host}:{self.redis_port}/0"
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
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
