"""Running the JavaScript client package's tools (clients/js) from the Python tests.

scripts/install test runs ``npm ci`` there; without Node or the installed dev dependencies a test
that needs them skips locally and fails in CI (``unavailable``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import unavailable

CLIENT_DIR = Path(__file__).resolve().parents[1] / "clients" / "js"


def require_node_modules() -> str:
    """The node binary, once ``npm ci`` has installed the package's dev dependencies."""
    node = shutil.which("node")
    if node is None:
        unavailable("node (Node.js 20+)")
        raise AssertionError("unreachable")
    if not (CLIENT_DIR / "node_modules" / "typescript").is_dir():
        unavailable("clients/js/node_modules (scripts/install test runs npm ci)")
    return node


def run_node(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``node args...`` in clients/js; the output is kept for the assertion message."""
    node = require_node_modules()
    return subprocess.run(
        [node, *args], cwd=CLIENT_DIR, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
