"""Liveness, readiness and Prometheus metrics.

``/healthz`` and ``/readyz`` are open (load balancers, orchestrators); ``/metrics`` needs the
admin role, unless ``REGSTREAM_METRICS_PUBLIC=true`` (a scraper on a private network).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from regstream.api.auth import current_principal, require_role
from regstream.api.deps import (
    AuthDep,
    BusDep,
    EngineDep,
    RedisDep,
    SessionsDep,
    SettingsDep,
    ShutdownPhaseDep,
)
from regstream.api.errors import DATABASE_OUTAGE
from regstream.db.engine import ping

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive and its event loop answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is down"}})
async def readyz(
    phase: ShutdownPhaseDep, engine: EngineDep, redis: RedisDep, bus: BusDep
) -> JSONResponse:
    """Database and Redis reachable, subscription healthy, not shutting down.

    From SIGTERM on the answer is 503 at once, before any check, while the instance still
    serves everything else for ``REGSTREAM_DRAIN_DELAY`` seconds: the load balancer stops
    sending new clients before the instance stops listening (drain.py).
    """
    if phase != "serving":
        body = {"ready": False, "checks": {"server": "draining"}}
        return JSONResponse(body, status_code=503)
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(ping(engine), 2)
        checks["database"] = "ok"
        DATABASE_OUTAGE.recovered()
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["database"] = f"down ({type(exc).__name__})"
    try:
        # the control client (app.py): its own small pool, so a herd of resumes reading the
        # history, or a publish backlog, cannot make this wait for a connection
        await asyncio.wait_for(redis.ping(), 2)
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["redis"] = f"down ({type(exc).__name__})"
    # every subscription this instance holds (a cluster: the partitions its streams follow)
    checks["subscription"] = "ok" if bus.healthy else "down"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


async def metrics_access(
    request: Request, sessions: SessionsDep, settings: SettingsDep, auth: AuthDep
) -> None:
    """``/metrics``: admin, or anyone with ``REGSTREAM_METRICS_PUBLIC=true``."""
    if settings.metrics_public:
        return
    principal = await current_principal(request, sessions, settings, auth)
    await require_role("admin")(request, principal, sessions, settings)


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(metrics_access)])
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
