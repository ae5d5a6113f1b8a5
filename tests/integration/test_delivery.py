"""Gap-free delivery (issue 3): resume with Last-Event-ID, snapshots for late joiners, the seam.

Each runs on both write paths (``stream_path``: taken over from uvicorn, or the portable queued
path; ``api/takeover.py``)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from regstream.core_banking.simulator.server import RunningSimulator
from tests.conftest import SettingsFactory
from tests.support import StreamClient, auth_headers, on_write_path, serve_app, wait_until


async def _slow(sim: RunningSimulator, latency_ms: float) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{sim.control_url}/config", json={"latency_ms": latency_ms})
        assert response.status_code == 200


async def _db_log(
    http: httpx.AsyncClient, rid: int
) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    row = (await http.get(f"/api/registrations/{rid}")).json()
    return row, [(e["seq"], e["stage"], e["status"]) for e in row["processLog"]]


def _view(updates: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(u["seq"], u.get("stage"), u.get("stageStatus") or u["status"]) for u in updates]


async def test_resume_after_a_cut_gets_exactly_the_missed_updates(
    make_settings: SettingsFactory, t24_private: RunningSimulator, stream_path: str
) -> None:
    await _slow(t24_private, 400)
    fast = stream_path == "transport"
    with serve_app(make_settings(t24_base_url=t24_private.base_url, stream_fast_path=fast)) as live:
        ids = await live.load_demo()
        hdr = auth_headers(live, "admin")
        rid = ids["approved"]
        async with httpx.AsyncClient(base_url=live.url, headers=hdr) as http:
            async with StreamClient(live.url, registration_id=rid, headers=hdr) as first:
                assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
                await first.wait_for(lambda fs: len(first.updates(rid)) >= 3, what="3 updates")
                seen = first.updates(rid)
                last_id = first.last_event_id()
            # cut: everything published now is missed by this client
            await asyncio.sleep(0.6)
            async with StreamClient(
                live.url, registration_id=rid, last_event_id=last_id, headers=hdr
            ) as second:
                await wait_until(lambda: on_write_path(live, stream_path), what=stream_path)
                await second.wait_final(rid)
                resumed = second.updates(rid)
                assert not any(f.type == "snapshot" for f in second.frames)
            row, log = await _db_log(http, rid)
        combined = seen + resumed
        assert [u["seq"] for u in combined] == list(
            range(1, row["seq"] + 1)
        )  # none twice, none missing
        assert _view(combined[:-1]) == log[:-1] == [e for e in log if e[1]]
        assert combined[-1]["status"] == row["status"] == "APPROVED"


async def test_resume_by_query_parameter_and_unfiltered(
    make_settings: SettingsFactory, stream_path: str
) -> None:
    with serve_app(make_settings(stream_fast_path=stream_path == "transport")) as live:
        ids = await live.load_demo()
        hdr = auth_headers(live, "admin")
        async with (
            httpx.AsyncClient(base_url=live.url, headers=hdr) as http,
            StreamClient(live.url, headers=hdr) as before,
        ):
            assert (
                await http.post(f"/api/registrations/{ids['duplicate']}/process")
            ).status_code == 202
            await before.wait_final(ids["duplicate"])
            last_id = before.last_event_id()
        async with httpx.AsyncClient(base_url=live.url, headers=hdr) as http:
            assert (
                await http.post(f"/api/registrations/{ids['approved']}/process")
            ).status_code == 202
            # a browser that gave up reconnects with ?lastEventId=
            client = httpx.AsyncClient(
                base_url=live.url, timeout=httpx.Timeout(10, read=None), headers=hdr
            )
            await asyncio.sleep(1.0)
            async with client.stream("GET", "/api/registrations/updates/stream",
                                     params={"lastEventId": last_id}) as response:  # fmt: skip
                await wait_until(lambda: on_write_path(live, stream_path), what=stream_path)
                text = ""
                async for chunk in response.aiter_text():
                    text += chunk
                    if '"final":true' in text:
                        break
            await client.aclose()
        assert f'"registrationId":{ids["duplicate"]}' not in text  # nothing before the id again
        assert text.count('"type":"update"') == 7


async def test_unknown_or_old_epoch_id_gets_a_snapshot(
    make_settings: SettingsFactory, stream_path: str
) -> None:
    with serve_app(make_settings(stream_fast_path=stream_path == "transport")) as live:
        ids = await live.load_demo()
        hdr = auth_headers(live, "admin")
        rid = ids["kyc_mismatch"]
        async with (
            httpx.AsyncClient(base_url=live.url, headers=hdr) as http,
            StreamClient(live.url, registration_id=rid, headers=hdr) as s,
        ):
            assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
            await s.wait_final(rid)
        stale = "1000000000000000_1-0"  # an epoch Redis never had (flushed / replaced)
        async with StreamClient(
            live.url, registration_id=rid, last_event_id=stale, headers=hdr
        ) as filtered:
            await filtered.wait_for(
                lambda fs: any(f.type == "snapshot" for f in fs), what="snapshot"
            )
            await wait_until(lambda: on_write_path(live, stream_path), what=stream_path)
            snap = next(f for f in filtered.frames if f.type == "snapshot")
            # a FAILED run: 4 stage updates, status_update's 2, the final
            assert snap.data is not None and snap.id is not None and snap.id.endswith("~7")
            assert snap.data["data"]["id"] == rid
            assert snap.data["data"]["status"] == "FAILED"
            assert [e["seq"] for e in snap.data["data"]["processLog"]] == [1, 2, 3, 4, 5, 6, 7]
            assert filtered.updates() == []  # never a partial replay
        async with StreamClient(live.url, last_event_id=stale, headers=hdr) as unfiltered:
            await unfiltered.wait_for(
                lambda fs: any(f.type == "snapshot" for f in fs), what="resync"
            )
            marker = next(f for f in unfiltered.frames if f.type == "snapshot")
            assert marker.data is not None and marker.data["resync"] is True


async def test_late_joiner_seam_50_times(
    make_settings: SettingsFactory, t24_private: RunningSimulator, stream_path: str
) -> None:
    """Open a filtered stream mid-run while updates keep coming: snapshot + live, no gap/dup."""
    await _slow(t24_private, 30)
    fast = stream_path == "transport"
    with serve_app(make_settings(t24_base_url=t24_private.base_url, stream_fast_path=fast)) as live:
        hdr = auth_headers(live, "admin")
        async with httpx.AsyncClient(base_url=live.url, timeout=20, headers=hdr) as http:
            rids = []
            for i in range(50):
                body = {"customerNumber": str(300000 + i), "firstName": "Late", "lastName": "Joiner",
                        "dateOfBirth": "1990-01-01", "nationalId": f"7{i:07d}",
                        "phone": f"+2547200{i:05d}"}  # fmt: skip
                rids.append((await http.post("/api/registrations", json=body)).json()["id"])
            snapshots = 0
            for i, rid in enumerate(rids):
                assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
                await asyncio.sleep((i % 5) * 0.004)  # join at different points of the run
                async with StreamClient(live.url, registration_id=rid, headers=hdr) as sse:

                    def ended(frames: list[Any]) -> bool:
                        return any(
                            (f.type == "update" and f.update.get("final"))
                            or (f.type == "snapshot" and not f.data["data"]["inProgress"])
                            for f in frames
                        )

                    await sse.wait_for(ended, what=f"end of run {rid}")
                    if i % 10 == 0:
                        await wait_until(lambda: on_write_path(live, stream_path), what=stream_path)
                    state: list[int] = []
                    for frame in sse.frames:
                        if frame.type == "snapshot":
                            assert frame.data is not None
                            snapshots += 1
                            state = [e["seq"] for e in frame.data["data"]["processLog"]]
                            assert state == list(range(1, len(state) + 1))
                        elif frame.type == "update":
                            state.append(frame.update["seq"])
                    row, _ = await _db_log(http, rid)
                    assert state == list(range(1, row["seq"] + 1)), (rid, state)
            assert snapshots >= 10  # most joins really were mid-run
