"""``GET /api/registrations/updates/stream[?registrationId=N][&lastEventId=ID]``: the SSE endpoint.

A plain ASGI endpoint rather than a FastAPI route with ``EventSourceResponse``: ``app.py`` sends
the stream path here before any middleware, and with uvicorn's httptools protocol the hub writes
pre-encoded chunks straight to the connection's transport, taken over from uvicorn
(``api/takeover.py``, the one module that touches uvicorn's internals, and ``realtime/hub.py``
for the measurements behind that); elsewhere, or with ``REGSTREAM_STREAM_FAST_PATH=false``, the
portable queued path. Everything else about the stream lives here:

1. check the request (filter, last event id, limits, credentials) and answer errors as JSON;
2. send the headers, a ``retry:`` hint and the seed's ``connected`` frame;
3. attach to the hub *before* reading history, so nothing published meanwhile is lost; live
   updates are held while we write the replay (``Last-Event-ID``) or the snapshot (a late joiner
   of a run in progress, or a resume that history cannot cover), then released without
   duplicates at the seam;
4. wait for the client to go away (or for the hub to close us), then detach.

Frames (documented in the README): ``connected``, ``update`` (with ``id:``), ``ping``,
``snapshot`` (``data`` = the registration with its process log; or ``resync: true`` for an
unfiltered stream: re-read the list from the API), ``auth`` (credentials expired: sign in again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple
from urllib.parse import parse_qs

import orjson

from regstream import metrics
from regstream.api import errors, views
from regstream.api.deps import Services
from regstream.api.takeover import Takeover
from regstream.auth.middleware import security_headers
from regstream.db import registrations
from regstream.db.engine import unavailable as database_unavailable
from regstream.realtime import messages, positions
from regstream.realtime.bus import Bus
from regstream.realtime.connections import REDIS_ERRORS
from regstream.realtime.history import Replay
from regstream.realtime.hub import QueuedStream, RegistrationFilter, Stream, TransportStream
from regstream.realtime.messages import EventKey, Parsed
from regstream.realtime.positions import Position

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

STREAM_PATH = "/api/registrations/updates/stream"
# the same security headers as every other answer (served outside that middleware: app.py)
_HEADERS = security_headers(STREAM_PATH, [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
])  # fmt: skip
MAX_ID = 2**53
MAX_IDS = 200  # registrations one stream may follow (a list page)


class StreamEndpoint:
    """The ASGI app for the stream path; ``services`` is read from ``app.state`` per request;
    ``takeover`` is the write path decided once for the app (``Takeover.decide``)."""

    def __init__(self, services: Callable[[], Services], takeover: Takeover) -> None:
        self._services = services
        self.takeover = takeover

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = self._services()
        if scope["method"] not in ("GET", "HEAD"):
            await _json(send, 405, "METHOD_NOT_ALLOWED", "use GET", [(b"allow", b"GET")])
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        registration_id = _filter(query.get("registrationId") or [])
        if registration_id is _INVALID:
            why = f"registrationId must be a positive integer (or up to {MAX_IDS}, comma-separated)"
            await _json(send, 422, "VALIDATION_ERROR", why)
            return
        assert not isinstance(registration_id, str)
        last_id = _header(scope, b"last-event-id") or (query.get("lastEventId") or [None])[0]

        gate = services.start_gate
        retry_ms = services.settings.sse_retry_ms
        stream: Stream | None = None
        handed_over = False
        try:
            # Credentials (a database read) and the start-up (a history read or a snapshot) run
            # admitted, a bounded number at once; the stream's life does not (api/admission.py).
            async with gate.admit() if gate is not None else _ALWAYS as admitted:
                if not admitted:
                    await _defer(send, scope, retry_ms)
                    return
                try:
                    opened = await _open(scope, send, services, registration_id, not last_id,
                                         self.takeover)  # fmt: skip
                except Exception as exc:  # before the response head (credentials' reads)
                    if database_unavailable(exc):
                        errors.DATABASE_OUTAGE.failed(exc)  # as the API's routes answer it
                        await _database_unavailable(send, scope)
                        return
                    request_id = _request_id()
                    log.error("stream request %s failed with %s", request_id, type(exc).__name__)
                    await _json(send, 500, "INTERNAL_ERROR",
                                "internal error; quote the request id to support",
                                request_id=request_id)  # fmt: skip
                    return
                if opened is None:
                    return  # answered (refused, HEAD)
                stream, start = opened
                try:
                    await _start(stream, services, registration_id, last_id, retry_ms, start)
                    await _refresh_while_due(stream, services)
                except Exception as exc:  # after the head: end the stream, the client resumes
                    _failed_after_head(stream, exc, retry_ms)
            if isinstance(stream, TransportStream):
                handed_over = self.takeover.hand_over(stream, services.hub)
                if not handed_over:
                    await _wait_disconnect(stream, receive)
            elif isinstance(stream, QueuedStream):
                await _pump_until_disconnect(stream, send, receive)
        finally:
            if stream is not None and not handed_over:
                services.hub.detach(stream)


async def _open(
    scope: Scope, send: Send, services: Services, rid: RegistrationFilter, fresh: bool,
    takeover: Takeover,
) -> tuple[Stream, EventKey | WideStart | None] | None:  # fmt: skip
    """Credentials and limits, then the response head: the stream, attached to the hub, and
    (``fresh``: no last event id) the history's position read before the head; None when the
    request was answered instead (refused, or a HEAD)."""
    info: Any = None
    auth = services.stream_auth
    if auth is not None:
        decision = await auth(scope, rid)
        if decision.status != 200:
            await _json(send, decision.status, decision.code, decision.message, decision.headers)
            return None
        info = decision.principal
    if services.draining:
        await _json(send, 503, "UNAVAILABLE", "server is restarting", [(b"retry-after", b"1")])
        return None
    hub = services.hub
    if len(hub) >= services.settings.sse_max_streams:
        await _json(send, 503, "UNAVAILABLE", "too many streams", [(b"retry-after", b"5")])
        return None
    if scope["method"] == "HEAD":
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return None
    max_buffer = services.settings.sse_max_buffer_bytes
    transport = takeover.transport_of(send)
    stream: Stream = (
        TransportStream(rid, transport, chunked=True, max_buffer=max_buffer, info=info)
        if transport is not None else QueuedStream(rid, max_buffer=max_buffer, info=info)
    )  # fmt: skip
    bus = services.bus
    try:
        # the partitions it follows, subscribed and positioned before its start-up reads them
        # (one Redis: always; a cluster: on demand, realtime/bus.py); released when it leaves
        # the hub (app.py: the hub's on_detach)
        await bus.acquire(stream)
        wide = bus.partitioned and not isinstance(rid, int)
        start: EventKey | WideStart | None = None
        if wide:
            start = WideStart(head=hub.position() if fresh else None, attached=())
        elif fresh:
            start = await _latest(services, rid)
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    except BaseException:
        bus.release(stream)
        raise
    hub.attach(stream)
    if isinstance(start, WideStart):  # no await since attaching: later updates are held
        start = start._replace(attached=hub.position())
    return stream, start


class WideStart(NamedTuple):
    """A stream of several partitions (``positions.py``): the hub's position before the head
    (a fresh stream starts there) and when the stream was attached (live from there)."""

    head: Position | None
    attached: Position


_INVALID = "invalid"
_ALWAYS = contextlib.nullcontext(True)  # no admission gate (a Services built without one)


async def _defer(send: Send, scope: Scope, retry_ms: int) -> None:
    """Answer a start-up the admission gate deferred: come back later, jittered, same id.

    An ``EventSource`` (it asks for ``text/event-stream``) gets ``200`` with a ``retry:`` hint
    and the end of the stream: it reconnects by itself after that delay, sending the same
    ``Last-Event-ID`` (no ``id:`` line was sent). A ``503`` would make it give up for good
    (readyState CLOSED). Any other client gets ``503`` JSON with ``Retry-After``.
    """
    delay = int(retry_ms * random.uniform(0.5, 1.5))
    await _come_back(send, scope, delay, "busy", "too many streams starting; retry later")


async def _database_unavailable(send: Send, scope: Scope) -> None:
    """The database cannot answer (``api/errors.py`` logged it once per outage): as the API's
    routes answer it (503 JSON, ``Retry-After`` jittered), or as a deferral to an EventSource."""
    delay = int(errors.database_retry_after()) * 1000
    await _come_back(send, scope, delay, "database unavailable",
                     "the database is unavailable; retry later")  # fmt: skip


async def _come_back(send: Send, scope: Scope, delay: int, why: str, message: str) -> None:
    seconds = str(max(1, math.ceil(delay / 1000))).encode()
    request_id = _request_id()
    accept = _header(scope, b"accept") or ""
    if "text/event-stream" in accept:
        body = b"retry: %d\n: %s (request %s): reconnect with the same Last-Event-ID\n\n" % (
            delay, why.encode(), request_id.encode(),
        )  # fmt: skip
        headers = [*_HEADERS, (b"retry-after", seconds), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await _json(send, 503, "UNAVAILABLE", message, [(b"retry-after", seconds)],
                request_id=request_id, retryMs=delay)  # fmt: skip


def _request_id() -> str:
    """As ``api/errors.py`` gives every error answer of the API (quoted to support)."""
    return uuid.uuid4().hex[:16]


def _retry_hint(retry_ms: int) -> bytes:
    return messages.retry_frame(int(retry_ms * random.uniform(0.5, 1.5)))


def _failed_after_head(stream: Stream, exc: Exception, retry_ms: int) -> None:
    """A start-up (or a re-sync's snapshot) failed once the stream was open: end it with a
    jittered ``retry:`` hint; the client resumes with its last id (a snapshot if need be)."""
    if database_unavailable(exc):
        errors.DATABASE_OUTAGE.failed(exc)  # one log line per outage
    else:  # type only: driver messages can quote personal data
        log.error("stream start-up failed with %s; the client is told to resume",
                  type(exc).__name__)  # fmt: skip
    stream.close(_retry_hint(retry_ms))


def _filter(values: list[str]) -> RegistrationFilter | str:
    """``registrationId=42`` → 42; ``=1,2,3`` (or repeated) → (1, 2, 3); absent → None."""
    parts = [p.strip() for v in values for p in v.split(",") if p.strip()]
    if not parts:
        return None if all(v == "" for v in values) else _INVALID
    if len(parts) > MAX_IDS:
        return _INVALID
    ids = []
    for part in parts:
        if not (part.isascii() and part.isdigit()) or len(part) > 16 or not 1 <= int(part) <= MAX_ID:
            return _INVALID
        ids.append(int(part))
    unique = tuple(sorted(set(ids)))
    return unique[0] if len(unique) == 1 else unique


async def _start(
    stream: Stream, services: Services, rid: RegistrationFilter, last_id: str | None,
    retry_ms: int, start: EventKey | WideStart | None = None,
) -> None:  # fmt: skip
    """Write ``connected``, then the replay or snapshot, then release held live updates (no
    gap, no duplicate at the seam).

    A stream opened without a last event id starts at ``start``, the newest update in the
    history read before the response head was sent (``_open``): ``connected`` tells the client
    that position in ``lastEventId`` (data, not an ``id:`` line: control frames never move the
    browser's id), so a client that drops before its first update can still resume without a
    gap; whatever was published between that read and attaching is replayed, so a client that
    starts a run as soon as it sees the head (``EventSource.onopen``) misses none of it.
    """
    if isinstance(start, WideStart):
        await _start_wide(stream, services, rid, last_id, retry_ms, start)
        return
    fields: dict[str, Any] = {}
    if not last_id:
        fields["lastEventId"] = str(start) if start is not None else None
    # The `retry:` hint rides in the first event, so `connected` stays the first frame.
    hello = b"retry: %d\n" % retry_ms + messages.control_frame("connected", **fields)
    stream.write(hello, messages.chunk(hello))
    if not last_id:
        metrics.STREAM_STARTS.labels("fresh").inc()
        if isinstance(rid, int):
            await _snapshot(stream, services, rid, only_if_started=True, start=start)
            return
        if start is None:
            stream.go_live()
            return
        if await _replay(stream, services, rid, start, 0):
            return
    else:
        key, seq_floor = messages.parse_resume_id(last_id)
        if key is not None and await _replay(stream, services, rid, key, seq_floor):
            metrics.STREAM_STARTS.labels("replay").inc()
            return
        metrics.STREAM_STARTS.labels("snapshot").inc()
    # the history cannot cover it: each followed registration's state (unfiltered: a resync
    # marker, re-read from the API)
    await _snapshot(stream, services, rid, start=await _latest(services, rid))


async def _start_wide(
    stream: Stream, services: Services, rid: RegistrationFilter, last_id: str | None,
    retry_ms: int, start: WideStart,
) -> None:  # fmt: skip
    """``_start`` for a stream of several partitions (unfiltered, or a list page, in cluster
    mode). Its ids are positions: each partition's part is replayed from its history, up to
    where the hub was when the stream was attached (``start.attached``); everything after that
    is held live updates, whose frames carry the hub's position. So a client resuming from any
    id it got misses nothing and gets nothing twice, across partitions."""
    bus = services.bus
    fields: dict[str, Any] = {}
    if not last_id:
        # where the replay below starts: a client that drops before it resumes from there
        fields["lastEventId"] = positions.encode(start.head if start.head is not None
                                                 else start.attached)  # fmt: skip
    hello = b"retry: %d\n" % retry_ms + messages.control_frame("connected", **fields)
    stream.write(hello, messages.chunk(hello))
    wanted = None if rid is None else (rid if isinstance(rid, tuple) else (rid,))
    if not last_id:
        metrics.STREAM_STARTS.labels("fresh").inc()
        base = start.head
    else:
        head, _, _ = last_id.partition("~")
        base = positions.decode(head, len(bus.layout))
    if base is not None and await _replay_wide(stream, bus, wanted, base, start.attached):
        if last_id:
            metrics.STREAM_STARTS.labels("replay").inc()
        return
    if last_id:
        metrics.STREAM_STARTS.labels("snapshot").inc()
    await _snapshot(stream, services, rid, start=start.attached)


async def _replay_wide(
    stream: Stream, bus: Bus, wanted: tuple[int, ...] | None, base: Position, upto: Position
) -> bool:
    """Write, in one burst, each followed partition's updates after ``base`` and up to
    ``upto`` (merged in entry-id order, each with its position), then go live; False (nothing
    written) when a history cannot prove it holds them all."""
    indexes = bus.needs(wanted)
    reads = []
    for index in indexes:
        after, until = base[index], upto[index]
        if until is None and after is not None:
            return False  # this instance knows no history there (lost?): nothing is proved
        if until is None or after == until:
            continue  # nothing published there, or nothing since
        if after is not None and (after.epoch != until.epoch or after > until):
            return False  # another epoch (a failover), or ahead of this instance: re-sync
        ids = None if wanted is None else tuple(r for r in wanted if r % len(bus.layout) == index)
        reads.append((index, until, after, ids))
    try:
        replays = await asyncio.gather(*(
            bus.histories[index].since(after) if ids is None or after is None
            else bus.histories[index].since_for(after, ids)
            for index, _, after, ids in reads
        ))  # fmt: skip
    except REDIS_ERRORS:
        return False
    merged: list[tuple[int, int, int, Parsed]] = []
    for (index, until, _, _), replay in zip(reads, replays, strict=True):
        if not replay.complete or _resynced(replay, wanted):
            return False
        for parsed in replay.entries:
            key = parsed.key
            if key is None or (key.ms, key.n) > (until.ms, until.n):
                continue  # held live (dispatched after the stream was attached)
            if wanted is not None and parsed.registration_id not in wanted:
                continue
            merged.append((key.ms, key.n, index, parsed))
    merged.sort(key=lambda item: item[:3])
    components = [positions.component(key) for key in base]
    for index in range(len(components)):
        if index not in indexes:
            components[index] = positions.component(upto[index])
    frames: list[bytes] = []
    for _, _, index, parsed in merged:
        assert parsed.key is not None
        components[index] = positions.component(parsed.key)
        if parsed.resync is not None:
            named = sorted(parsed.resync)
            frames.append(messages.snapshot_frame(
                {"registrationIds": named} if named else None, resync=True,
                event_id=positions.join(components),
            ))  # fmt: skip
        else:
            frames.append(messages.update_frame(parsed, event_id=positions.join(components)))
    if frames:
        burst = b"".join(frames)
        stream.write(burst, messages.chunk(burst))
    stream.go_live()
    return True


async def _replay(
    stream: Stream, services: Services, rid: RegistrationFilter, key: EventKey, seq_floor: int
) -> bool:
    """Write the history's updates after ``key`` that the stream follows, then go live; False
    (nothing written) when the history cannot prove it holds them all."""
    wanted = None if rid is None else (rid if isinstance(rid, tuple) else (rid,))
    history = services.bus.history_of(wanted[0]) if wanted else services.bus.histories[0]
    try:
        if wanted is None:
            replay = await history.since(key)
        else:  # only these registrations' entries are read (history.py: the index)
            replay = await history.since_for(key, wanted)
    except REDIS_ERRORS:
        return False
    if not replay.complete or _resynced(replay, wanted):
        return False
    stream.floor_seq = seq_floor if isinstance(rid, int) else 0
    after: EventKey = key
    # one write for the whole replay: a write per frame was a send() per frame (up to the whole
    # history per resume, the bulk of a resume herd's CPU)
    frames: list[bytes] = []
    for parsed in replay.entries:
        if parsed.key is not None:
            after = parsed.key
        if parsed.resync is not None:
            if wanted is not None:
                continue  # (not one naming a followed registration: _resynced)
            ids = sorted(parsed.resync)  # unfiltered: as the hub writes it live
            frame = messages.snapshot_frame(
                {"registrationIds": ids} if ids else None, resync=True,
                event_id=str(parsed.key) if parsed.key else None,
            )  # fmt: skip
        elif wanted is None or (parsed.registration_id in wanted and not stream.covers(parsed)):
            frame = messages.update_frame(parsed)
        else:
            continue
        frames.append(frame)
    if frames:
        burst = b"".join(frames)
        stream.write(burst, messages.chunk(burst))
    stream.go_live(after=after, snapshot_seq=stream.floor_seq)
    return True


def _resynced(replay: Replay, wanted: tuple[int, ...] | None) -> bool:
    """Whether the replay holds a resync naming a followed registration: some of its updates
    were dropped before reaching Redis (a publisher's outbox overflowed), so no replay of the
    history can be complete for it; the stream starts with a snapshot instead."""
    if wanted is None:
        return False
    return any(
        p.resync is not None and not set(p.resync).isdisjoint(wanted) for p in replay.entries
    )


async def _latest(services: Services, rid: RegistrationFilter) -> EventKey | None:
    """The newest update in the history (of the partition of a stream of one registration), if
    Redis answers."""
    bus = services.bus
    history = bus.history_of(rid) if isinstance(rid, int) else bus.histories[0]
    try:
        return await history.position()
    except REDIS_ERRORS:
        return None


async def _snapshot(
    stream: Stream, services: Services, rid: RegistrationFilter, *,
    only_if_started: bool = False, start: EventKey | Position | None = None,
) -> None:  # fmt: skip
    """Send each followed registration's state from the database, or (unfiltered) a re-sync
    marker; then the stream goes live.

    ``start`` is the history position read before the database: every update at or before it
    was committed before it was published, so the snapshot contains it. A snapshot's id
    ``<start>~<seq>`` lets a client resume after it without a gap or a duplicate. Several
    registrations: one snapshot frame each that has any progress (a registration never
    validated has nothing to show: its first update is seq 1), in id order.
    """
    # one history's position, or (several partitions) the hub's position: no floor key then
    position_id = None if start is None else (
        str(start) if isinstance(start, EventKey) else positions.encode(start))  # fmt: skip
    after = start if isinstance(start, EventKey) else None
    if rid is None:
        # Positioned too: after re-reading from the API the client resumes from `start`.
        frame = messages.snapshot_frame(None, resync=True, event_id=position_id)
        stream.write(frame, messages.chunk(frame))
        stream.go_live(after=after)
        return
    several = isinstance(rid, tuple)
    details = []
    async with services.sessions() as session:
        for one in rid if isinstance(rid, tuple) else (rid,):
            row = await registrations.get(session, registration_id=one)
            if row is None or ((only_if_started or several) and row.seq == 0):
                continue
            log_rows = await registrations.get_log(session, registration_id=one, run=row.run_count)
            details.append(_detail(row, log_rows))
    seqs: dict[int, int] = {}
    frames = []
    for detail in details:
        seqs[detail["id"]] = detail["seq"]
        event_id = f"{position_id}~{detail['seq']}" if position_id is not None else None
        frames.append(messages.snapshot_frame(detail, event_id=event_id))
    if frames:
        burst = b"".join(frames)
        stream.write(burst, messages.chunk(burst))
    if isinstance(rid, tuple):
        stream.go_live(after=after, snapshot_seqs=seqs)
    else:  # live updates up to the snapshot's seq are skipped
        stream.go_live(after=after, snapshot_seq=seqs.get(rid))


def _detail(row: Any, log_rows: list[Any]) -> dict[str, Any]:
    """One registration's snapshot (``views.snapshot_of``) with its ``seq``."""
    detail = views.snapshot_of(row, log_rows)
    # Row and log are two reads: the log may already hold entries the row did not show. The
    # snapshot is as new as its newest log entry.
    seq = max([row.seq, *(e.seq for e in log_rows)])
    last = log_rows[-1] if log_rows else None
    if last is not None and last.stage is None and detail["inProgress"]:
        detail.update(status=last.status, inProgress=False, currentStage=row.current_stage,
                      result={"message": last.message, "details": last.details or {}})  # fmt: skip
    detail["seq"] = seq
    return detail


async def _refresh_while_due(stream: Stream, services: Services) -> None:
    """The hub asked for this filtered stream's state again (``Hub.resync``: a new epoch,
    history that cannot cover a reconnection, dropped updates): live updates are held, its
    registrations' snapshots written, positioned in the history as it is now, then live."""
    while stream.refresh_due and not stream.closed:
        stream.refresh_due = False
        if stream.pending is None:
            stream.pending = []  # hold live updates while the snapshots are read
        metrics.STREAM_STARTS.labels("snapshot").inc()
        rid = stream.registration_id
        start: EventKey | Position | None = (
            services.hub.position() if services.bus.partitioned and not isinstance(rid, int)
            else await _latest(services, rid)
        )  # fmt: skip
        await _snapshot(stream, services, rid, only_if_started=True, start=start)


class Refresher:
    """``Hub.refresh``: a live filtered stream told to re-sync gets its registrations' state
    (a task per stream, admitted through the start-up gate like a start-up: a new epoch asks
    every stream at once). Deferred or failed: the stream ends with a ``retry:`` hint and the
    client resumes with its last id (another epoch's: a snapshot at start-up)."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, stream: Stream) -> None:
        if stream.closed or stream.pending is not None:
            return
        stream.pending = []  # held from now: the snapshot's floor skips what it covers
        stream.refresh_due = True
        task = asyncio.get_running_loop().create_task(self._run(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, stream: Stream) -> None:
        services = self._services
        retry_ms = services.settings.sse_retry_ms
        gate = services.start_gate
        try:
            async with gate.admit() if gate is not None else _ALWAYS as admitted:
                if not admitted:
                    stream.close(_retry_hint(retry_ms))
                    return
                await _refresh_while_due(stream, services)
        except Exception as exc:
            _failed_after_head(stream, exc, retry_ms)


async def _wait_disconnect(stream: Stream, receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _pump_until_disconnect(stream: QueuedStream, send: Send, receive: Receive) -> None:
    async def watch() -> None:
        await _wait_disconnect(stream, receive)
        stream.abort()

    watcher = asyncio.create_task(watch())
    try:
        await stream.pump(send)
    except OSError:
        pass
    finally:
        watcher.cancel()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _json(
    send: Send, status: int, code: str, message: str,
    headers: list[tuple[bytes, bytes]] | None = None, *, request_id: str | None = None,
    **extra: Any,
) -> None:  # fmt: skip
    """An error answer as the API's (``api/errors.py``): ``requestId``, security headers."""
    body = orjson.dumps(
        {"error": code, "message": message, "requestId": request_id or _request_id(), **extra}
    )
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *(headers or [])]  # fmt: skip
    await send({
        "type": "http.response.start", "status": status,
        "headers": security_headers(STREAM_PATH, head),
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})
