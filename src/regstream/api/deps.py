"""Dependencies as ``Annotated`` aliases, and the container of long-lived services.

``Services`` is built by ``app.lifespan`` and stored on ``app.state.services``; routes reach it
through ``ServicesDep`` (nothing imports a global).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from regstream.api.admission import StartGate
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


async def get_services(request: Request) -> Services:
    # async on purpose: FastAPI runs a plain ``def`` dependency on a worker thread (profiled)
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_session(services: ServicesDep) -> AsyncIterator[AsyncSession]:
    async with services.sessions() as session:
        yield session


# scope="function": the session (and its transaction) ends when the handler returns, before the
# response is sent. With the default ("request") it stayed open while a client read the response:
# a slow reader held a pooled connection, and on SQLite the database's write turn.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
