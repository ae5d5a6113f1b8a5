"""The streams' write path decided once at start (``api/takeover.py``), and the version bounds."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from regstream.api.takeover import TESTED, Takeover

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
TESTED_NOW = {name: max(versions) for name, versions in TESTED.items()}


def test_tested_versions_take_the_transport_path() -> None:
    takeover = Takeover.decide(enabled=True, versions=lambda: TESTED_NOW)
    assert takeover.path == "transport"
    assert "uvicorn 0.55.0" in takeover.reason


@pytest.mark.parametrize(
    ("uvicorn", "httptools"),
    [("0.56.0", "0.9.0"), ("0.55.0", "0.9.1"), ("0.55.0", None), ("1.0.0", "1.0.0")],
)
def test_untested_or_missing_versions_take_the_queued_path(
    uvicorn: str, httptools: str | None
) -> None:
    takeover = Takeover.decide(
        enabled=True, versions=lambda: {"uvicorn": uvicorn, "httptools": httptools}
    )
    assert takeover.path == "queued"
    assert "tested with" in takeover.reason
    assert takeover.transport_of(lambda message: None) is None  # never looks at the server


def test_the_setting_forces_the_queued_path() -> None:
    takeover = Takeover.decide(enabled=False, versions=lambda: TESTED_NOW)
    assert takeover.path == "queued"
    assert takeover.reason.startswith("REGSTREAM_STREAM_FAST_PATH=false")


def test_another_servers_send_falls_back() -> None:
    takeover = Takeover.decide(enabled=True, versions=lambda: TESTED_NOW)

    async def send(message: object) -> None:
        pass

    assert takeover.transport_of(send) is None


def test_pyproject_bounds_uvicorn_and_httptools_at_the_tested_versions() -> None:
    """An install can never bring a version the take-over was not tested with."""
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    for name, versions in TESTED.items():
        (spec,) = [d for d in dependencies if re.match(rf"{name}(\[|>|<|=)", d)]
        assert f"<={max(versions)}" in spec, spec
