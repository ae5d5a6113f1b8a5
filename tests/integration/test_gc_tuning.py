"""The serving process's garbage collector (``gc_tuning.py``): tuned once, at start-up."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from regstream import gc_tuning
from tests.conftest import SettingsFactory
from tests.support import serve_app

_PROBE = """
import gc, json
from regstream import gc_tuning
before = gc.get_threshold()
off = gc_tuning.tune(0)
untouched = gc.get_threshold() == before and gc.get_freeze_count() == 0
first = gc_tuning.tune(5000)
frozen, threshold = gc.get_freeze_count(), gc.get_threshold()
second = gc_tuning.tune(20000)
print(json.dumps({"off": off, "untouched": untouched, "first": first, "second": second,
                  "frozen": frozen, "threshold": threshold, "before": before,
                  "after": gc.get_threshold()}))
"""


def test_tune_freezes_the_heap_and_sets_the_threshold_once() -> None:
    """In a fresh interpreter (this test process keeps its collector as it is)."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    seen = json.loads(out.stdout)
    assert seen["off"] is False and seen["untouched"] is True  # 0: left alone
    assert seen["first"] is True and seen["frozen"] > 1000  # the imported modules, at least
    assert seen["threshold"] == [5000, *seen["before"][1:]]  # older generations kept
    assert seen["second"] is False and seen["after"] == [5000, *seen["before"][1:]]


def test_the_service_tunes_at_the_end_of_its_start_up(
    make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lifespan hands REGSTREAM_GC_GEN0_THRESHOLD to ``tune`` once the services exist."""
    asked: list[int] = []
    monkeypatch.setattr(gc_tuning, "tune", asked.append)
    with serve_app(make_settings(gc_gen0_threshold=12_345)) as live:
        assert live.services.runner is not None
        assert asked == [12_345]
