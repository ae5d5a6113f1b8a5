"""Redis stopped and restarted under an open stream (a private server per test)."""

from __future__ import annotations

import asyncio

import httpx

from regstream.realtime.embedded import EmbeddedRedis
from tests.support import LiveServer, StreamClient, auth_headers, wait_until


async def _restart(redis_server: EmbeddedRedis, down_for: float) -> None:
    redis_server.kill()
    await asyncio.sleep(down_for)
    redis_server.start()


async def test_stream_survives_redis_restart(live: LiveServer, redis_server: EmbeddedRedis) -> None:
    ids = await live.load_demo()
    broker = live.services.bus.brokers[0]
    async with (
        StreamClient(live.url, headers=auth_headers(live, "admin")) as sse,
        httpx.AsyncClient(base_url=live.url, headers=auth_headers(live, "admin")) as http,
    ):
        before = ids["duplicate"]
        assert (await http.post(f"/api/registrations/{before}/process")).status_code == 202
        await sse.wait_final(before)
        await _restart(redis_server, 0.5)
        ready = await http.get("/readyz")
        await wait_until(lambda: broker.connected.is_set(), timeout=15, what="re-subscription")
        rid = ids["approved"]
        assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
        final = await sse.wait_final(rid)
        assert final["status"] == "APPROVED"
        assert [u["seq"] for u in sse.updates(rid)] == [1, 2, 3, 4, 5, 6, 7]
        # the server told the open stream to re-sync (history was lost with the old server)
        assert any(f.type == "snapshot" and f.data and f.data.get("resync") for f in sse.frames)
        assert ready.status_code in (200, 503)
        assert (await http.get("/readyz")).status_code == 200


async def test_updates_made_while_redis_is_down_arrive_in_order(
    live: LiveServer, redis_server: EmbeddedRedis
) -> None:
    ids = await live.load_demo()
    broker = live.services.bus.brokers[0]
    async with (
        StreamClient(live.url, headers=auth_headers(live, "admin")) as sse,
        httpx.AsyncClient(base_url=live.url, headers=auth_headers(live, "admin")) as http,
    ):
        redis_server.kill()
        await wait_until(
            lambda: not broker.connected.is_set(), timeout=10, what="subscription lost"
        )
        down = await http.get("/readyz")
        assert down.status_code == 503
        assert down.json()["checks"]["redis"].startswith("down")
        rids = [ids["approved"], ids["duplicate"], ids["kyc_mismatch"]]
        for rid in rids:
            assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202

        async def all_terminal() -> bool:
            rows = [(await http.get(f"/api/registrations/{rid}")).json() for rid in rids]
            return all(not r["inProgress"] for r in rows)

        # the database is the source of truth: processing finishes without Redis
        await wait_until(all_terminal, timeout=20, what="runs to finish while Redis is down")
        assert live.services.publisher.pending > 0
        redis_server.start()
        for rid in rids:
            await sse.wait_final(rid, timeout=20)
        for rid in rids:
            seqs = [u["seq"] for u in sse.updates(rid)]
            assert seqs == list(range(1, len(seqs) + 1)), (rid, seqs)
            row = (await http.get(f"/api/registrations/{rid}")).json()
            assert seqs[-1] == row["seq"]
        assert live.services.publisher.pending == 0
