"""Floor for the SSE benchmark: the cheapest SSE fan-out one pure-Python process can do.

No web framework, no per-client queue, no per-client task: an asyncio Protocol server on uvloop
that hand-parses the request line, and one Redis Pub/Sub subscription (redis.asyncio) whose reader
turns each message into ONE pre-encoded HTTP chunk and hands that same bytes object to
`transport.write` of every matching client. What is left per delivery is mostly the kernel's
write() syscall, so its numbers show what one Python process can do at best on the machine;
it is a reference, not a server to deploy (no auth, unbounded write buffers: a client that stops
reading makes the process buffer forever).

Same endpoint, headers and frames as regstream and baseline_app.py, so the benchmark measures it
the same way:
  GET /api/registrations/updates/stream[?registrationId=N]
  HTTP/1.1 200 OK, Content-Type: text/event-stream, Cache-Control: no-cache, chunked
  data: {"type":"connected","timestamp":...}
  id: <eventId>            (only when the message has an eventId)
  data: {"type":"update","data":<message>}
  data: {"type":"ping","timestamp":...}   every SSE_PING_INTERVAL seconds, one timer for all

Lives in bench/ only. Run: REDIS_URL=redis://127.0.0.1:6379/0 python bench/floor_app.py --port P
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
import uvloop

CHANNEL = "service:registration-updates"
STREAM = "/api/registrations/updates/stream"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PING_S = float(os.environ.get("SSE_PING_INTERVAL", "30"))
MAX_REQUEST = 16384
HEADERS = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def chunk(frame: bytes) -> bytes:
    """One HTTP/1.1 chunk holding `frame`."""
    return b"%x\r\n%s\r\n" % (len(frame), frame)


def stamped(kind: str) -> bytes:
    """A connected or ping frame, as a chunk."""
    return chunk(b'data: {"type":"%s","timestamp":%d}\n\n' % (kind.encode(), time.time() * 1000))


def refusal(status: str) -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()


class Hub:
    """Open streams: the unfiltered ones, and the filtered ones indexed by registrationId."""

    def __init__(self) -> None:
        self.everyone: set[asyncio.Transport] = set()
        self.by_rid: dict[int, set[asyncio.Transport]] = {}

    def add(self, t: asyncio.Transport, rid: int | None) -> None:
        (self.everyone if rid is None else self.by_rid.setdefault(rid, set())).add(t)

    def remove(self, t: asyncio.Transport, rid: int | None) -> None:
        if rid is None:
            self.everyone.discard(t)
        elif (ts := self.by_rid.get(rid)) is not None:
            ts.discard(t)
            if not ts:
                del self.by_rid[rid]

    # A failed write never calls connection_lost synchronously (asyncio and uvloop schedule it),
    # so the sets do not change while they are iterated below.
    def publish(self, raw: bytes) -> None:
        try:
            msg = json.loads(raw)
        except ValueError:
            return
        if not isinstance(msg, dict):
            return
        if b"\n" in raw or b"\r" in raw:  # a line break would end the SSE data line
            raw = json.dumps(msg, separators=(",", ":")).encode()
        frame = b'data: {"type":"update","data":' + raw + b"}\n\n"
        eid = msg.get("eventId")
        if eid is not None and "\n" not in str(eid) and "\r" not in str(eid):
            frame = b"id: " + str(eid).encode() + b"\n" + frame
        data = chunk(frame)  # encoded once, written to every matching stream
        for t in self.everyone:
            t.write(data)
        rid = msg.get("registrationId")
        if isinstance(rid, int):
            for t in self.by_rid.get(rid, ()):
                t.write(data)

    def ping(self) -> None:
        data = stamped("ping")
        for t in self.everyone:
            t.write(data)
        for ts in self.by_rid.values():
            for t in ts:
                t.write(data)


class Stream(asyncio.Protocol):
    """One connection: read the request head once, answer, then only ever get written to."""

    __slots__ = ("hub", "transport", "head", "rid", "open")

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.rid: int | None = None
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.open:  # anything a client sends after its request is ignored
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            if len(self.head) > MAX_REQUEST:
                self.refuse("431 Request Header Fields Too Large")
            return
        try:
            method, target, _ = self.head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        except ValueError:
            self.refuse("400 Bad Request")
            return
        url = urlsplit(target)
        if url.path != STREAM:
            self.refuse("404 Not Found")
            return
        if method != "GET":
            self.refuse("405 Method Not Allowed")
            return
        rid = parse_qs(url.query).get("registrationId")
        try:
            self.rid = None if rid is None else int(rid[0])
        except ValueError:
            self.refuse("400 Bad Request")
            return
        self.head, self.open = b"", True
        self.transport.write(HEADERS + stamped("connected"))
        self.hub.add(self.transport, self.rid)

    def refuse(self, status: str) -> None:
        self.transport.write(refusal(status))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.open:
            self.hub.remove(self.transport, self.rid)
            self.open = False


async def follow(hub: Hub, redis: aioredis.Redis, subscribed: asyncio.Event) -> None:
    """The one subscription, resubscribed after a lost Redis connection."""
    while True:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CHANNEL)
            subscribed.set()
            async for msg in pubsub.listen():
                if msg["type"] == "message":
                    hub.publish(msg["data"])
        except (aioredis.ConnectionError, OSError):
            await asyncio.sleep(0.5)
        finally:
            await pubsub.aclose()


async def pinger(hub: Hub) -> None:
    while True:
        await asyncio.sleep(PING_S)
        hub.ping()


async def main(host: str, port: int) -> None:
    hub = Hub()
    redis = aioredis.Redis.from_url(REDIS_URL)
    subscribed = asyncio.Event()
    tasks = [asyncio.create_task(follow(hub, redis, subscribed)), asyncio.create_task(pinger(hub))]
    await asyncio.wait_for(subscribed.wait(), 10)  # listen only once messages can arrive
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Stream(hub), host, port, backlog=4096)
    print(f"floor_app: listening on {host}:{port}, subscribed to {CHANNEL}", flush=True)
    try:
        await server.serve_forever()
    finally:
        for task in tasks:
            task.cancel()
        await redis.aclose()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    try:
        uvloop.run(main(a.host, a.port))
    except KeyboardInterrupt:
        pass
