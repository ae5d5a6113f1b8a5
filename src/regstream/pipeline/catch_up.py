"""The start-up catch-up: what the database committed is what gets published.

The publisher's outbox lives in memory: updates committed while Redis was down are lost if the
process dies before Redis is back. So at start (``app._services``) every instance compares the
process log with what Redis last saw: the registrations whose row changed within the history's
age cap (``REGSTREAM_HISTORY_MAX_AGE``), a page at a time, against the last seq the publish
script recorded for each in this epoch (``RegistrationPubSub.published_seqs``); the entries
above it (written within the same window) are queued again, in seq order, behind anything
queued already. The publish script skips a ``(registrationId, seq)`` it has published in this
epoch, so republishing is harmless: several instances starting together each catch up, and
whatever two of them queue goes out once. After a new epoch (Redis lost its data or a failover)
Redis has seen nothing: the window's entries are published again in the new epoch, in order.

The same comparison serves the publisher after its outbox overflowed while Redis was down
(``missing``, its ``recover`` hook): the registrations whose updates it dropped are caught up
from the database, in order, instead of only being announced for a re-sync.

Run again each time publishing works after a Redis outage (``publisher.back``): an instance
that died meanwhile with committed updates in its outbox may never be restarted.

Order: an update is skipped when its seq is not above the last one Redis saw, so a later update
published before the catch-up queued the earlier ones would leave those out. The publisher holds
an overflowed registration's new updates until its catch-up is queued, and a run taken over from
a dead instance first queues the run's committed entries again (``recovery.resume_run``), so
a survivor's later updates never overtake what the dead instance committed. Left: entries of an
*earlier* run of a registration whose new run starts before any catch-up ran (they stay in the
process log and the API; the history lacks them).

Bounds: one page (``PAGE`` registrations) read at a time, the outbox's backpressure between
updates (``wait_for_room``), and the time window. Redis unreachable: retried with backoff until
it answers (or the service stops); the catch-up begins again from the first page then (what it
queued already is skipped by the script).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from regstream import metrics
from regstream.db import registrations
from regstream.db.registrations import LogEvent
from regstream.pipeline.events import log_entry_view, to_update
from regstream.pipeline.persist import Publisher
from regstream.realtime.connections import REDIS_ERRORS

log = logging.getLogger(__name__)

#: registrations read (and their last published seqs asked from Redis) per page
PAGE = 500


class CatchUpPublisher(Publisher, Protocol):
    @property
    def back(self) -> asyncio.Event: ...

    async def published_seqs(self, registration_ids: list[int]) -> dict[int, int]: ...


async def catch_up(
    sessions: async_sessionmaker[AsyncSession],
    publisher: CatchUpPublisher,
    *,
    window: float,
    page: int = PAGE,
) -> int:
    """Queue every update committed within ``window`` seconds that Redis has not seen (in this
    epoch), in order per registration; returns how many. Raises on a Redis or database error."""
    since_ms = time.time_ns() // 1_000_000 - int(window * 1000)
    since = datetime.now(UTC) - timedelta(seconds=window)
    after_id, queued = 0, 0
    while True:
        async with sessions() as session:
            rows = await registrations.changed_since(
                session, since=since, after_id=after_id, limit=page
            )
        if not rows:
            break
        after_id = rows[-1][0]
        seen = await publisher.published_seqs([rid for rid, _ in rows])
        behind = {rid: seen.get(rid, 0) for rid, seq in rows if seq > seen.get(rid, 0)}
        for update in await _updates(sessions, behind, since_ms=since_ms):
            await publisher.wait_for_room()
            publisher.enqueue_update(update)
            queued += 1
        if len(rows) < page:
            break
    return queued


async def missing(
    sessions: async_sessionmaker[AsyncSession],
    publisher: CatchUpPublisher,
    registration_ids: list[int],
    *,
    window: float,
) -> list[dict[str, Any]]:
    """The updates of these registrations committed within ``window`` seconds that Redis has not
    seen in this epoch, in order per registration: the publisher's ``recover`` hook, after its
    outbox overflowed (it queues them itself, in front of what the registrations queued since).
    """
    since_ms = time.time_ns() // 1_000_000 - int(window * 1000)
    seen = await publisher.published_seqs(registration_ids)
    behind = {rid: seen.get(rid, 0) for rid in registration_ids}
    return await _updates(sessions, behind, since_ms=since_ms)


async def _updates(
    sessions: async_sessionmaker[AsyncSession], behind: dict[int, int], *, since_ms: int
) -> list[dict[str, Any]]:
    """The log entries above ``behind``'s seq per registration as published updates."""
    if not behind:
        return []
    async with sessions() as session:
        events = await registrations.log_after(session, after=behind, since_ms=since_ms)
        finals = {
            (e.registration_id, e.run): await _run_log(session, e)
            for e in events
            if e.stage is None
        }
    if events:
        metrics.CATCH_UP_REPUBLISHED.inc(len(events))
    return [
        to_update(event, finals.get((event.registration_id, event.run))) for event in events
    ]


async def _run_log(session: AsyncSession, final: LogEvent) -> list[dict[str, Any]]:
    """A final update's ``processLog``: the stages of its run, as the runner published it."""
    entries = await registrations.get_log(
        session, registration_id=final.registration_id, run=final.run
    )
    return [
        log_entry_view(registrations.to_log_event(e))
        for e in entries
        if e.stage is not None and e.seq < final.seq
    ]


async def run(
    sessions: async_sessionmaker[AsyncSession], publisher: CatchUpPublisher, *, window: float
) -> None:
    """The service's task: ``catch_up`` at start, and again each time publishing works again
    after a Redis outage (``publisher.back``: another instance may have died meanwhile with
    committed updates in its outbox); each retried with backoff until it succeeds (Redis or the
    database may be down), then one log line with the count."""
    while True:
        started = time.perf_counter()
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((*REDIS_ERRORS, SQLAlchemyError)),
            wait=wait_exponential_jitter(initial=0.5, max=10.0),
            reraise=True,
        ):
            with attempt:
                queued = await catch_up(sessions, publisher, window=window)
        log.info(
            "catch-up: %d committed updates Redis had not seen queued for publication (%.1f s)",
            queued, time.perf_counter() - started,
        )  # fmt: skip
        await publisher.back.wait()
        publisher.back.clear()
