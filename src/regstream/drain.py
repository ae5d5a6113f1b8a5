"""Graceful shutdown in phases, so a rolling restart sends no herd to the rest of the fleet.

On SIGTERM (or SIGINT)::

    t=0      1 draining  /readyz answers 503 {"server": "draining"} at once; everything else is
                         served as before (the listening socket stays open, streams flow, new
                         streams and runs are accepted), so the load balancer stops sending new
                         clients here before this instance stops listening
    +delay   2 closing   new streams and runs refused (503); uvicorn's own handler runs (it stops
                         listening); streams closed in random order, in batches spread over
                         ``spread`` s, each with its own ``retry:`` hint drawn uniformly from
                         [SSE_RETRY_MS / 2, 3 x SSE_RETRY_MS / 2]: the clients reach the rest
                         of the fleet spread over about spread + SSE_RETRY_MS
    +spread  3 finishing running validations get ``grace`` s (``Runner.drain``; what is left
                         is resumed elsewhere), and so do the closed streams' connections to
                         end (their last bytes read by the client; past it they are aborted),
                         then the publisher's outbox gets ``FLUSH`` s

so an instance is gone at most ``delay + spread + grace + FLUSH`` seconds after the signal (plus
the process's own exit): the orchestrator's kill deadline (Kubernetes'
``terminationGracePeriodSeconds``) must be longer, see docs/operations.md.

Why our handler holds uvicorn's back: uvicorn closes its listening socket as soon as its
SIGTERM handler runs, so calling it at once (what this module replaced) ended the instance's
service before the load balancer could notice the readiness change. A second SIGINT during the
delay skips the rest of it (Ctrl-C twice); once the delay is over every signal goes to uvicorn,
as before (a second Ctrl-C forces its exit). A repeated SIGTERM changes nothing: with
``serve --workers N`` a worker gets one from the process group and one from uvicorn's supervisor.

Stopped without a signal (the server stopped otherwise: it is no longer listening), there is no
delay: phases 2 and 3 only.

Streams taken over from uvicorn (``api/takeover.py``) are no longer uvicorn's connections: its
graceful shutdown neither closes nor waits for them. The hub holds every stream until its
connection is lost, so phase 3 waits for the hub to empty: the process never exits (closing the
event loop and every socket with it) while a closed stream's final frames are still unsent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from regstream import metrics
from regstream.api.deps import Services
from regstream.realtime import messages

log = logging.getLogger(__name__)

FLUSH = 2.0  # seconds the publisher's outbox gets to reach Redis at the very end
SIGNALS = (signal.SIGTERM, signal.SIGINT)

Handler = Callable[[int, FrameType | None], Any] | int | None


class Drain:
    """The shutdown of one process: ``install_signals`` at start-up, ``finish`` at the end of
    the lifespan (after the server stopped serving)."""

    def __init__(self, services: Services) -> None:
        settings = services.settings
        self._services = services
        self._delay = settings.drain_delay
        self._spread = settings.drain_spread
        self._grace = settings.shutdown_grace
        self._retry_ms = settings.sse_retry_ms
        self._hurry = asyncio.Event()  # ends the delay early
        self._closing: asyncio.Task[None] | None = None
        self._handed_over = False  # the delay is over: signals go to the server's handler
        self._previous: dict[int, Handler] = {}
        metrics.SHUTDOWN_PHASE.set(0)  # (one process may run several apps: tests)

    def install_signals(self) -> Callable[[], None]:
        """Take SIGTERM/SIGINT (from the main thread only; elsewhere nothing to do). Returns the
        function that gives them back to their previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        loop = asyncio.get_running_loop()
        self._previous = {sig: signal.getsignal(sig) for sig in SIGNALS}

        def handler(sig: int, frame: FrameType | None) -> None:
            loop.call_soon_threadsafe(self._on_signal, sig, frame)

        for sig in SIGNALS:
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, previous in self._previous.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, previous)

        return restore

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self._closing is None:
            self.begin(then=lambda: self._pass_on(sig, frame))
        elif self._handed_over:
            self._pass_on(sig, frame)
        elif sig == signal.SIGINT and not self._hurry.is_set():
            log.info("second interrupt: skipping the rest of the drain delay")
            self._hurry.set()

    def _pass_on(self, sig: int, frame: FrameType | None) -> None:
        self._handed_over = True
        previous = self._previous.get(sig)
        if callable(previous):
            previous(sig, frame)

    def begin(self, then: Callable[[], None] | None = None) -> asyncio.Task[None]:
        """Phase 1 now; phase 2 after the delay, with ``then`` (the server's own signal handler,
        so it stops listening) called first. Returns the task that ends with phase 2."""
        if self._closing is not None:
            return self._closing
        self._services.leaving = True
        metrics.SHUTDOWN_PHASE.set(1)
        if not self._hurry.is_set():
            log.info(
                "draining: readiness off; serving on for %.1f s so the load balancer moves "
                "new clients elsewhere", self._delay,
            )  # fmt: skip
        self._closing = asyncio.create_task(self._close(then), name="drain")
        return self._closing

    async def _close(self, then: Callable[[], None] | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), self._delay)
        services = self._services
        services.draining = True
        services.runner.accepting = False
        metrics.SHUTDOWN_PHASE.set(2)
        if then is not None:
            then()
        loop = asyncio.get_running_loop()
        started = loop.time()
        closed = await services.hub.close_in_batches(over=self._spread, final=self._retry_hint)
        metrics.SHUTDOWN_STREAMS_CLOSED.inc(closed)
        log.info(
            "closed %d streams over %.1f s, each with a retry hint of %d-%d ms",
            closed, loop.time() - started, self._retry_ms // 2, self._retry_ms * 3 // 2,
        )  # fmt: skip

    def _retry_hint(self) -> bytes:
        return messages.retry_frame(random.randint(self._retry_ms // 2, self._retry_ms * 3 // 2))

    async def finish(self) -> None:
        """Whatever phases are left (no delay: the server has stopped listening), then the
        validations' grace and the publisher's flush."""
        self._hurry.set()
        try:
            await self.begin()
        except Exception:  # the validations' grace and the flush must still come
            log.exception("closing the streams failed")
        services = self._services
        metrics.SHUTDOWN_PHASE.set(3)
        left, _ = await asyncio.gather(
            services.runner.drain(self._grace), self._streams_ended(self._grace)
        )
        if left:
            log.warning(
                "%d validations still running after the %.1f s grace; their runs are resumed "
                "elsewhere", left, self._grace,
            )  # fmt: skip
        else:
            log.info("no validation left running")  # each run ended with its final status
        await services.publisher.wait_flushed(FLUSH)

    async def _streams_ended(self, timeout: float) -> int:
        """Wait until every closed stream's connection has ended (``timeout`` at most), then
        abort the rest; returns how many were aborted."""
        hub = self._services.hub
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(hub) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = list(hub.streams())
        for stream in left:
            stream.abort()
        if left:
            log.warning("%d streams had not read their last frames after %.1f s; aborted",
                        len(left), timeout)  # fmt: skip
        return len(left)
