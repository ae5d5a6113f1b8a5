"""The stream's hot path: SSE connections taken over from uvicorn's httptools protocol.

The only module that touches uvicorn's and httptools' internals. Why it exists: the 1k
broadcast (``bench/sse_bench.py``, bench/RESULTS.md runs 13-15) costs 0.78-0.89x nchan's CPU
per delivery when the hub writes each pre-encoded HTTP chunk straight to the connection's
transport (``realtime/hub.py``: ``TransportStream``, direct streams). The portable queued path
(the same hub, each frame through the ASGI ``send``) cost 1.4x that (3x the user CPU) and fell
behind 20,000 deliveries/s on the shared 2-core VM; the sse-starlette baseline (a queue and a
task per stream) 4.3-5x (bench/RESULTS.md, "Stream write paths"). Handing the connection over
to a ``StreamProtocol`` also drops uvicorn's per-connection state (parser, request cycle, the
ASGI task): half the memory of an idle stream (10.5 vs 19.8 KiB in the same bench).

What it relies on, none of it uvicorn's public API:

* the ASGI ``send`` that uvicorn's httptools protocol passes is the bound method
  ``RequestResponseCycle.send``: its ``__self__`` carries ``transport`` and
  ``chunked_encoding``;
* ``HttpToolsProtocol.connection_lost(exc)`` with an exception drops the connection from
  uvicorn's books (``server_state.connections``), ends the request cycle as disconnected and
  leaves the transport open, so our request task returns and the transport is ours.

Tested with exactly the versions in ``TESTED`` (pyproject.toml bounds uvicorn and httptools to
them). ``decide`` runs once per app, at start: with other versions installed, httptools absent,
or ``REGSTREAM_STREAM_FAST_PATH=false``, every stream takes the portable path (``QueuedStream``:
a bounded buffer drained by the ASGI ``send``), which any ASGI server serves, at the CPU cost
above. The decision is logged and exported (``regstream_sse_stream_write_path``). Under another
HTTP protocol (uvicorn's h11, another server) a stream falls back per request, logged once.

To raise the bounds: install the new versions, run the stream tests on both paths
(tests/integration/test_stream.py, test_delivery.py, test_slow_clients.py,
test_stream_write_path.py, test_crash_and_shutdown.py, test_rolling_restart.py), then add
the versions to ``TESTED`` and to pyproject.toml.

Accounting: uvicorn forgets a taken-over connection, so its ``--limit-concurrency`` and its
graceful shutdown do not see it. The service counts streams itself: the hub holds every stream
until its connection is lost (``StreamProtocol.connection_lost``), ``SSE_MAX_STREAMS`` and the
per-account slots count the hub's streams, and ``drain.py`` closes every stream and waits for
their connections to end (tests/integration/test_stream_write_path.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from regstream import metrics
from regstream.realtime.hub import Hub, StreamProtocol, TransportStream

log = logging.getLogger(__name__)

#: The versions the take-over was tested with (the stream tests on both paths, the 1k broadcast).
TESTED: Mapping[str, frozenset[str]] = {
    "uvicorn": frozenset({"0.55.0"}),
    "httptools": frozenset({"0.9.0"}),
}

WritePath = Literal["transport", "queued"]
PATHS: tuple[WritePath, ...] = ("transport", "queued")

#: Kernel send buffer of a stream socket. Left to autotuning, Linux lets it grow to megabytes
#: (4 MiB measured on loopback), so a client that stops reading is invisible to us for minutes:
#: our own bounded buffer only starts to fill once the kernel's is full. SSE frames are small;
#: 64 KiB holds hundreds of them.
STREAM_SNDBUF = 64 * 1024


def installed_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TESTED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass
class Takeover:
    """Which path writes this app's streams, decided once (``decide``); ``transport_of`` and
    ``hand_over`` do the take-over of one connection on the fast path."""

    path: WritePath
    reason: str
    #: the class whose bound ``send`` uvicorn's httptools protocol passes (fast path only)
    _cycle: type[Any] | None = None
    _protocol: type[Any] | None = None
    _fell_back: bool = field(default=False, init=False)

    @classmethod
    def decide(
        cls, *, enabled: bool, versions: Callable[[], Mapping[str, str | None]] = installed_versions
    ) -> Takeover:
        """The path for every stream of this app: ``transport`` only when enabled and the
        installed uvicorn and httptools are versions the take-over was tested with."""
        found = versions()
        named = ", ".join(f"{name} {found.get(name) or 'absent'}" for name in TESTED)
        if not enabled:
            return cls("queued", f"REGSTREAM_STREAM_FAST_PATH=false ({named})")
        untested = [name for name, tested in TESTED.items() if found.get(name) not in tested]
        if untested:
            tested = ", ".join(f"{n} {'/'.join(sorted(TESTED[n]))}" for n in untested)
            return cls("queued", f"installed {named}; the take-over was tested with {tested}")
        try:
            from uvicorn.protocols.http import httptools_impl
        except ImportError as exc:
            return cls("queued", f"uvicorn's httptools protocol does not import ({exc})")
        return cls("transport", f"taken over from uvicorn's httptools protocol ({named})",
                   httptools_impl.RequestResponseCycle, httptools_impl.HttpToolsProtocol)  # fmt: skip

    def announce(self) -> None:
        """The start-up log line and the metric naming the path."""
        log.info("streams are written on the %s path: %s", self.path, self.reason)
        _export(self.path)

    def transport_of(self, send: Callable[..., Any]) -> asyncio.WriteTransport | None:
        """The connection's transport when this stream can take the fast path, else None: the
        stream is queued.

        Called before the response head or after it (``api/stream.py`` makes the stream before
        sending the head). uvicorn's cycle settles its framing when the head goes out: with the
        tested version, a head without ``Content-Length`` (ours) to anything but a HEAD request
        is chunked, so ``chunked_encoding`` is still None before the head and True after it.
        """
        if self._cycle is None:
            return None
        cycle = getattr(send, "__self__", None)
        if not isinstance(cycle, self._cycle):
            self._falling_back(f"{type(cycle).__module__ if cycle is not None else send!r}, not "
                               "uvicorn's httptools protocol")  # fmt: skip
            return None
        if cycle.chunked_encoding is False or cycle.scope["method"] == "HEAD":
            self._falling_back("a response that is not chunked")
            return None
        transport: asyncio.WriteTransport = cycle.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
        return transport

    def hand_over(self, stream: TransportStream, hub: Hub) -> bool:
        """Give the connection to a ``StreamProtocol`` and let uvicorn forget it (module
        docstring); False (the request keeps it) when it is closing already."""
        transport = stream.transport
        server_protocol = transport.get_protocol()
        if (
            self._protocol is None
            or transport.is_closing()
            or not isinstance(server_protocol, self._protocol)
        ):
            return False
        transport.set_protocol(StreamProtocol(stream, hub))
        server_protocol.connection_lost(_HandedOver())
        return True

    def _falling_back(self, why: str) -> None:
        if not self._fell_back:
            self._fell_back = True
            log.warning("a stream is served by %s: streams fall back to the queued path", why)
            _export("queued")


class _HandedOver(Exception):
    """Tells uvicorn's protocol its connection now belongs to the stream."""


def _export(path: WritePath) -> None:
    for one in PATHS:
        metrics.STREAM_WRITE_PATH.labels(one).set(1 if one == path else 0)
