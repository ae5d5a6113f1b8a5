"""The application: ``create_app(settings)`` and the lifespan that owns every long-lived thing.

Start-up order: data dir → embedded Redis / T24 simulator if not configured → database engine and
migrations → Redis clients, publisher, hub, broker → T24 client → runner → background tasks
(subscription, hub timer, lease recovery). Shutdown runs it backwards, after draining
(``drain.py``): readiness fails first while the instance serves on for ``REGSTREAM_DRAIN_DELAY``
seconds, then new runs are refused and streams are closed in batches over
``REGSTREAM_DRAIN_SPREAD`` seconds, each with a jittered ``retry:`` hint (so browsers reconnect to
the other instances, not all at once), running validations get ``REGSTREAM_SHUTDOWN_GRACE``
seconds to finish.

The SSE path is served by ``StreamEndpoint`` directly, outside FastAPI's middleware stack (see
``api/stream.py``); every other path goes through FastAPI. Auth (``docs/security.md``): FastAPI
routes check roles through ``api/auth.py`` dependencies behind the body-size, cross-site and
security-header middleware (and CORS only when ``REGSTREAM_CORS_ORIGINS`` is set); the stream
path is checked by ``services.stream_auth``, and the hub's timer ends streams whose credential was
revoked or expired (``auth/streams.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from regstream import __version__, gc_tuning, logs
from regstream.api import audit as audit_routes
from regstream.api import dashboard as dashboard_routes
from regstream.api import docs as docs_routes
from regstream.api import errors
from regstream.api import health as health_routes
from regstream.api import login as login_routes
from regstream.api import registrations as registration_routes
from regstream.api import stream_schema as stream_schema_routes
from regstream.api import tickets as ticket_routes
from regstream.api import tokens as token_routes
from regstream.api import users as user_routes
from regstream.api.admission import StartGate
from regstream.api.auth import require_page_role
from regstream.api.deps import Services, expose
from regstream.api.stream import STREAM_PATH, Refresher, StreamEndpoint
from regstream.api.stream_auth import stream_authenticator
from regstream.api.takeover import Takeover
from regstream.auth.middleware import BodySizeLimit, CrossSiteGuard, SecurityHeaders
from regstream.auth.runtime import AuthRuntime
from regstream.config import Settings, load_settings
from regstream.core_banking.client import T24Client, T24ClientConfig
from regstream.db.engine import create_engine, create_session_factory, prepare_schema
from regstream.drain import Drain
from regstream.pipeline import catch_up
from regstream.pipeline.runner import Runner
from regstream.realtime.broker import Broker
from regstream.realtime.bus import Bus
from regstream.realtime.connections import (
    REDIS_ERRORS,
    RedisTarget,
    create_client,
    create_node_subscriber_client,
    create_subscriber_client,
    resolve_cluster,
)
from regstream.realtime.hub import Hub, Stream
from regstream.realtime.partitions import Layout, Partition
from regstream.realtime.publisher import RegistrationPubSub
from regstream.stack import EmbeddedStack, national_id_keys
from regstream.web import pages

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    with EmbeddedStack(settings) as stack:
        settings = stack.settings
        target = await _redis_target(settings)
        auth = _auth_runtime(settings, target)
        app.state.auth = auth
        try:
            async with _services(settings, auth, target) as services:
                expose(app.state, services)  # each on its own, for api/deps.py
                app.state.loop = asyncio.get_running_loop()
                app.state.takeover.announce()  # the log line and metric naming the write path
                drain = Drain(services)
                restore = drain.install_signals()
                gc_tuning.tune(settings.gc_gen0_threshold)  # the start-up heap is complete
                try:
                    yield
                finally:
                    restore()
                    await drain.finish()
                    await auth.guard.release_all()
        finally:
            await auth.aclose()


async def _redis_target(settings: Settings) -> RedisTarget | None:
    """Where Redis is (``None``: nowhere, only in tests of the API alone) and whether it is a
    Redis Cluster (``REDIS_CLUSTER``, or asked of the server when unset; unanswered: not one,
    logged, as the service starts while Redis is down)."""
    if settings.effective_redis_url is None:
        return None
    target = RedisTarget.from_settings(settings)
    for attempt in range(10):  # asked for about 5 s: Redis may be starting beside us
        try:
            return await resolve_cluster(target, settings.redis_cluster)
        except REDIS_ERRORS as exc:
            if attempt == 9:
                log.warning("Redis did not answer at start (%s); assuming one Redis, not a "
                            "cluster (set REDIS_CLUSTER to say)", type(exc).__name__)  # fmt: skip
            else:
                await asyncio.sleep(0.5)
    return target


def _auth_runtime(settings: Settings, target: RedisTarget | None) -> AuthRuntime:
    """Limits count in Redis through a client of their own (same URL and options as the others,
    a small pool: a herd of resumes reading the history never delays a sign-in), with short
    timeouts: while Redis is out they count per process (``auth/limits.py``). On a Redis Cluster
    (``REDIS_CLUSTER``, or detected) that client is a cluster client."""
    redis = None
    if target is not None:
        redis = create_client(
            target, name=f"regstream-limits-{os.getpid()}",
            retries=0, socket_timeout=2.0, max_connections=16,
        )  # fmt: skip
    return AuthRuntime(settings, redis=redis, secret=national_id_keys(settings).current)


@contextlib.asynccontextmanager
async def _services(
    settings: Settings, auth: AuthRuntime, target: RedisTarget | None
) -> AsyncIterator[Services]:
    assert settings.t24_base_url is not None
    assert target is not None  # URL, REDIS_HOST or Sentinel; TLS; cluster or not
    log.info("Redis: %s", target.describe())  # where, never credentials
    layout = (
        Layout.cluster(settings.partitions, mirror=settings.seed_channel_mirror)
        if target.cluster else Layout.single()
    )  # fmt: skip
    if target.cluster:
        log.info(
            "Redis Cluster: %d partitions (SPUBLISH/SSUBSCRIBE); seed channel mirror %s",
            len(layout), "on" if layout.mirror else "off",
        )  # fmt: skip
    engine = create_engine(
        settings.effective_database_url, pool_size=settings.db_pool_size,
        statement_timeout=settings.db_statement_timeout,
    )  # fmt: skip
    # migrations under an advisory lock (instances starting together take turns), or only a
    # check that `regstream migrate` did them (REGSTREAM_MIGRATE_ON_START=false)
    await prepare_schema(engine, migrate_on_start=settings.migrate_on_start)
    sessions = create_session_factory(engine)
    # a cluster: a pool per node, and no waiting for a free connection (redis-py's cluster
    # client refuses instead): room for every partition's calls at once
    per_node = len(layout) + 4 if target.cluster else 0
    # retries=0: the publisher's flusher retries, and its retry asks the publish script to
    # check the primary first (a retry may reach a promoted replica: publisher.py)
    redis = create_client(target, name=f"regstream-pub-{os.getpid()}", retries=0,
                          max_connections=max(8, per_node))  # fmt: skip
    # The publisher, the control work (readiness, the subscription's probe and catch-up) and
    # stream resumes each have their own client and pool: a resume herd never makes a publish
    # or a readiness check wait for a connection (api/admission.py bounds the herd itself).
    control = create_client(
        target, name=f"regstream-ctl-{os.getpid()}", socket_timeout=2.0,
        max_connections=max(4, per_node),  # (a cluster: every partition's probe at once)
    )  # fmt: skip
    resumes = create_client(
        target, name=f"regstream-resume-{os.getpid()}",
        # one per admitted start-up: none waits (a cluster: a stream of several partitions reads
        # them all at once, and redis-py's cluster pools refuse past their cap rather than wait)
        max_connections=settings.resume_concurrency * (len(layout) if target.cluster else 1),
    )  # fmt: skip

    async def recover(registration_ids: list[int]) -> list[dict[str, Any]]:
        # after an outbox overflow: the dropped updates, from the database (pipeline/catch_up.py)
        return await catch_up.missing(
            sessions, publisher, registration_ids, window=settings.history_max_age
        )

    publisher = RegistrationPubSub(
        redis, layout=layout, history_maxlen=settings.history_maxlen,
        history_max_age=settings.history_max_age, outbox_max=settings.outbox_max,
        recover=recover,
    )  # fmt: skip
    def on_detach(stream: Stream) -> None:
        auth.guard.on_detach(stream)
        bus.release(stream)

    hub = Hub(
        ping_interval=settings.sse_ping_interval, send_timeout=30.0, on_tick=auth.guard.on_tick,
        on_detach=on_detach, partitions=len(layout),
    )  # fmt: skip

    def make_broker(partition: Partition) -> Broker:
        name = f"regstream-sub-{os.getpid()}"
        index = partition.index

        def subscriber() -> Redis:
            if not target.cluster:
                return create_subscriber_client(target, name=name)
            assert isinstance(control, RedisCluster)
            node = control.get_node_from_key(partition.channel)
            if node is None:
                raise RedisConnectionError(f"no node serves partition {index}'s slot yet")
            return create_node_subscriber_client(target, node.host, int(node.port), name=name)

        return Broker(
            subscriber=subscriber, commands=control, partition=partition,
            on_update=hub.publish,
            on_resync=lambda ids: hub.resync(ids, partition=index),
            # after a failover: a new epoch before catch-up
            on_connect=lambda reconnected: publisher.check_primary(index, reconnected=reconnected),
            on_position=lambda key: hub.set_position(index, key),
            probe_interval=settings.probe_interval, history_max=settings.history_maxlen,
        )  # fmt: skip

    bus = Bus(layout, hub=hub, make_broker=make_broker, resumes=resumes,
              history_max=settings.history_maxlen, linger=settings.partition_linger)  # fmt: skip
    core = T24Client(
        T24ClientConfig(
            base_url=settings.t24_base_url,
            username=settings.t24_username,
            password=settings.t24_password.get_secret_value() if settings.t24_password else None,
            company_id=settings.t24_company_id,
            timeout=settings.t24_timeout,
            deadline=settings.t24_deadline,
            max_attempts=settings.t24_max_attempts,
            # a validation has at most one T24 request in flight: with as many connections as
            # validations running at once, none waits for a connection (a wait would count
            # against the request's connect timeout, and so against the circuit breaker)
            max_connections=settings.pipeline_concurrency,
            # TLS and proxy (docs/operations.md "T24 core"); Settings checked the files at start
            ca_bundle=str(settings.t24_ca_bundle) if settings.t24_ca_bundle else None,
            client_cert=str(settings.t24_client_cert) if settings.t24_client_cert else None,
            client_key=str(settings.t24_client_key) if settings.t24_client_key else None,
            client_key_password=(
                settings.t24_client_key_password.get_secret_value()
                if settings.t24_client_key_password else None
            ),
            proxy_url=settings.t24_proxy_url.get_secret_value() if settings.t24_proxy_url else None,
            trust_env=settings.t24_trust_env,
        )
    )
    runner = Runner(
        sessions=sessions, core=core, publisher=publisher, keys=national_id_keys(settings),
        concurrency=settings.pipeline_concurrency, lease_seconds=settings.lease_seconds,
        # SQLite writers take turns anyway; PostgreSQL's statements are round trips to overlap
        open_transactions=1 if engine.dialect.name == "sqlite" else 4,
        engine=engine, heartbeat_interval=settings.heartbeat_interval,
        heartbeat_timeout=settings.heartbeat_timeout, poll_interval=settings.queue_poll_interval,
    )  # fmt: skip
    services = Services(
        settings=settings, engine=engine, sessions=sessions, redis=control, publisher=publisher,
        hub=hub, bus=bus, runner=runner,
        start_gate=StartGate(
            concurrency=settings.resume_concurrency, queue_max=settings.resume_queue,
            max_wait=settings.resume_wait,
        ),
    )  # fmt: skip
    services.stream_auth = stream_authenticator(settings, sessions, hub, auth)
    hub.refresh = Refresher(services)  # a re-sync sends filtered streams their state again
    tasks = [
        # what the database committed and Redis never saw (the process died while Redis was
        # down): queued again, deduplicated by the publish script (pipeline/catch_up.py)
        asyncio.create_task(
            catch_up.run(sessions, publisher, window=settings.history_max_age), name="catch-up"
        ),
        asyncio.create_task(bus.run(), name="redis-subscriptions"),
        asyncio.create_task(hub.run(), name="hub-timer"),
        asyncio.create_task(runner.run(), name="work-queue"),  # heartbeat, queue, leases
        asyncio.create_task(auth.guard.watch(hub, sessions), name="stream-credentials"),
    ]
    try:
        if not await bus.wait_ready(5):
            log.warning("Redis subscription not ready yet; streams start when Redis answers")
        yield services
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await publisher.aclose()
        await core.aclose()
        await redis.aclose()
        await control.aclose()
        await resumes.aclose()
        await runner.aclose()  # (after a drain, nothing left to give back)
        await engine.dispose()


class Application:
    """The ASGI app: the stream path goes straight to ``StreamEndpoint``, the rest to FastAPI."""

    def __init__(self, api: FastAPI) -> None:
        self.api = api
        self.state = api.state
        # the streams' write path, decided once (api/takeover.py); the lifespan announces it
        api.state.takeover = Takeover.decide(enabled=api.state.settings.stream_fast_path)
        endpoint: Any = StreamEndpoint(lambda: api.state.services, api.state.takeover)
        self._stream = endpoint
        origins = api.state.settings.cors_origins
        if origins:
            # a listed site's EventSource (with a stream ticket) needs the CORS headers too
            self._stream = CORSMiddleware(
                endpoint, allow_origins=list(origins), allow_credentials=False,
                allow_methods=["GET"], allow_headers=["Last-Event-ID"], max_age=600,
            )  # fmt: skip

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == STREAM_PATH:
            await self._stream(scope, receive, send)
            return
        await self.api(scope, receive, send)


def create_api(settings: Settings) -> FastAPI:
    api = FastAPI(
        title="regstream",
        version=__version__,
        description="Validate mobile-banking registrations against T24 and stream every step live.",
        lifespan=lifespan,
        # served by api/docs.py behind the viewer role instead
        openapi_url=None, docs_url=None, redoc_url=None,
    )  # fmt: skip
    api.state.settings = settings
    errors.install(api)
    # add_middleware wraps: the last added runs first (CORS, headers, cross-site, body size)
    api.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    api.add_middleware(CrossSiteGuard, settings=settings)
    api.add_middleware(SecurityHeaders)
    if settings.cors_origins:
        api.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_credentials=False,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"], max_age=600,
        )  # fmt: skip
    api.include_router(login_routes.router)
    api.include_router(ticket_routes.router)
    api.include_router(user_routes.router)
    api.include_router(token_routes.router)
    api.include_router(audit_routes.router)
    api.include_router(docs_routes.router)
    api.include_router(registration_routes.router)
    api.include_router(health_routes.router)
    api.include_router(dashboard_routes.router)
    api.include_router(stream_schema_routes.router)
    api.include_router(pages.public)
    api.include_router(pages.viewer_pages, dependencies=[Depends(require_page_role("viewer"))])
    api.include_router(pages.admin_pages, dependencies=[Depends(require_page_role("admin"))])
    api.mount("/static", pages.static_files(), name="static")
    return api


def create_app(settings: Settings | None = None) -> Application:
    return Application(create_api(settings or load_settings()))


def create_app_from_env() -> Application:
    """Factory for ``uvicorn --factory`` and ``serve --workers N`` (each worker process calls
    it, so it also sets up that process's logging)."""
    settings = load_settings()
    logs.configure(settings.log_level, json_format=settings.log_json, levels=settings.log_levels)
    return create_app(settings)
