"""Dependencies as ``Annotated`` aliases, and the container of long-lived services.

A route names what it uses: ``SettingsDep``, ``SessionsDep`` (the session factory) or
``SessionDep`` (one session for the handler), ``RunnerDep``, ``HubDep``, ``AuthDep``... Each
alias reads one attribute of ``app.state``, put there by ``expose`` when ``app.lifespan`` has
built it; nothing imports a global. ``Services`` is the lifespan's container of the same objects
(the stream endpoint and ``drain.py`` work on it); routes never take it whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.datastructures import State

from regstream.api.admission import StartGate
from regstream.auth.runtime import AuthRuntime
from regstream.config import Settings
from regstream.pipeline.runner import Runner
from regstream.realtime.bus import Bus
from regstream.realtime.connections import RedisClient
from regstream.realtime.hub import Hub
from regstream.realtime.publisher import RegistrationPubSub


@dataclass(frozen=True, slots=True)
class StreamDecision:
    """The stream endpoint's access decision: 200 with a principal, or an error to answer."""

    status: int
    code: str = ""
    message: str = ""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    principal: Any = None


#: ``(scope, registration filter: one id, several ids or None for all) -> decision``
StreamAuth = Callable[[dict[str, Any], int | tuple[int, ...] | None], Awaitable[StreamDecision]]


@dataclass
class Services:
    """The long-lived objects ``app.lifespan`` builds and closes (``app._services``). The stream
    endpoint, the hub's refresher and ``drain.py`` work on it; routes take its parts instead."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    # Three Redis clients, so none waits behind another's load: ``redis`` is the control client
    # (readiness, the subscription's probe and catch-up), the publisher has its own, and
    # ``history`` (stream resumes) reads through a third (app.py ``_services``).
    redis: RedisClient
    publisher: RegistrationPubSub
    hub: Hub
    # the subscriptions to the bus's partitions and their histories (realtime/bus.py)
    bus: Bus
    runner: Runner
    # A graceful shutdown (drain.py): ``leaving`` from SIGTERM on (readiness fails, everything
    # else still served), ``draining`` once the drain delay is over (new streams and runs
    # refused, streams being closed).
    leaving: bool = False
    draining: bool = False
    stream_auth: StreamAuth | None = None
    # bounded admission of stream start-ups (api/admission.py); None: every start-up at once
    start_gate: StartGate | None = None


def expose(state: State, services: Services) -> None:
    """Put each long-lived object on ``app.state`` under its own name (``app.lifespan``)."""
    # ``app.state.settings`` stays what create_app was given: a second lifespan starts from it
    state.effective_settings = services.settings
    state.engine = services.engine
    state.sessions = services.sessions
    state.redis = services.redis
    state.bus = services.bus
    state.hub = services.hub
    state.runner = services.runner
    state.services = services


def _from_state(name: str) -> Callable[[Request], Awaitable[Any]]:
    # async on purpose: FastAPI runs a plain ``def`` dependency on a worker thread (profiled)
    async def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    get.__name__ = f"get_{name}"
    return get


#: the settings the app runs with: ``REGSTREAM_*``, with what ``EmbeddedStack`` started filled in
SettingsDep = Annotated[Settings, Depends(_from_state("effective_settings"))]
EngineDep = Annotated[AsyncEngine, Depends(_from_state("engine"))]
SessionsDep = Annotated[async_sessionmaker[AsyncSession], Depends(_from_state("sessions"))]
#: the control client (readiness, the subscription's probe): its own small pool (``app.py``)
RedisDep = Annotated[RedisClient, Depends(_from_state("redis"))]
#: the subscriptions to the bus's partitions (readiness: are they healthy)
BusDep = Annotated[Bus, Depends(_from_state("bus"))]
HubDep = Annotated[Hub, Depends(_from_state("hub"))]
RunnerDep = Annotated[Runner, Depends(_from_state("runner"))]
#: sign-in limits, password hashing turns, the per-user stream guard (``app._auth_runtime``)
AuthDep = Annotated[AuthRuntime, Depends(_from_state("auth"))]


async def get_session(sessions: SessionsDep) -> AsyncIterator[AsyncSession]:
    async with sessions() as session:
        yield session


# scope="function": the session (and its transaction) ends when the handler returns, before the
# response is sent. With the default ("request") it stayed open while a client read the response:
# a slow reader held a pooled connection, and on SQLite the database's write turn.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]

#: ``Services.leaving`` and ``draining`` as one value: how far a graceful shutdown has come
ShutdownPhase = Literal["serving", "leaving", "draining"]


async def get_shutdown_phase(request: Request) -> ShutdownPhase:
    # Drain sets its flags on the Services container as it goes; they are read there
    services: Services = request.app.state.services
    if services.draining:
        return "draining"
    return "leaving" if services.leaving else "serving"


ShutdownPhaseDep = Annotated[ShutdownPhase, Depends(get_shutdown_phase)]
