"""The embedded defaults: a private Redis server, the T24 simulator and the national-id key,
when none is configured.

``serve`` starts them once in the parent process (so ``--workers N`` share them) and passes their
addresses to the app through the settings; ``create_app`` starts them itself when used alone.
The key is generated once into the data dir, only for the embedded SQLite database: with
``DATABASE_URL`` the settings require ``REGSTREAM_SECRET_KEY`` (one key for the whole fleet).
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType

import httpx

from regstream.config import Settings
from regstream.domain.pii import NationalIdKeys
from regstream.realtime.embedded import EmbeddedRedis, die_with_parent, free_port

log = logging.getLogger(__name__)


def national_id_keys(settings: Settings) -> NationalIdKeys:
    """The HMAC keys for national ids: ``REGSTREAM_SECRET_KEY`` (else the key generated once into
    the data dir, mode 0600), then ``REGSTREAM_PREVIOUS_SECRET_KEYS``."""
    if settings.secret_key is not None:
        current = settings.secret_key.get_secret_value()
    else:
        current = _generated_key(Path(settings.data_dir) / "secret.key")
    previous = (key.get_secret_value().encode() for key in settings.previous_secret_keys)
    return NationalIdKeys(current.encode(), tuple(previous))


def _generated_key(path: Path) -> str:
    if not path.exists():
        # written whole under a private name, then linked into place: a process of the same
        # data dir starting at the same moment reads either no file or the whole key
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        try:
            os.link(draft, path)
        except FileExistsError:  # the other process's key won
            pass
        finally:
            draft.unlink()
    return path.read_text().strip()


class DataDirInUse(Exception):
    """Another process runs the embedded services of this data dir; ``str(exc)`` is one line."""


class DataDirLock:
    """An exclusive ``flock`` on ``<data dir>/.lock`` (holding the owner's pid), taken by the
    process that starts the embedded Redis there: a second ``scripts/serve`` on the same
    ``./var`` would start a second server on the same socket (and remove the first one's at its
    exit) and share the SQLite file with a Redis of its own. Released when the process ends,
    however it ends."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DataDirInUse(
                f"data dir {self.path.parent} is in use by process {holder} (another regstream "
                "serve); stop it, or give this one its own REGSTREAM_DATA_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


class EmbeddedStack(AbstractContextManager["EmbeddedStack"]):
    """Start what the settings leave unconfigured; ``settings`` is the resolved copy."""

    def __init__(self, settings: Settings) -> None:
        self._given = settings
        self.settings = settings
        self.redis: EmbeddedRedis | None = None
        self.simulator: subprocess.Popen[bytes] | None = None
        self._lock: DataDirLock | None = None

    def __enter__(self) -> EmbeddedStack:
        data_dir = self._given.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        updates: dict[str, object] = {}
        if self._given.effective_redis_url is None:
            self._lock = DataDirLock(data_dir)
            self._lock.acquire()  # raises DataDirInUse before anything else starts
            redis = EmbeddedRedis(directory=(data_dir / "redis").resolve())
            try:
                redis.start()
            except BaseException:
                self.__exit__(None, None, None)
                raise
            self.redis = redis
            log.info("started embedded Redis on %s", self.redis.socket_path)
            updates["redis_url"] = self.redis.url
        if self._given.t24_base_url is None:
            try:
                updates["t24_base_url"] = self._start_simulator(data_dir)
            except BaseException:
                self.__exit__(None, None, None)
                raise
        if updates:
            from pydantic import SecretStr

            if "redis_url" in updates:
                updates["redis_url"] = SecretStr(str(updates["redis_url"]))
            self.settings = self._given.model_copy(update=updates)
        return self

    def _start_simulator(self, data_dir: Path) -> str:
        port = free_port()
        log_file = open(data_dir / "t24-sim.log", "ab")  # noqa: SIM115 - closed with the process
        self.simulator = subprocess.Popen(
            [sys.executable, "-m", "regstream", "t24-sim", "--host", "127.0.0.1", "--port", str(port),
             "--latency-ms", str(self._given.t24_sim_latency_ms)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True,
            preexec_fn=die_with_parent,
            env={**os.environ, "REGSTREAM_LOG_LEVEL": "WARNING"},
        )  # fmt: skip
        log_file.close()
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.simulator.poll() is not None:
                raise RuntimeError(
                    f"T24 simulator exited at start (see {data_dir / 't24-sim.log'})"
                )
            try:
                if httpx.get(base + "/_sim/healthz", timeout=0.5).status_code == 200:
                    log.info("started T24 simulator on %s", base)
                    return base + "/api/v1.0.0"
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("T24 simulator did not start within 20 s")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.simulator is not None:
            self.simulator.terminate()
            try:
                self.simulator.wait(5)
            except subprocess.TimeoutExpired:
                self.simulator.kill()
            self.simulator = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
