"""The SSE endpoint and the Redis channel: headers, filters, raw subscribers, pings, clean-up.

The tests that write frames run on both write paths (``stream_path``: taken over from uvicorn,
or the portable queued path; ``api/takeover.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from tests.conftest import SettingsFactory
from tests.support import (
    LiveServer,
    StreamClient,
    auth_headers,
    on_write_path,
    serve_app,
    wait_until,
)

STREAM = "/api/registrations/updates/stream"


@pytest.fixture
def live_on_path(make_settings: SettingsFactory, stream_path: str) -> Iterator[LiveServer]:
    """The whole service with its streams on ``stream_path``."""
    with serve_app(make_settings(stream_fast_path=stream_path == "transport")) as server:
        yield server


async def test_stream_headers_and_first_frame(live_on_path: LiveServer, stream_path: str) -> None:
    live = live_on_path
    async with httpx.AsyncClient(
        base_url=live.url, headers=auth_headers(live, "admin"), timeout=httpx.Timeout(5, read=5)
    ) as http:
        async with http.stream("GET", STREAM) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            assert "content-encoding" not in response.headers
            await wait_until(lambda: on_write_path(live, stream_path), what=stream_path)
            first = b""
            async for chunk in response.aiter_bytes():
                first += chunk
                if b"\n\n" in first:
                    break
    block = first.split(b"\n\n")[0].decode()
    lines = block.split("\n")
    assert lines[0] == "retry: 5000"
    frame = orjson.loads(lines[1].removeprefix("data: "))
    assert frame["type"] == "connected" and isinstance(frame["timestamp"], int)


@pytest.mark.parametrize(
    "value", ["abc", "-1", "0", "1.5", "9" * 40, str(2**53 + 1), "²", "1,²"], ids=lambda v: v[:12]
)
async def test_stream_rejects_bad_registration_id(live: LiveServer, value: str) -> None:
    async with httpx.AsyncClient(base_url=live.url, headers=auth_headers(live, "admin")) as http:
        response = await http.get(STREAM, params={"registrationId": value})
    assert response.status_code == 422
    assert response.json()["error"] == "VALIDATION_ERROR"


async def test_filtered_stream_gets_only_its_registration(
    live_on_path: LiveServer, stream_path: str
) -> None:
    live = live_on_path
    ids = await live.load_demo()
    a, b = ids["approved"], ids["kyc_mismatch"]
    async with (
        StreamClient(live.url, headers=auth_headers(live, "admin"), registration_id=a) as only_a,
        StreamClient(live.url, headers=auth_headers(live, "admin")) as everything,
        httpx.AsyncClient(base_url=live.url, headers=auth_headers(live, "admin")) as http,
    ):
        await wait_until(lambda: on_write_path(live, stream_path), what=stream_path)
        assert len(live.services.hub) == 2
        for rid in (a, b):
            assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
        await everything.wait_final(a)
        await everything.wait_final(b)
        await only_a.wait_final(a)
        await asyncio.sleep(0.2)  # anything misrouted would have arrived by now
        assert {u["registrationId"] for u in only_a.updates()} == {a}
        assert {u["registrationId"] for u in everything.updates()} == {a, b}
        assert len(only_a.updates()) == len(everything.updates(a)) == 7
        assert len(everything.updates(b)) == 7  # FAILED: status_update before the final too


async def test_raw_redis_subscriber_sees_every_message(live: LiveServer) -> None:
    ids = await live.load_demo()
    rid = ids["approved"]
    redis = Redis.from_url(str(live.settings.effective_redis_url))
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("service:registration-updates")
    try:
        async with httpx.AsyncClient(
            base_url=live.url, headers=auth_headers(live, "admin")
        ) as http:
            assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
        received: list[dict[str, Any]] = []

        async def collect() -> bool:
            message = await pubsub.get_message(timeout=0.2)
            if message is not None:
                received.append(orjson.loads(message["data"]))
            return any(m.get("final") for m in received)

        await wait_until(collect, timeout=15, what="final message on the channel")
    finally:
        await pubsub.aclose()
        await redis.aclose()
    assert [m["seq"] for m in received] == [1, 2, 3, 4, 5, 6, 7]
    for message in received:
        assert message["registrationId"] == rid
        assert isinstance(message["timestamp"], int)
        assert isinstance(message["eventId"], str)
        assert "status" in message and "message" in message
    assert [m.get("stage") for m in received] == [
        "duplicate_check", "duplicate_check", "t24_lookup", "t24_lookup",
        "status_update", "status_update", None,
    ]  # fmt: skip
    assert received[-1]["status"] == "APPROVED"
    assert received[-1]["details"] == {"accountsFound": 2}
    assert len(received[-1]["processLog"]) == 6


async def test_pings_arrive_and_carry_no_id(
    make_settings: SettingsFactory, stream_path: str
) -> None:
    settings = make_settings(sse_ping_interval=0.3, stream_fast_path=stream_path == "transport")
    with serve_app(settings) as live:
        async with StreamClient(live.url, headers=auth_headers(live, "admin")) as sse:
            await wait_until(lambda: on_write_path(live, stream_path), what=stream_path)
            await sse.wait_for(
                lambda fs: sum(f.type == "ping" for f in fs) >= 2, 10, what="2 pings"
            )
            pings = [f for f in sse.frames if f.type == "ping"]
            assert all(f.id is None for f in pings)
            assert all(isinstance(f.data["timestamp"], int) for f in pings if f.data)


async def test_disconnect_frees_the_stream(live_on_path: LiveServer, stream_path: str) -> None:
    live = live_on_path
    hub = live.services.hub
    async with (
        StreamClient(live.url, headers=auth_headers(live, "admin"), registration_id=7),
        StreamClient(live.url, headers=auth_headers(live, "admin")),
    ):
        await wait_until(lambda: len(hub) == 2, what="two streams attached")
        await wait_until(lambda: on_write_path(live, stream_path), what=stream_path)
    await wait_until(lambda: len(hub) == 0, what="streams detached after disconnect")
    assert hub._by_rid == {} and hub._all == set()


async def test_stream_following_several_registrations(live: LiveServer) -> None:
    """A list page follows its rows with one stream (viewer role: no unfiltered stream needed)."""
    from tests.support import auth_headers

    ids = await live.load_demo()
    a, b, c = ids["approved"], ids["kyc_mismatch"], ids["duplicate"]
    viewer = auth_headers(live, "viewer")
    operator = auth_headers(live, "operator")
    async with httpx.AsyncClient(base_url=live.url, headers=viewer) as http:
        response = await http.get(STREAM, params={"registrationId": f"{a},{b},x"})
        assert response.status_code == 422
        too_many = ",".join(str(i) for i in range(1, 202))
        assert (await http.get(STREAM, params={"registrationId": too_many})).status_code == 422
    async with (
        httpx.AsyncClient(
            base_url=live.url, headers=viewer, timeout=httpx.Timeout(10, read=None)
        ) as http,
        httpx.AsyncClient(base_url=live.url, headers=operator) as ops,
    ):
        async with http.stream("GET", STREAM, params={"registrationId": f"{a},{b}"}) as response:
            assert response.status_code == 200
            await wait_until(lambda: len(live.services.hub) == 1, what="one stream attached")
            for rid in (a, b, c):
                assert (await ops.post(f"/api/registrations/{rid}/process")).status_code == 202
            text = ""
            async for chunk in response.aiter_text():
                text += chunk
                if text.count('"final":true') == 2:
                    break
    frames = [orjson.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]
    updates = [f["data"] for f in frames if f["type"] == "update"]
    assert {u["registrationId"] for u in updates} == {a, b}
    for rid in (a, b):
        assert [u["seq"] for u in updates if u["registrationId"] == rid] == list(
            range(1, len([u for u in updates if u["registrationId"] == rid]) + 1)
        )
    await wait_until(lambda: len(live.services.hub) == 0, what="stream detached")
    assert live.services.hub._by_rid == {}


async def test_portable_stream_mode_on_another_http_protocol(make_settings: Any) -> None:
    """With uvicorn's h11 protocol there is no transport to hand over: the queued mode serves."""
    from tests.support import auth_headers, serve_app

    with serve_app(make_settings(), http="h11") as live:
        ids = await live.load_demo()
        headers = auth_headers(live, "admin")
        rid = ids["approved"]
        async with StreamClient(live.url, registration_id=rid, headers=headers) as sse:
            from regstream.realtime.hub import QueuedStream

            await wait_until(lambda: len(live.services.hub) == 1, what="stream attached")
            assert all(isinstance(s, QueuedStream) for s in live.services.hub.streams())
            async with httpx.AsyncClient(base_url=live.url, headers=headers) as http:
                assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
            final = await sse.wait_final(rid)
            assert final["status"] == "APPROVED"
            assert [u["seq"] for u in sse.updates(rid)] == list(range(1, 8))
        await wait_until(lambda: len(live.services.hub) == 0, what="queued stream detached")
