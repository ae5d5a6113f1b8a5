"""Baseline for the SSE benchmark: the usual FastAPI + sse-starlette shared-subscription design.

One Redis Pub/Sub subscription per process; a reader task decodes each message once, encodes the
frame once and puts it on a per-client asyncio.Queue; every client is an sse-starlette
EventSourceResponse over an async generator. Clients that ask for ?registrationId=N are indexed by
it, so a message only wakes its own streams plus the unfiltered ones. Queues are unbounded (as in
the common recipe): a client that stops reading makes the process buffer forever.

Same endpoint and frames as regstream, so the benchmark measures both the same way:
  GET /api/registrations/updates/stream[?registrationId=N]
  data: {"type":"connected","timestamp":...}
  id: <eventId>            (only when the message has an eventId)
  data: {"type":"update","data":<message>}
  data: {"type":"ping","timestamp":...}   every SSE_PING_INTERVAL seconds

Lives in bench/ only. Run: REDIS_URL=redis://127.0.0.1:6379/0 uvicorn baseline_app:app
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI
from sse_starlette import EventSourceResponse, ServerSentEvent

CHANNEL = "service:registration-updates"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PING_S = float(os.environ.get("SSE_PING_INTERVAL", "30"))
_dumps = json.JSONEncoder(separators=(",", ":")).encode

Item = tuple[str | None, str]  # (event id, frame data)


class Hub:
    def __init__(self) -> None:
        self.unfiltered: set[asyncio.Queue[Item]] = set()
        self.by_rid: dict[int, set[asyncio.Queue[Item]]] = {}
        self.subscribed = asyncio.Event()

    def add(self, rid: int | None) -> asyncio.Queue[Item]:
        q: asyncio.Queue[Item] = asyncio.Queue()
        (self.unfiltered if rid is None else self.by_rid.setdefault(rid, set())).add(q)
        return q

    def remove(self, q: asyncio.Queue[Item], rid: int | None) -> None:
        if rid is None:
            self.unfiltered.discard(q)
        elif rid in self.by_rid:
            self.by_rid[rid].discard(q)
            if not self.by_rid[rid]:
                del self.by_rid[rid]

    def dispatch(self, raw: bytes) -> None:
        msg = json.loads(raw)
        if not isinstance(msg, dict):
            return
        eid = msg.get("eventId")
        item = (None if eid is None else str(eid), _dumps({"type": "update", "data": msg}))
        for q in self.unfiltered:
            q.put_nowait(item)
        for q in self.by_rid.get(msg.get("registrationId"), ()):
            q.put_nowait(item)

    async def run(self, redis: aioredis.Redis) -> None:
        while True:
            pubsub = redis.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                self.subscribed.set()
                async for msg in pubsub.listen():
                    if msg["type"] == "message":
                        self.dispatch(msg["data"])
            except (aioredis.ConnectionError, OSError):
                await asyncio.sleep(0.5)
            finally:
                await pubsub.aclose()


state: dict = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state["redis"] = aioredis.Redis.from_url(REDIS_URL)
    state["hub"] = hub = Hub()
    task = asyncio.create_task(hub.run(state["redis"]))
    await asyncio.wait_for(hub.subscribed.wait(), 10)
    yield
    task.cancel()
    await state["redis"].aclose()


app = FastAPI(lifespan=lifespan)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _ping() -> ServerSentEvent:
    return ServerSentEvent(data=_dumps({"type": "ping", "timestamp": _now_ms()}))


@app.get("/api/registrations/updates/stream")
async def stream(registrationId: int | None = None) -> EventSourceResponse:  # noqa: N803
    hub: Hub = state["hub"]

    async def events() -> AsyncIterator[dict]:
        q = hub.add(registrationId)
        try:
            yield {"data": _dumps({"type": "connected", "timestamp": _now_ms()})}
            while True:
                eid, data = await q.get()
                yield {"data": data} if eid is None else {"id": eid, "data": data}
        finally:
            hub.remove(q, registrationId)

    return EventSourceResponse(events(), ping=PING_S, ping_message_factory=_ping, sep="\n")
