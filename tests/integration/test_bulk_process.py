"""Bulk validation (``POST /api/registrations/process``): one request starts many runs, each
runs exactly as if clicked alone, a second request conflicts, refusals are clear."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from sqlalchemy import select

from regstream.core_banking.simulator.dataset import load_applicant
from regstream.core_banking.simulator.server import RunningSimulator
from regstream.db import users
from regstream.db.tables import RegistrationRequest
from regstream.realtime.connections import create_client
from regstream.realtime.embedded import EmbeddedRedis
from tests.conftest import SettingsFactory
from tests.support import (
    TEST_SECRET_KEY,
    LiveServer,
    SseReader,
    StreamClient,
    auth_headers,
    metric_value,
    serve_app,
    wait_until,
)

BULK = "/api/registrations/process"


async def _register_load_people(http: httpx.AsyncClient, first: int, count: int) -> list[int]:
    """Registrations of load customers ``first`` … ``first + count - 1``; their ids."""
    ids = []
    for n in range(first, first + count):
        created = await http.post("/api/registrations", json=load_applicant(n))
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    return ids


@contextlib.asynccontextmanager
async def _clients(live: LiveServer) -> AsyncIterator[tuple[SseReader, httpx.AsyncClient]]:
    """The admin's update stream and an operator's API client on ``live``."""
    operator = auth_headers(live, "operator")
    async with (
        StreamClient(live.url, headers=auth_headers(live, "admin")) as sse,
        httpx.AsyncClient(base_url=live.url, headers=operator, timeout=30) as http,
    ):
        yield sse, http


async def _bulk_accepted(http: httpx.AsyncClient, ids: list[int]) -> None:
    response = await http.post(BULK, json={"registrationIds": ids})
    assert response.json()["accepted"] == sorted(ids)


async def _all_approved(sse: SseReader, ids: list[int]) -> None:
    """Every run's final APPROVED on the stream, after its 7 updates numbered 1..7."""
    for rid in ids:
        final = await sse.wait_final(rid, timeout=60)
        assert final["status"] == "APPROVED"
        assert [u["seq"] for u in sse.updates(rid)] == list(range(1, 8))


async def test_bulk_starts_every_demo_registration_once(
    make_settings: SettingsFactory, database_url: str
) -> None:
    with serve_app(make_settings(database_url=database_url)) as live:
        from regstream.demo import load_demo

        rows = await live.call(load_demo(live.services.sessions, TEST_SECRET_KEY.encode()))
        expected = {row.registration_id: row.expected_status for row in rows}
        ids = sorted(expected)
        operator = auth_headers(live, "operator")
        async with (
            StreamClient(live.url, headers=auth_headers(live, "admin")) as sse,
            httpx.AsyncClient(base_url=live.url, headers=operator) as http,
        ):
            asked = [*ids, ids[0], 999_999]  # a repeat and an unknown id
            response = await http.post(BULK, json={"registrationIds": asked})
            assert response.status_code == 200, response.text
            assert response.json() == {"accepted": ids, "conflicts": [], "notFound": [999_999]}

            for rid in ids:
                final = await sse.wait_final(rid, timeout=30)
                assert final["status"] == expected[rid], (rid, final)
                updates = sse.updates(rid)
                assert [u["seq"] for u in updates] == list(range(1, len(updates) + 1))
                starts = [u for u in updates if u.get("stage") == "duplicate_check"
                          and u["stageStatus"] == "started"]  # fmt: skip
                assert len(starts) == 1
                row = (await http.get(f"/api/registrations/{rid}")).json()
                assert (row["status"], row["inProgress"]) == (expected[rid], False)

            # again, all ended: FAILED ones may be validated again, the others conflict
            again = (await http.post(BULK, json={"registrationIds": ids})).json()
            failed = sorted(rid for rid in ids if expected[rid] == "FAILED")
            assert failed and again["accepted"] == failed and again["notFound"] == []
            conflicts = {c["registrationId"]: c for c in again["conflicts"]}
            assert sorted(conflicts) == sorted(set(ids) - set(failed))
            for rid, conflict in conflicts.items():
                assert (conflict["status"], conflict["inProgress"]) == (expected[rid], False)
                assert f"already {expected[rid]}" in conflict["message"]

            def finals(rid: int) -> int:
                return len([u for u in sse.updates(rid) if u.get("final")])

            await wait_until(lambda: all(finals(rid) == 2 for rid in failed), timeout=30,
                             what="the re-validated runs' final updates")  # fmt: skip

            admin = auth_headers(live, "admin")
            audit = (
                await http.get(
                    "/api/audit", params={"pageSize": 200, "action": "registration.process"},
                    headers=admin,
                )
            ).json()  # fmt: skip
            targets = sorted(e["target"] for e in audit["items"])
            assert targets == sorted(f"registration:{rid}" for rid in [*ids, *failed])


async def test_bulk_of_many_people_approves_each_one(
    make_settings: SettingsFactory, database_url: str
) -> None:
    """40 runs at once (their steps commit in groups): each one APPROVED, each person enrolled
    once, each run's log complete and numbered, as when validated alone."""
    with serve_app(make_settings(database_url=database_url)) as live:
        async with _clients(live) as (sse, http):
            ids = await _register_load_people(http, 9000, 40)
            await _bulk_accepted(http, ids)
            for rid in ids:
                final = await sse.wait_final(rid, timeout=60)
                assert (final["status"], final["details"]) == ("APPROVED", {"accountsFound": 2})
                updates = sse.updates(rid)
                assert [u["seq"] for u in updates] == list(range(1, 8))
                assert len(final["processLog"]) == 6
            statuses = {
                (await http.get(f"/api/registrations/{rid}")).json()["status"] for rid in ids
            }
            assert statuses == {"APPROVED"}

            async def enrolled() -> int:
                async with live.services.sessions() as session:
                    return await users.count(session)

            assert await live.call(enrolled()) == 40
            again = (await http.post(BULK, json={"registrationIds": ids})).json()
            assert again["accepted"] == [] and len(again["conflicts"]) == 40


async def test_bulk_refusals_are_clear(live: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live.url, headers=auth_headers(live, "operator")) as h:
        body: object
        for body in ({"registrationIds": []}, {"registrationIds": [0]},
                     {"registrationIds": list(range(1, 502))}, {"ids": [1]}, [1, 2]):  # fmt: skip
            response = await h.post(BULK, json=body)
            assert response.status_code == 422, (body, response.text)
            assert "Traceback" not in response.text
        viewer = auth_headers(live, "viewer")
        assert (
            await h.post(BULK, json={"registrationIds": [1]}, headers=viewer)
        ).status_code == 403


async def test_bulk_counts_each_id_against_the_rate_limit(make_settings: SettingsFactory) -> None:
    with serve_app(make_settings(process_rate_per_minute=5)) as live:
        ids = sorted((await live.load_demo()).values())[:6]
        async with httpx.AsyncClient(
            base_url=live.url, headers=auth_headers(live, "operator")
        ) as http:
            too_many = await http.post(BULK, json={"registrationIds": ids})
            assert too_many.status_code == 429
            assert "5 validations a minute" in too_many.json()["message"]
            ok = await http.post(BULK, json={"registrationIds": ids[:4]})
            assert ok.status_code == 200 and ok.json()["accepted"] == ids[:4]
            refused = await http.post(BULK, json={"registrationIds": ids[4:6]})
            assert refused.status_code == 429  # 1 token left, 2 asked
            assert int(refused.headers["Retry-After"]) >= 1
            assert (await http.post(f"/api/registrations/{ids[4]}/process")).status_code == 202


async def test_bulk_waits_for_a_slow_redis_instead_of_dropping_updates(
    make_settings: SettingsFactory, redis_server: EmbeddedRedis
) -> None:
    """Redis healthy but its writes paused while 40 runs go: the runner holds new runs while
    the publisher's outbox is half full, so every update is delivered live, in order, and none
    is dropped (no resync); without the hold, 280 updates overflow 64. (Claiming the runs does
    not touch Redis, but the fleet-wide process rate does: it waits for a paused Redis at most
    ``LimitStore.timeout``, 2 s, then counts per process; the 3 s pause outlasts it.)"""
    with serve_app(make_settings(outbox_max=64, pipeline_concurrency=4)) as live:
        redis = create_client(redis_server.url, name="test-admin")
        overflows = metric_value("regstream_publish_outbox_overflows_total")
        holds = metric_value("regstream_publish_holds_total")
        try:
            async with _clients(live) as (sse, http):
                ids = await _register_load_people(http, 9200, 40)
                await redis.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
                await _bulk_accepted(http, ids)
                await _all_approved(sse, ids)
                assert not any(f.type == "snapshot" for f in sse.frames)
        finally:
            await redis.aclose()
        assert metric_value("regstream_publish_outbox_overflows_total") == overflows
        assert metric_value("regstream_publish_holds_total") > holds  # the hold did engage


async def test_a_busy_runner_holds_a_batch_waiting_for_its_slots(
    make_settings: SettingsFactory, database_url: str, t24_private: RunningSimulator
) -> None:
    """The refill rule (pipeline/runner.py): with every pipeline slot busy the runner also holds
    one batch of runs waiting for a slot (4 slots: 8 held, at most 4 of them under way), so a
    freed slot starts a held run at once instead of waiting for a take. T24 made slow (300 ms a
    call) so that the runs stay under way while the test looks. Every run still ends once."""
    async with httpx.AsyncClient() as control:
        configured = await control.post(
            f"{t24_private.control_url}/config", json={"latency_ms": 300}
        )
        configured.raise_for_status()
    settings = make_settings(
        database_url=database_url, pipeline_concurrency=4, t24_base_url=t24_private.base_url
    )
    with serve_app(settings) as live:
        async with _clients(live) as (sse, http):
            ids = await _register_load_people(http, 9300, 24)
            await _bulk_accepted(http, ids)
            seen: list[tuple[int, int]] = []  # (held, under way) at each look

            async def held() -> tuple[int, int]:
                async with live.services.sessions() as session:
                    rows = (await session.execute(
                        select(RegistrationRequest.current_stage).where(
                            RegistrationRequest.in_progress.is_(True),
                            RegistrationRequest.instance_id.is_not(None),
                        )
                    )).all()  # fmt: skip
                return len(rows), sum(1 for (stage,) in rows if stage is not None)

            async def full() -> bool:
                seen.append(await live.call(held()))
                return seen[-1][0] == 8

            await wait_until(full, timeout=30, interval=0.02, what="8 runs held")
            # A click now is held at once (room for clicks: one batch beyond the takes'), so it
            # waits behind one held batch, not behind the 16 bulk runs still queued (taken
            # oldest first). Under the old rule (held only below 4 runs) it was queued.
            (clicked,) = await _register_load_people(http, 9400, 1)
            assert (await http.post(f"/api/registrations/{clicked}/process")).status_code == 202

            async def holder() -> str | None:
                async with live.services.sessions() as session:
                    row = await session.get(RegistrationRequest, clicked)
                    return None if row is None else row.instance_id

            assert await live.call(holder()) is not None  # held by this instance, not queued
            await _all_approved(sse, [*ids, clicked])
        assert max(held for held, _ in seen) == 8  # never more than 4 slots + a batch of 4
        assert max(under_way for _, under_way in seen) <= 4, seen  # the slots bound the runs
