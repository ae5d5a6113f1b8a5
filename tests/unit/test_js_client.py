"""The JavaScript client package (clients/js), checked from pytest so scripts/test and CI run it:
Node's test runner over the client logic, tsc over the package and its examples (the seed's
usage snippet among them), the published declarations current, the wire types against the
service's schema, and the size budget (core <= 10 KB min+gz, the React hook <= 2 KB more)."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

from regstream.web.pages import STATIC_DIR
from tests.js_client import CLIENT_DIR, run_node

TSC = "node_modules/typescript/bin/tsc"


def check(*args: str) -> str:
    result = run_node(*args)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_client_logic_unit_tests() -> None:
    """Stream planning, de-duplication, gaps, back-off, ticket refresh (test/*.test.js)."""
    output = check("--test", "test/")
    assert "# fail 0" in output, output


def test_examples_type_check() -> None:
    check(TSC, "-p", "examples/tsconfig.json")  # the seed's snippet and the React example


def test_package_type_checks_and_its_declarations_are_current(tmp_path: Path) -> None:
    check(TSC, "-p", "tsconfig.json", "--outDir", str(tmp_path))  # fails on a type error too
    compared = filecmp.dircmp(tmp_path, CLIENT_DIR / "types")
    stale = compared.diff_files + compared.left_only + compared.right_only
    assert stale == [], f"types/ is stale: run (cd clients/js && npm run types): {stale}"


def test_wire_types_agree_with_the_published_schema() -> None:
    check("scripts/check-schema.mjs")


def test_size_budget() -> None:
    result = run_node("scripts/size.mjs", "--json")
    sizes = json.loads(result.stdout)
    print(f"core {sizes['core']['gz']} B min+gz, hook +{sizes['hook']['gz']} B")
    assert sizes["core"]["gz"] <= 10 * 1024, sizes
    assert sizes["hook"]["gz"] <= 2 * 1024, sizes
    assert result.returncode == 0, result.stderr


def test_the_pages_serve_the_package_itself() -> None:
    """``/static/client`` is the package's source (a link), not a second copy of the client."""
    assert (STATIC_DIR / "client").resolve() == (CLIENT_DIR / "src").resolve()
    assert not (STATIC_DIR / "js" / "registration-updates.js").exists()
