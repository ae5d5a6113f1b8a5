"""The quick start for real: ``regstream serve --demo`` on embedded defaults, then the CLI clients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support import TEST_SECRET_KEY, free_port

ENV_DROP = ("REDIS_URL", "REDIS_HOST", "DATABASE_URL", "T24_BASE_URL", "REGSTREAM_SECRET_KEY")


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    env["REGSTREAM_DATA_DIR"] = str(data_dir)
    env["T24_SIM_LATENCY_MS"] = "0"
    return env


def test_serve_demo_then_process_and_watch(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = _env(tmp_path / "var")
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "regstream", "serve", "--demo", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        else:
            raise AssertionError(
                "serve did not become ready:\n" + (tmp_path / "serve.log").read_text()
            )
        output = (tmp_path / "serve.log").read_text()
        assert f"listening on {url}" in output.replace("\n", " ")
        assert "demo registration 1: approved" in output
        env["REGSTREAM_TOKEN"] = output.split("REGSTREAM_TOKEN=", 1)[1].split()[0]  # demo admin
        # not the CLI's default port: serve prints the URL to export too (issue 16)
        env["REGSTREAM_URL"] = output.split("REGSTREAM_URL=", 1)[1].split()[0]
        assert env["REGSTREAM_URL"] == url
        assert (tmp_path / "var" / "redis" / "redis.sock").exists()  # the embedded server

        watcher = subprocess.Popen(
            [sys.executable, "-m", "regstream", "watch", "--url", url],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        time.sleep(1.5)
        done = subprocess.run(
            [sys.executable, "-m", "regstream", "process", "1"],  # REGSTREAM_URL
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "APPROVED" in done.stdout
        assert "t24_lookup" in done.stdout
        time.sleep(0.5)
        watcher.send_signal(signal.SIGINT)
        watched, _ = watcher.communicate(timeout=10)
        text = watched.decode()
        assert "duplicate_check" in text and "APPROVED" in text
        assert "Customer validated successfully. Found 2 accounts." in text
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        finally:
            log.close()
    assert server.returncode == 0, (tmp_path / "serve.log").read_text()
    assert not (tmp_path / "var" / "redis" / "redis.sock").exists()  # stopped on exit


def test_bad_configuration_fails_with_one_line(tmp_path: Path) -> None:
    env = _env(tmp_path / "var")
    env["SSE_PING_INTERVAL"] = "soon"
    done = subprocess.run(
        [sys.executable, "-m", "regstream", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "SSE_PING_INTERVAL" in lines[0]
    assert "Traceback" not in done.stderr


def test_clients_against_a_url_where_nothing_listens_say_so_in_one_line(tmp_path: Path) -> None:
    """`watch` printed an 88-line traceback there (issue 16); both clients print one line that
    names the URL and how to point them elsewhere, and exit 1."""
    url = f"http://127.0.0.1:{free_port()}"
    for command in (["watch"], ["process", "1"]):
        done = subprocess.run(
            [sys.executable, "-m", "regstream", *command, "--url", url],
            env=_env(tmp_path / "var"), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 1, done
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert "Traceback" not in done.stderr, done.stderr
        assert any(url in line and "REGSTREAM_URL" in line for line in lines), done.stderr
        assert len(lines) <= 2, done.stderr


def test_a_second_serve_on_the_same_data_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    """Two `scripts/serve` on one ./var: the second would start a second embedded Redis on the
    first one's socket (and delete it at exit) and share the SQLite file (issue 16). It is
    refused with one line naming the process that holds the data dir; the first keeps working."""
    env = _env(tmp_path / "var")
    port = free_port()
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115
    first = subprocess.Popen(
        [sys.executable, "-m", "regstream", "serve", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 40
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert first.poll() is None and time.monotonic() < deadline, (
                tmp_path / "first.log"
            ).read_text()
            time.sleep(0.2)
        second = subprocess.run(
            [sys.executable, "-m", "regstream", "serve", "--port", str(free_port())],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1, second
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and f"process {first.pid}" in lines[0], second.stderr
        assert "REGSTREAM_DATA_DIR" in lines[0]
        # the first one's embedded Redis is untouched
        assert (tmp_path / "var" / "redis" / "redis.sock").exists()
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            first.wait(30)
        finally:
            log.close()


def test_database_commands_fail_with_one_line(tmp_path: Path) -> None:
    """Every command that opens the database (``cli/database.py``) ends a failure with one line
    on stderr and exit status 1, naming no secret: on a server that is not there, and on a
    schema it may not migrate (``migrate`` and ``serve``: tests/integration/test_migrate.py)."""
    env = _env(tmp_path / "var")
    env.update(
        DATABASE_URL=f"postgresql+asyncpg://regstream:pw-canary@127.0.0.1:{free_port()}/none",
        REGSTREAM_SECRET_KEY=TEST_SECRET_KEY,
    )  # fmt: skip
    for command, what in ((["rotate-secret"], "rotate-secret"), (["users", "list"], "users list")):
        done = subprocess.run(
            [sys.executable, "-m", "regstream", *command],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 1, done
        assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"error: {what} failed: "), done.stderr
        assert "pw-canary" not in done.stderr

    env = _env(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    env["REGSTREAM_MIGRATE_ON_START"] = "false"
    listed = subprocess.run(
        [sys.executable, "-m", "regstream", "users", "list"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 1, listed
    assert listed.stdout == "" and listed.stderr.count("\n") == 1, listed.stderr
    assert listed.stderr.startswith("error: database schema is empty, this release needs ")
    assert listed.stderr.endswith("(REGSTREAM_MIGRATE_ON_START=false)\n")
