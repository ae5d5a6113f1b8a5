"""T24 failures end in FAILED with a clear message, published after a ``status_update`` like
every final; nothing is left half-written."""

from __future__ import annotations

import httpx
import pytest

from tests.support import REGISTRATION, LiveServer, StreamClient, auth_headers


@pytest.mark.parametrize(
    ("cif", "code", "retryable", "message"),
    [
        pytest.param("100700", "CORE_TIMEOUT", True, "Core banking did not answer in time", id="timeout"),
        pytest.param("100800", "CORE_UNAVAILABLE", True, "Core banking is unavailable", id="500"),
        pytest.param("100810", "CORE_UNAVAILABLE", True, "Core banking is unavailable", id="502"),
        pytest.param("100900", "CORE_AUTH_ERROR", False, "Core banking refused our credentials", id="401"),
        pytest.param("100920", "CORE_REQUEST_ERROR", False, "Core banking rejected the request", id="400"),
        pytest.param("100930", "CORE_BAD_RESPONSE", False, "Core banking sent an unreadable response",
                     id="garbage"),
        pytest.param("100999", "CUSTOMER_NOT_FOUND", False, "Customer not found in core banking",
                     id="not-found"),
    ],
)  # fmt: skip
async def test_core_failures_end_failed(
    live: LiveServer, cif: str, code: str, retryable: bool, message: str
) -> None:
    async with httpx.AsyncClient(
        base_url=live.url, headers=auth_headers(live, "admin"), timeout=20
    ) as http:
        created = await http.post(
            "/api/registrations", json={**REGISTRATION, "customerNumber": cif}
        )
        assert created.status_code == 201, created.text
        rid = created.json()["id"]
        async with StreamClient(
            live.url, headers=auth_headers(live, "admin"), registration_id=rid
        ) as sse:
            assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
            final = await sse.wait_final(rid, timeout=20)
        assert final["status"] == "FAILED"
        assert final["message"] == message
        assert final["details"] == {"error": code, "retryable": retryable}
        stages = [(u["stage"], u["stageStatus"], u["message"]) for u in sse.updates(rid)[:-1]]
        # the failed stage, then status_update before the final, as in every run (DOMAIN §3.4)
        assert stages[-3:] == [
            ("t24_lookup", "failed", message),
            ("status_update", "started", "started: status_update"),
            ("status_update", "completed", "Status set to FAILED"),
        ]
        row = (await http.get(f"/api/registrations/{rid}")).json()
        assert row["status"] == "FAILED" and row["inProgress"] is False
        assert row["retryable"] is True  # any FAILED registration may be validated again
        assert row["result"]["details"]["error"] == code
        # nobody was enrolled
        from regstream.db import users

        async def enrolled() -> object:
            async with live.services.sessions() as session:
                return await users.get_by_customer_number(session, customer_number=cif)

        assert await live.call(enrolled()) is None


async def test_failed_registration_can_be_validated_again(live: LiveServer) -> None:
    async with httpx.AsyncClient(
        base_url=live.url, headers=auth_headers(live, "admin"), timeout=20
    ) as http:
        created = await http.post(
            "/api/registrations", json={**REGISTRATION, "customerNumber": "100800"}
        )
        rid = created.json()["id"]
        async with StreamClient(
            live.url, headers=auth_headers(live, "admin"), registration_id=rid
        ) as sse:
            assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
            await sse.wait_final(rid)
            assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
            await sse.wait_for(lambda fs: len([u for u in sse.updates(rid) if u.get("final")]) == 2)
        seqs = [u["seq"] for u in sse.updates(rid)]
        assert seqs == list(range(1, len(seqs) + 1))  # seq continues across runs, no gap
        row = (await http.get(f"/api/registrations/{rid}")).json()
        assert row["seq"] == seqs[-1]
        assert [e["seq"] for e in row["processLog"]][0] > 1  # only the latest run's log


async def test_terminal_registration_is_not_run_again(live: LiveServer) -> None:
    ids = await live.load_demo()
    rid = ids["duplicate"]
    async with (
        StreamClient(live.url, headers=auth_headers(live, "admin"), registration_id=rid) as sse,
        httpx.AsyncClient(base_url=live.url, headers=auth_headers(live, "admin")) as http,
    ):
        assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
        await sse.wait_final(rid)
        again = await http.post(f"/api/registrations/{rid}/process")
    assert again.status_code == 409
    body = again.json()
    assert body["error"] == "CONFLICT"
    assert body["registration"]["status"] == "DUPLICATE"
    assert body["registration"]["id"] == rid


async def test_unknown_registration_is_404(live: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live.url, headers=auth_headers(live, "admin")) as http:
        process = await http.post("/api/registrations/987654/process")
        read = await http.get("/api/registrations/987654")
    assert process.status_code == read.status_code == 404
    assert process.json()["error"] == "NOT_FOUND"
