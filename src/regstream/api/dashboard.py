"""The admin dashboard's figures: run counts, connected streams and browser-reported latency.

``POST /api/metrics/latency`` takes what browsers measured between an update's publish timestamp
and its arrival (``now - update.timestamp``, in ms). Each sample goes into the Prometheus
histogram ``regstream_browser_latency_seconds`` and into a small in-process ring that the
dashboard chart reads back through ``GET /api/metrics/latency``. The ring is per process on
purpose: it is a live view, not a store (Prometheus aggregates across workers).

Browser clocks drift, so a sample is clamped at 0 and anything above ten minutes is refused as
nonsense rather than skewing the chart.

Who may call: the figures are for admins (the dashboard's audience); any signed-in viewer may
report latency samples (every operator's browser measures its own deliveries).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Request, Response, status
from pydantic import Field

from regstream import metrics
from regstream.api.auth import AdminPrincipal, ViewerPrincipal
from regstream.api.deps import AuthDep, HubDep, SessionDep
from regstream.api.errors import too_many_requests
from regstream.api.schemas import CamelModel
from regstream.db import registrations

router = APIRouter(prefix="/api", tags=["dashboard"])

MAX_SAMPLE_MS = 600_000.0
RING_SIZE = 500
WINDOW_SECONDS = 3600


class LatencyReport(CamelModel):
    samples: Annotated[
        list[Annotated[float, Field(ge=-60_000, le=MAX_SAMPLE_MS)]],
        Field(min_length=1, max_length=200),
    ]


class LatencyPoint(CamelModel):
    at: int = Field(description="when the server received the sample, epoch ms")
    ms: float


class LatencySummary(CamelModel):
    count: int
    p50: float | None
    p95: float | None
    max: float | None
    recent: list[LatencyPoint]


class Stats(CamelModel):
    since: str
    window_seconds: int
    in_progress: int
    by_status: dict[str, int]
    streams: int
    latency: LatencySummary


class LatencyRing:
    """The last ``size`` samples with their arrival time; safe to share between threads."""

    def __init__(self, size: int = RING_SIZE) -> None:
        self._samples: deque[tuple[int, float]] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, values: list[float]) -> None:
        now = time.time_ns() // 1_000_000
        with self._lock:
            self._samples.extend((now, v) for v in values)

    def summary(self, *, points: int = 120) -> LatencySummary:
        with self._lock:
            samples = list(self._samples)
        values = sorted(v for _, v in samples)
        return LatencySummary(
            count=len(values),
            p50=_quantile(values, 0.5),
            p95=_quantile(values, 0.95),
            max=values[-1] if values else None,
            recent=[LatencyPoint(at=at, ms=round(ms, 1)) for at, ms in samples[-points:]],
        )


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))
    return round(values[index], 1)


def latency_ring(request: Request) -> LatencyRing:
    """The app's ring, created on first use (kept on ``app.state``, not a module global)."""
    state = request.app.state
    ring: LatencyRing | None = getattr(state, "latency_ring", None)
    if ring is None:
        ring = LatencyRing()
        state.latency_ring = ring
    return ring


@router.get("/stats", response_model=Stats)
async def read_stats(
    _: AdminPrincipal, request: Request, session: SessionDep, hub: HubDep
) -> Stats:
    since = datetime.now(UTC) - timedelta(seconds=WINDOW_SECONDS)
    counts = await registrations.count_by_status(session, since=since)
    in_progress = counts.pop("IN_PROGRESS", 0)
    by_status = {
        name: counts.get(name, 0) for name in ("APPROVED", "COMPLETED", "DUPLICATE", "FAILED")
    }
    return Stats(
        since=since.isoformat(),
        window_seconds=WINDOW_SECONDS,
        in_progress=in_progress,
        by_status=by_status,
        streams=len(hub),
        latency=latency_ring(request).summary(points=60),
    )


@router.post(
    "/metrics/latency",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={429: {"description": "more reports than a user's pages send"}},
)
async def report_latency(
    principal: ViewerPrincipal, auth: AuthDep, body: LatencyReport, request: Request
) -> Response:
    """A browser's measured delivery latencies. Per user at most ``LATENCY_REPORTS_PER_MINUTE``
    reports of at most 200 samples, each at most ``MAX_SAMPLE_MS``: one viewer cannot skew the
    dashboard or the Prometheus histogram with made-up samples."""
    wait = await auth.latency_report_limit.hit(f"operator:{principal.operator_id}")
    if wait:
        raise too_many_requests("too many latency reports; retry later", wait)
    values = [max(0.0, float(v)) for v in body.samples if math.isfinite(v)]
    for value in values:
        metrics.BROWSER_LATENCY.observe(value / 1000)
    latency_ring(request).add(values)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/metrics/latency", response_model=LatencySummary)
async def read_latency(_: AdminPrincipal, request: Request) -> LatencySummary:
    return latency_ring(request).summary()
