"""A double click never runs the pipeline twice; 200 concurrent runs all finish complete."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.conftest import SettingsFactory
from tests.support import (
    REGISTRATION,
    LiveServer,
    StreamClient,
    auth_headers,
    serve_app,
    wait_until,
)


async def test_same_registration_processed_twice_at_once_runs_once(live: LiveServer) -> None:
    ids = await live.load_demo()
    rid = ids["approved"]
    async with (
        StreamClient(live.url, headers=auth_headers(live, "admin"), registration_id=rid) as sse,
        httpx.AsyncClient(base_url=live.url, headers=auth_headers(live, "admin")) as http,
    ):
        responses = await asyncio.gather(
            *(http.post(f"/api/registrations/{rid}/process") for _ in range(10))
        )
        codes = sorted(r.status_code for r in responses)
        assert codes == [202] + [409] * 9
        conflict = next(r for r in responses if r.status_code == 409).json()
        assert conflict["registration"]["id"] == rid
        await sse.wait_final(rid)
        await asyncio.sleep(0.3)
    starts = [
        u
        for u in sse.updates(rid)
        if u.get("stage") == "duplicate_check" and u["stageStatus"] == "started"
    ]
    assert len(starts) == 1
    assert len([u for u in sse.updates(rid) if u.get("final")]) == 1


async def test_200_registrations_processed_concurrently(
    make_settings: SettingsFactory, database_url: str
) -> None:
    count = 200
    with serve_app(
        make_settings(database_url=database_url, process_rate_per_minute=100_000)
    ) as live:
        async with (
            httpx.AsyncClient(
                base_url=live.url, headers=auth_headers(live, "admin"), timeout=30
            ) as http,
            StreamClient(live.url, headers=auth_headers(live, "admin")) as sse,
        ):
            ids = []
            for i in range(count):
                body = {**REGISTRATION, "customerNumber": str(200000 + i),
                        "phone": f"+2547100{i:05d}", "nationalId": f"5{i:07d}"}  # fmt: skip
                created = await http.post("/api/registrations", json=body)
                assert created.status_code == 201, created.text
                ids.append(created.json()["id"])
            results = await asyncio.gather(
                *(http.post(f"/api/registrations/{rid}/process") for rid in ids)
            )
            assert [r.status_code for r in results] == [202] * count

            def finals() -> int:
                return sum(1 for u in sse.updates() if u.get("final"))

            await wait_until(lambda: finals() >= count, timeout=90, what=f"{count} final updates")
            page = (await http.get("/api/registrations", params={"pageSize": 200})).json()
            assert page["total"] == count
            assert all(
                item["status"] == "FAILED" and not item["inProgress"] for item in page["items"]
            )
            for rid in ids[:: count // 20]:
                row = (await http.get(f"/api/registrations/{rid}")).json()
                stages = [(e["stage"], e["status"]) for e in row["processLog"] if e["stage"]]
                assert stages == [("duplicate_check", "started"), ("duplicate_check", "completed"),
                                  ("t24_lookup", "started"), ("t24_lookup", "failed"),
                                  ("status_update", "started"),
                                  ("status_update", "completed")]  # fmt: skip
                seqs = [u["seq"] for u in sse.updates(rid)]
                assert seqs == list(range(1, row["seq"] + 1))


async def test_runs_queued_longer_than_their_lease_are_not_taken_over(
    make_settings: SettingsFactory, t24_private: Any
) -> None:
    """One pipeline slot, a 1 s lease and a slow core: the later runs wait in this process's
    queue past their claim's lease. The heartbeat keeps them ours: nobody takes them over."""
    httpx.post(
        f"http://{t24_private.host}:{t24_private.port}/_sim/config", json={"latency_ms": 250}
    )
    settings = make_settings(
        t24_base_url=t24_private.base_url, pipeline_concurrency=1, lease_seconds=1.0,
        process_rate_per_minute=100_000,
    )  # fmt: skip
    with serve_app(settings) as live:
        ids = sorted((await live.load_demo()).values())
        async with (
            httpx.AsyncClient(base_url=live.url, headers=auth_headers(live, "admin")) as http,
            StreamClient(live.url, headers=auth_headers(live, "admin")) as sse,
        ):
            response = await http.post("/api/registrations/process", json={"registrationIds": ids})
            assert response.json()["accepted"] == ids
            for rid in ids:  # ~10 runs x (1-2 T24 calls x 250 ms): the last waits several leases
                await sse.wait_final(rid, timeout=60)
            for rid in ids:
                starts = [u for u in sse.updates(rid) if u.get("stage") == "duplicate_check"
                          and u["stageStatus"] == "started"]  # fmt: skip
                assert len(starts) == 1, (rid, sse.updates(rid))
                finals = [u for u in sse.updates(rid) if u.get("final")]
                assert len(finals) == 1
                seqs = [u["seq"] for u in sse.updates(rid)]
                assert seqs == list(range(1, len(seqs) + 1))
