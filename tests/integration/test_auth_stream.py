"""The stream path's access rules: 401/403, tickets, per-user cap, revoked/expired credentials."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from regstream.db import accounts
from tests.conftest import SettingsFactory
from tests.support import (
    REGISTRATION,
    LiveServer,
    StreamClient,
    auth_headers,
    create_user,
    run_in_db,
    serve_app,
    wait_until,
)

PING = 2.0
PASSWORD = "correct horse battery staple"


@pytest.fixture
def live_fast(make_settings: SettingsFactory) -> Any:
    with serve_app(make_settings(sse_ping_interval=PING, streams_per_user=2)) as server:
        yield server


async def _registration(live: LiveServer) -> int:
    async with httpx.AsyncClient(base_url=live.url, headers=auth_headers(live)) as client:
        response = await client.post("/api/registrations", json=REGISTRATION)
        return int(response.json()["id"])


async def test_stream_without_credentials_is_401(live: LiveServer) -> None:
    async with StreamClient(live.url, registration_id=1, wait_connected=False) as sse:
        assert sse.response.status_code == 401
        await sse.response.aread()
        assert sse.response.json()["error"] == "UNAUTHENTICATED"
        assert sse.response.headers["www-authenticate"].startswith("Bearer")


async def test_viewer_filtered_stream_works(live: LiveServer) -> None:
    rid = await _registration(live)
    viewer = auth_headers(live, "viewer")
    async with StreamClient(live.url, registration_id=rid, headers=viewer) as sse:
        assert sse.response.status_code == 200
        async with httpx.AsyncClient(base_url=live.url, headers=auth_headers(live)) as client:
            assert (await client.post(f"/api/registrations/{rid}/process")).status_code == 202
        final = await sse.wait_final(rid)
        assert final["registrationId"] == rid


@pytest.mark.parametrize("role", ["viewer", "operator"])
async def test_unfiltered_stream_is_403_below_admin(live: LiveServer, role: str) -> None:
    async with StreamClient(
        live.url, headers=auth_headers(live, role), wait_connected=False
    ) as sse:
        assert sse.response.status_code == 403


async def test_admin_unfiltered_stream_works(live: LiveServer) -> None:
    async with StreamClient(live.url, headers=auth_headers(live, "admin")) as sse:
        assert sse.response.status_code == 200


async def test_stream_with_session_cookie(live: LiveServer) -> None:
    user = create_user(live, "viewer", password=PASSWORD, token=False)
    async with httpx.AsyncClient(base_url=live.url) as browser:
        await browser.post(
            "/api/auth/login", json={"username": user.username, "password": PASSWORD}
        )
        cookie = f"regstream_session={browser.cookies['regstream_session']}"
    async with StreamClient(live.url, registration_id=1, headers={"Cookie": cookie}) as sse:
        assert sse.response.status_code == 200


async def _ticket(live: LiveServer, headers: dict[str, str], rid: int | None) -> str:
    async with httpx.AsyncClient(base_url=live.url, headers=headers) as client:
        response = await client.post(
            "/api/auth/stream-ticket", json={} if rid is None else {"registrationId": rid}
        )
        assert response.status_code == 201, response.text
        assert response.json()["ticket"].startswith("rstk_")
        return str(response.json()["streamUrl"])


async def test_stream_ticket_is_single_use_and_single_purpose(live: LiveServer) -> None:
    viewer = auth_headers(live, "viewer")
    url = await _ticket(live, viewer, 7)
    ticket = url.split("ticket=", 1)[1].split("&", 1)[0]
    async with httpx.AsyncClient(base_url=live.url, timeout=httpx.Timeout(5, read=None)) as c:
        async with c.stream("GET", url) as first:
            assert first.status_code == 200
        async with c.stream("GET", url) as again:
            assert again.status_code == 401  # used
        # not an API credential anywhere else
        api = await c.get("/api/registrations", headers={"Authorization": f"Bearer {ticket}"})
        assert api.status_code == 401
        other = await _ticket(live, viewer, 7)
        async with c.stream("GET", other.replace("registrationId=7", "registrationId=8")) as s:
            assert s.status_code == 403  # minted for registration 7
        unfiltered = await c.post("/api/auth/stream-ticket", json={}, headers=viewer)
        assert unfiltered.status_code == 403


async def test_expired_stream_ticket_is_401(make_settings: SettingsFactory) -> None:
    with serve_app(make_settings(stream_ticket_ttl=0.5)) as live:
        url = await _ticket(live, auth_headers(live, "viewer"), 3)
        time.sleep(1.0)
        async with httpx.AsyncClient(base_url=live.url) as c:
            async with c.stream("GET", url) as s:
                assert s.status_code == 401


async def test_per_user_stream_cap_is_429(live_fast: LiveServer) -> None:
    headers = auth_headers(live_fast, "viewer")
    async with StreamClient(live_fast.url, registration_id=1, headers=headers):
        async with StreamClient(live_fast.url, registration_id=2, headers=headers):
            async with StreamClient(
                live_fast.url, registration_id=3, headers=headers, wait_connected=False
            ) as third:
                assert third.response.status_code == 429
                assert third.response.headers["retry-after"] == "5"
            other_user = auth_headers(live_fast, "viewer")
            async with StreamClient(live_fast.url, registration_id=3, headers=other_user) as ok:
                assert ok.response.status_code == 200
    # closed streams free their slots
    async with StreamClient(live_fast.url, registration_id=4, headers=headers) as again:
        assert again.response.status_code == 200


async def test_total_stream_cap_is_503(make_settings: SettingsFactory) -> None:
    with serve_app(make_settings(sse_max_streams=1)) as live:
        headers = auth_headers(live, "viewer")
        async with StreamClient(live.url, registration_id=1, headers=headers):
            async with StreamClient(
                live.url, registration_id=2, headers=headers, wait_connected=False
            ) as second:
                assert second.response.status_code == 503
                assert second.response.headers["retry-after"] == "5"


def _auth_frames(sse: Any) -> list[dict[str, Any]]:
    return [f.data for f in sse.frames if f.type == "auth"]


async def test_revoked_token_stream_is_closed_within_the_ping_interval(
    live_fast: LiveServer,
) -> None:
    user = create_user(live_fast, "viewer")

    async def revoke(session: Any) -> None:
        # as `regstream users disable` does it: straight in the database, another process
        operator = await accounts.get_by_username(session, username=user.username)
        assert operator is not None
        await accounts.revoke_all(session, operator_id=operator.id, now_ms=int(time.time() * 1000))

    async with StreamClient(live_fast.url, registration_id=1, headers=user.headers) as sse:
        run_in_db(live_fast, revoke)
        started = time.monotonic()
        await sse.wait_for(lambda fs: any(f.type == "auth" for f in fs), PING + 1.0, "auth frame")
        await sse.wait_for(lambda fs: sse.closed, 2.0, "stream closed")
        assert time.monotonic() - started <= PING + 1.0
        assert _auth_frames(sse)[0]["reason"] == "revoked"
        assert sse.frames[-1].type == "auth"


async def test_token_revoked_through_the_api_closes_its_stream_at_once(
    live_fast: LiveServer,
) -> None:
    admin = auth_headers(live_fast, "admin")
    async with httpx.AsyncClient(base_url=live_fast.url, headers=admin) as client:
        await client.post("/api/users", json={"username": "watcher", "role": "viewer"})
        created = (await client.post("/api/users/watcher/tokens", json={})).json()
        headers = {"Authorization": f"Bearer {created['token']}"}
        async with StreamClient(live_fast.url, registration_id=1, headers=headers) as sse:
            await client.delete(f"/api/users/watcher/tokens/{created['id']}")
            await sse.wait_for(lambda fs: any(f.type == "auth" for f in fs), 1.0, "auth frame")
            await sse.wait_for(lambda fs: sse.closed, 2.0, "stream closed")


async def test_expired_sign_in_stream_is_closed_with_an_auth_frame(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(sse_ping_interval=PING, session_lifetime=2.0)
    with serve_app(settings) as live:
        user = create_user(live, "viewer", password=PASSWORD, token=False)
        async with httpx.AsyncClient(base_url=live.url) as browser:
            response = await browser.post(
                "/api/auth/login", json={"username": user.username, "password": PASSWORD}
            )
            assert response.status_code == 200
            cookie = f"regstream_session={browser.cookies['regstream_session']}"
        async with StreamClient(live.url, registration_id=1, headers={"Cookie": cookie}) as sse:
            await sse.wait_for(lambda fs: any(f.type == "auth" for f in fs), 2.0 + PING + 1.0)
            assert _auth_frames(sse)[0]["reason"] == "expired"
            await sse.wait_for(lambda fs: sse.closed, 2.0, "stream closed")


async def test_demoted_admin_loses_the_unfiltered_stream(live_fast: LiveServer) -> None:
    admin = auth_headers(live_fast, "admin")
    target = create_user(live_fast, "admin")
    async with StreamClient(live_fast.url, headers=target.headers) as sse:
        async with httpx.AsyncClient(base_url=live_fast.url, headers=admin) as client:
            response = await client.patch(f"/api/users/{target.username}", json={"role": "viewer"})
            assert response.status_code == 200
        await sse.wait_for(lambda fs: any(f.type == "auth" for f in fs), PING + 1.0, "auth frame")
        assert _auth_frames(sse)[0]["reason"] == "forbidden"


async def test_a_settled_stream_gets_nothing_after_it_is_closed(live_fast: LiveServer) -> None:
    """The hub writes to a settled unfiltered stream without its per-write checks (direct):
    the credentials check of the shared timer must still reach it, close it with its auth frame,
    and no update may follow. (That no byte goes out after a close, on the socket itself, is
    ``tests/unit/test_hub.py``'s job: this client stops reading at the stream's end.)"""
    admin = auth_headers(live_fast, "admin")
    target = create_user(live_fast, "admin")
    hub = live_fast.services.hub

    async def publish(seq: int) -> None:
        await live_fast.call(live_fast.services.publisher.publish_update(
            {"registrationId": 5, "status": "PENDING", "timestamp": 0, "seq": seq,
             "message": "m", "stage": "duplicate_check"}
        ))  # fmt: skip

    async with StreamClient(live_fast.url, headers=target.headers) as sse:
        await publish(1)
        await sse.wait_for(lambda fs: len(sse.updates()) == 1, 5.0, "first update")
        await wait_until(lambda: len(hub._direct) == 1, timeout=5, what="stream direct")  # noqa: SLF001
        async with httpx.AsyncClient(base_url=live_fast.url, headers=admin) as client:
            response = await client.patch(f"/api/users/{target.username}", json={"role": "viewer"})
            assert response.status_code == 200
        await sse.wait_for(lambda fs: any(f.type == "auth" for f in fs), PING + 1.0, "auth frame")
        for seq in range(2, 12):
            await publish(seq)
        await sse.wait_for(lambda fs: sse.closed, 2.0, "stream closed")
        assert [u["seq"] for u in sse.updates()] == [1]
        assert sse.frames[-1].type == "auth"
    await wait_until(lambda: len(hub) == 0, what="stream detached")


async def test_refused_streams_are_audited(live: LiveServer) -> None:
    viewer = create_user(live, "viewer")
    async with StreamClient(live.url, headers=viewer.headers, wait_connected=False) as sse:
        assert sse.response.status_code == 403
    async with httpx.AsyncClient(base_url=live.url, headers=auth_headers(live, "admin")) as c:
        items = (await c.get("/api/audit", params={"actor": viewer.username})).json()["items"]
    assert [(i["action"], i["outcome"]) for i in items] == [("access.refused", "refused")]
    assert items[0]["target"] == "GET /api/registrations/updates/stream"
