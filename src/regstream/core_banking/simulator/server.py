"""Running the simulator: blocking (``run_simulator``, for the CLI) or in a thread (tests, demos).

``serve_in_thread`` follows httpx's ``tests/conftest.py`` (``serve_in_thread``): a real uvicorn
server on a loopback socket bound before the thread starts (so the port is known and free),
``started`` polled with a deadline, and ``should_exit`` plus a bounded ``join`` on the way out.
uvicorn is told not to touch logging (``log_config=None``) and the access log is off: request
lines carry customer ids in their paths. uvicorn still writes access lines whenever the
``uvicorn.access`` logger has a handler (pytest's ``caplog`` adds one; an application may make
it propagate), so while a simulator runs a filter on that logger drops the lines for the T24
paths (``/api/v1.0.0/...``); other servers' access lines are untouched.

TLS (``SimulatorTls``) is uvicorn's own (its ``ssl_*`` options): a certificate and key, and
with ``client_ca`` a client certificate signed by that CA is required. uvicorn (asyncio)
closes a connection whose client sent no acceptable certificate right after the TLS 1.3
handshake, without a TLS alert; the client reads that as ``CORE_TLS_ERROR`` (``_wire``).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from regstream.core_banking.simulator.app import API_PREFIX, SimulatorConfig, create_simulator_app

__all__ = ["RunningSimulator", "SimulatorTls", "run_simulator", "serve_in_thread"]

#: uvicorn waits this long for in-flight requests on shutdown before cancelling them.
GRACEFUL_SHUTDOWN = 2.0


@dataclass(frozen=True, slots=True)
class SimulatorTls:
    """Serve HTTPS with ``cert``/``key`` (PEM); with ``client_ca``, require a client certificate
    signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def uvicorn_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}
        if self.client_ca is not None:
            options["ssl_ca_certs"] = str(self.client_ca)
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        return options


@dataclass(frozen=True, slots=True)
class RunningSimulator:
    """Where a simulator started by ``serve_in_thread`` listens."""

    host: str
    port: int
    scheme: str = "http"

    @property
    def root_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The T24 API base (what ``T24ClientConfig.base_url`` expects)."""
        return self.root_url + API_PREFIX

    @property
    def control_url(self) -> str:
        return self.root_url + "/_sim"


def run_simulator(
    host: str,
    port: int,
    config: SimulatorConfig,
    *,
    log_level: str = "info",
    access_log: bool = False,
    tls: SimulatorTls | None = None,
) -> None:
    """Serve the simulator until interrupted (Ctrl+C / SIGTERM). Blocks.

    ``access_log=True`` logs every request line, customer ids included (the data is fake).
    When the process has already configured logging (the root logger has a handler, e.g. the
    CLI called ``regstream.logs.configure``) uvicorn keeps it; otherwise uvicorn's default
    console logging is used.
    """
    host_configured = bool(logging.getLogger().handlers)
    with _hidden_t24_access_lines(enabled=not access_log):
        uvicorn.run(
            create_simulator_app(config),
            host=host,
            port=port,
            log_config=None if host_configured else uvicorn.config.LOGGING_CONFIG,
            log_level=log_level,
            access_log=access_log,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN),
            **(tls.uvicorn_options() if tls is not None else {}),
        )


@contextmanager
def serve_in_thread(
    config: SimulatorConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout: float = 10.0,
    tls: SimulatorTls | None = None,
) -> Iterator[RunningSimulator]:
    """Run the simulator on a background thread for the duration of the ``with`` block.

    ``port=0`` picks a free port; ``tls`` serves HTTPS (``base_url`` is then ``https://``)::

        with serve_in_thread(SimulatorConfig(latency_ms=0)) as sim:
            client = T24Client(T24ClientConfig(base_url=sim.base_url))
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(
        uvicorn.Config(
            create_simulator_app(config),
            log_config=None,
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN),
            **(tls.uvicorn_options() if tls is not None else {}),
        )
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="t24-simulator", daemon=True
    )
    access_filter = _DropT24AccessLines()
    logging.getLogger("uvicorn.access").addFilter(access_filter)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("T24 simulator did not start")
            time.sleep(0.01)
        scheme = "https" if tls is not None else "http"
        yield RunningSimulator(host=host, port=sock.getsockname()[1], scheme=scheme)
    finally:
        server.should_exit = True
        thread.join(timeout=GRACEFUL_SHUTDOWN + 5)
        sock.close()
        logging.getLogger("uvicorn.access").removeFilter(access_filter)


class _DropT24AccessLines(logging.Filter):
    """Drop uvicorn access lines whose path is a T24 path (``args[2]`` is the full path)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            isinstance(args, tuple) and len(args) >= 3 and str(args[2]).startswith(API_PREFIX + "/")
        )


@contextmanager
def _hidden_t24_access_lines(*, enabled: bool) -> Iterator[None]:
    access_filter = _DropT24AccessLines()
    if enabled:
        logging.getLogger("uvicorn.access").addFilter(access_filter)
    try:
        yield
    finally:
        logging.getLogger("uvicorn.access").removeFilter(access_filter)
