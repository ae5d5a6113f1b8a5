"""Settings: environment names, derived URLs, one-line errors, secrets never printed."""

from __future__ import annotations

import pytest

from regstream.config import ConfigError, load_settings


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
    monkeypatch.setenv("REGSTREAM_SECRET_KEY", "k" * 32)  # required with DATABASE_URL
    assert load_settings().effective_database_url == "postgresql+asyncpg://u@db/regstream"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        pytest.param("REDIS_PORT", "abc", "REDIS_PORT", id="port"),
        pytest.param("SSE_PING_INTERVAL", "-5", "SSE_PING_INTERVAL", id="ping"),
        pytest.param("DATABASE_URL", "mysql://x", "DATABASE_URL", id="database"),
        pytest.param("REDIS_URL", "http://secret-host", "REDIS_URL", id="redis-url"),
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
