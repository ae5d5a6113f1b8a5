"""The stream path on bad days (issue 16): a Last-Event-ID ahead of the history, a Redis whose
history was replaced (a new epoch) under open and resuming filtered streams, error answers
(requestId, security headers) and a database outage. Real Redis, real SQLite/PostgreSQL, a live
server."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import httpx
from redis.asyncio import Redis

from regstream.api.admission import StartGate
from regstream.realtime.messages import parse_event_id, parse_resume_id
from tests.conftest import SettingsFactory
from tests.integration.test_database_outage import TcpForwarder, _Lines, forwarded, lines
from tests.support import (
    Frame,
    LiveServer,
    SseReader,
    StreamClient,
    auth_headers,
    open_stream,
    serve_app,
    wait_until,
)

__all__ = ["forwarded", "lines"]  # fixtures used here

STREAM = "/api/registrations/updates/stream"
SECURITY = {"x-content-type-options": "nosniff", "x-frame-options": "DENY",
            "referrer-policy": "same-origin"}  # fmt: skip


def _snapshots(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if f.type == "snapshot"]


async def _run(live: LiveServer, rid: int, watcher: SseReader) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=live.url, headers=auth_headers(live, "operator")) as ops:
        assert (await ops.post(f"/api/registrations/{rid}/process")).status_code == 202
    return await watcher.wait_final(rid)


async def _position(live: LiveServer) -> str:
    return str(await live.call(live.services.bus.histories[0].position()))


# --- 1. a Last-Event-ID ahead of the history ----------------------------------------------------


async def test_a_last_event_id_ahead_of_the_history_gets_a_snapshot_then_live_updates(
    live: LiveServer,
) -> None:
    """Same epoch, an id later than anything published: before, the replay was "complete" and
    empty and the stream's floor (that id) dropped every live update silently."""
    ids = await live.load_demo()
    a, b = ids["approved"], ids["kyc_mismatch"]
    admin = auth_headers(live, "admin")
    async with StreamClient(live.url, headers=admin) as everything:
        await _run(live, b, everything)  # the history is not empty
        key = parse_event_id(everything.last_event_id())
        assert key is not None
        ahead = f"{key.epoch}_{key.ms + 10**9}-0"
        async with (
            open_stream(live, admin, registration_id=str(a), last_event_id=ahead) as filtered,
            open_stream(live, admin, last_event_id=ahead) as unfiltered,
        ):
            await filtered.wait_for(lambda fs: bool(_snapshots(fs)), what="filtered snapshot")
            await unfiltered.wait_for(lambda fs: bool(_snapshots(fs)), what="resync marker")
            snapshot = _snapshots(filtered.frames)[0]
            assert snapshot.data is not None and snapshot.data["data"]["id"] == a
            assert (_snapshots(unfiltered.frames)[0].data or {}).get("resync") is True
            await _run(live, a, everything)
            final = await filtered.wait_final(a)
            await unfiltered.wait_final(a)
    assert final["status"] == "APPROVED"
    assert [u["seq"] for u in filtered.updates(a)] == list(range(1, 8))
    assert [u["seq"] for u in unfiltered.updates(a)] == list(range(1, 8))


# --- 2. a new epoch: filtered streams get their registrations' state ------------------------------


async def _new_epoch(live: LiveServer) -> None:
    """Redis loses its data (as a replaced server): the next publish begins a new epoch."""
    redis = Redis.from_url(str(live.settings.effective_redis_url))
    try:
        await redis.flushall()
    finally:
        await redis.aclose()


async def test_a_resume_of_several_registrations_from_another_epoch_gets_each_ones_state(
    live: LiveServer,
) -> None:
    """Before: the bare ``{"type":"snapshot","resync":true}``; now one snapshot per followed
    registration with progress (state and process log), positioned for the next resume."""
    ids = await live.load_demo()
    a, b, c = ids["approved"], ids["kyc_mismatch"], ids["duplicate"]
    admin = auth_headers(live, "admin")
    async with StreamClient(live.url, headers=admin) as everything:
        await _run(live, a, everything)
        await _run(live, b, everything)
        old = everything.last_event_id()
    await _new_epoch(live)
    following = f"{a},{b},{c}"  # c never validated: nothing to show
    async with open_stream(live, admin, registration_id=following, last_event_id=old) as resumed:
        await resumed.wait_for(lambda fs: len(_snapshots(fs)) >= 2, what="two snapshots")
        await asyncio.sleep(0.3)  # (nothing else may follow)
        snaps = _snapshots(resumed.frames)
        assert len(snaps) == 2 and not any((s.data or {}).get("resync") for s in snaps)
        got = {s.data["data"]["id"]: s for s in snaps if s.data}
        assert set(got) == {a, b}
        assert (got[a].data or {})["data"]["status"] == "APPROVED"
        assert (got[b].data or {})["data"]["status"] == "FAILED"
        for rid, steps in ((a, 7), (b, 7)):  # FAILED too: status_update before the final
            data = (got[rid].data or {})["data"]
            assert data["seq"] == steps and len(data["processLog"]) == steps
            key, seq = parse_resume_id(got[rid].id)
            assert key is not None and key.epoch != (parse_event_id(old) or key).epoch
            assert seq == steps
        position = resumed.last_event_id()
    # The new epoch's first update makes the broker re-sync every open stream (it cannot know
    # which began in the new epoch): an update of another registration first.
    others = [rid for rid in ids.values() if rid not in (a, b, c)]
    async with StreamClient(live.url, headers=admin) as everything:
        await _run(live, others[0], everything)
    # positioned: resuming after it replays (nothing of these), no snapshot again, then live
    async with open_stream(live, admin, registration_id=following, last_event_id=position) as again:
        async with StreamClient(live.url, headers=admin) as everything:
            await _run(live, b, everything)  # a FAILED run may be re-run
        await again.wait_for(lambda fs: any(f.type == "update" for f in fs), what="live")
        final = await again.wait_final(b)
    assert not _snapshots(again.frames)
    # b's first run (FAILED) was seqs 1-7; its second run goes on from 8
    assert final["seq"] > 7 and [u["seq"] for u in again.updates(b)] == list(range(8, 15))


async def test_open_filtered_streams_get_their_state_when_a_new_epoch_begins(
    live: LiveServer,
) -> None:
    """Redis replaced under open streams: the broker sees a new epoch and every stream must
    re-sync. Filtered streams (one id, several ids) got the bare marker; now their
    registrations' state, positioned in the new epoch, then live updates without duplicates."""
    ids = await live.load_demo()
    a, b, c = ids["approved"], ids["kyc_mismatch"], ids["duplicate"]
    admin = auth_headers(live, "admin")
    async with StreamClient(live.url, headers=admin) as everything:
        await _run(live, a, everything)
        await _run(live, b, everything)
    async with (
        open_stream(live, admin, registration_id=str(a)) as one,
        open_stream(live, admin, registration_id=f"{a},{b}") as several,
        open_stream(live, admin) as unfiltered,
    ):
        assert [s.data["data"]["id"] for s in _snapshots(one.frames) if s.data] == [a]
        before = (len(one.frames), len(several.frames))
        await _new_epoch(live)
        async with StreamClient(live.url, headers=admin) as watcher:
            await _run(live, c, watcher)  # the new epoch's first updates: the broker re-syncs
        await one.wait_for(lambda fs: len(_snapshots(fs)) == 2, what="a's state again")
        await several.wait_for(lambda fs: len(_snapshots(fs)) == 2, what="a's and b's state")
        await unfiltered.wait_for(lambda fs: bool(_snapshots(fs)), what="the resync marker")
        epoch = parse_event_id(await _position(live))
        assert epoch is not None
        for reader, expected in ((one, [a]), (several, [a, b])):
            fresh = _snapshots(reader.frames[before[0] if reader is one else before[1] :])
            assert [(s.data or {}).get("resync") for s in fresh] == [None] * len(expected)
            assert sorted(s.data["data"]["id"] for s in fresh if s.data) == expected
            for snap in fresh:
                key, seq = parse_resume_id(snap.id)
                assert key is not None and key.epoch == epoch.epoch and seq >= 5
        assert (_snapshots(unfiltered.frames)[-1].data or {}).get("resync") is True
        # then live, in the new epoch, nothing twice
        async with StreamClient(live.url, headers=admin) as watcher:
            await _run(live, b, watcher)
        await several.wait_final(b)
        await asyncio.sleep(0.3)
    assert [u["seq"] for u in several.updates(b)] == list(range(8, 15))
    assert not one.updates()


# --- 3. error answers: requestId and the security headers --------------------------------------


def _assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    for name, value in SECURITY.items():
        assert response.headers.get(name) == value, (status, name, response.headers)
    assert response.headers.get("cache-control") == "no-store"
    body: dict[str, Any] = response.json()
    assert len(body["requestId"]) == 16 and body["error"] and body["message"]
    return body


async def test_every_error_answer_of_the_stream_path_has_a_request_id_and_security_headers(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(
        streams_per_user=1, sse_max_streams=2, resume_concurrency=1, resume_queue=0
    )
    with serve_app(settings) as live:
        ids = await live.load_demo()
        rid = ids["approved"]
        viewer, admin = auth_headers(live, "viewer"), auth_headers(live, "admin")
        async with httpx.AsyncClient(base_url=live.url, timeout=10) as http:
            # the same security headers as an error answer of the API
            api_error = await http.get("/api/registrations/999999", headers=viewer)
            assert api_error.status_code == 404
            for name, value in SECURITY.items():
                assert api_error.headers.get(name) == value
            _assert_error(await http.get(STREAM), 401)
            _assert_error(await http.get(STREAM, headers={"Authorization": "Bearer nope"}), 401)
            _assert_error(await http.get(STREAM, headers=viewer), 403)
            _assert_error(
                await http.get(STREAM, params={"registrationId": "x"}, headers=admin), 422
            )
            _assert_error(await http.post(STREAM, headers=admin), 405)
            async with open_stream(live, viewer, registration_id=str(rid)):
                _assert_error(
                    await http.get(STREAM, params={"registrationId": rid}, headers=viewer), 429
                )
                async with open_stream(live, admin):
                    other = auth_headers(live, "admin")
                    _assert_error(await http.get(STREAM, headers=other), 503)  # too many streams
            # busy: the start-up gate (1 at once, no queue) held by a start-up of the test's
            gate: StartGate = live.services.start_gate
            release: dict[str, asyncio.Event] = {}
            held = threading.Event()

            async def hold() -> None:  # on the server's loop
                release["event"] = asyncio.Event()
                async with gate.admit() as admitted:
                    assert admitted
                    held.set()
                    await asyncio.wait_for(release["event"].wait(), 30)

            holder = asyncio.ensure_future(live.call(hold()))
            try:
                await wait_until(held.is_set, what="the gate held")
                busy = _assert_error(await http.get(STREAM, headers=admin), 503)
                assert busy["retryMs"] > 0
                sse = await http.get(STREAM, headers=admin | {"Accept": "text/event-stream"})
                assert sse.status_code == 200 and sse.text.startswith("retry: ")
                assert "(request " in sse.text
                for name, value in SECURITY.items():
                    assert sse.headers.get(name) == value
            finally:
                live.call_soon(release["event"].set)
                await holder


# --- 4. a database outage on the stream path ----------------------------------------------------


def test_a_database_outage_on_the_stream_path_answers_503_json_and_logs_once(
    make_settings: SettingsFactory, forwarded: tuple[TcpForwarder, str], lines: _Lines
) -> None:
    """Before: ``text/plain`` ``Internal Server Error`` (or a "too many streams" deferral). Now as
    the API's routes: 503 JSON with ``Retry-After`` and a requestId; an EventSource gets the
    retry hint it follows; one log line for the outage."""
    forwarder, url = forwarded
    with serve_app(make_settings(database_url=url, db_statement_timeout=2.0)) as live:
        headers = auth_headers(live, "admin")
        with httpx.Client(base_url=live.url, headers=headers, timeout=15) as client:
            forwarder.cut()
            for _ in range(3):
                response = client.get(STREAM)
                body = _assert_error(response, 503)
                assert body["error"] == "UNAVAILABLE" and "database" in body["message"]
                assert 1 <= int(response.headers["retry-after"]) <= 10
                sse = client.get(STREAM, headers={"Accept": "text/event-stream"})
                assert sse.status_code == 200, sse.text
                assert sse.text.startswith("retry: ") and "database unavailable" in sse.text
            forwarder.restore()
    messages = [m for m in lines.messages() if "database unavailable" in m]
    assert len(messages) == 1, lines.messages()
    assert not [r for r in lines.records if r.exc_info or r.levelno >= logging.ERROR]
