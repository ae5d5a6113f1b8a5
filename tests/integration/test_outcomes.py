"""Each outcome end to end over HTTP: create → process → the exact ordered SSE frames and the
stored row, on SQLite and PostgreSQL (issue 2); every message has the fields README's table
lists for its kind, and FAILED runs publish ``status_update`` before their final (issue 17)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from regstream.core_banking.simulator.dataset import DEMO_APPLICANTS, DemoApplicant
from tests.conftest import SettingsFactory
from tests.support import StreamClient, auth_headers, serve_app

BY_SCENARIO = {a.scenario: a for a in DEMO_APPLICANTS}
README = Path(__file__).resolve().parents[2] / "README.md"
#: the stage updates that carry ``details`` (README, "Messages and frames"); any ``failed`` too
STAGE_DETAILS = {
    ("duplicate_check", "completed"), ("update_user_info", "completed"),
    ("t24_lookup", "completed"),
}  # fmt: skip

EXPECTED: dict[str, tuple[list[tuple[str, str]], str, str, dict[str, Any]]] = {
    "approved": (
        [("duplicate_check", "started"), ("duplicate_check", "completed"),
         ("t24_lookup", "started"), ("t24_lookup", "completed"),
         ("status_update", "started"), ("status_update", "completed")],
        "APPROVED", "Customer validated successfully. Found 2 accounts.", {"accountsFound": 2},
    ),
    "completed_update": (
        [("duplicate_check", "started"), ("duplicate_check", "completed"),
         ("update_user_info", "started"), ("update_user_info", "completed"),
         ("status_update", "started"), ("status_update", "completed")],
        "COMPLETED", "User already exists - information updated", {"updatedFields": ["deviceId", "email"]},
    ),
    "duplicate": (
        [("duplicate_check", "started"), ("duplicate_check", "completed"),
         ("update_user_info", "started"), ("update_user_info", "completed"),
         ("status_update", "started"), ("status_update", "completed")],
        "DUPLICATE", "User already exists with identical information", {},
    ),
    "kyc_mismatch": (
        [("duplicate_check", "started"), ("duplicate_check", "completed"),
         ("t24_lookup", "started"), ("t24_lookup", "failed"),
         ("status_update", "started"), ("status_update", "completed")],
        "FAILED", "Applicant details do not match the core banking record",
        {"error": "KYC_MISMATCH", "retryable": False, "mismatchedFields": ["dateOfBirth"]},
    ),
}  # fmt: skip


@pytest.mark.parametrize("scenario", list(EXPECTED), ids=list(EXPECTED))
async def test_outcome_end_to_end(
    scenario: str, make_settings: SettingsFactory, database_url: str
) -> None:
    stages, status, message, details = EXPECTED[scenario]
    with serve_app(make_settings(database_url=database_url)) as live:
        ids = await live.load_demo()
        rid = ids[scenario]
        async with (
            StreamClient(live.url, headers=auth_headers(live, "admin"), registration_id=rid) as sse,
            httpx.AsyncClient(base_url=live.url, headers=auth_headers(live, "admin")) as http,
        ):
            response = await http.post(f"/api/registrations/{rid}/process")
            assert response.status_code == 202
            assert response.json() == {"registrationId": rid, "status": "PENDING", "accepted": True}
            final = await sse.wait_final(rid)

            assert sse.frames[0].type == "connected"
            updates = sse.updates(rid)
            assert [(u["stage"], u["stageStatus"]) for u in updates[:-1]] == stages
            assert updates[-1] == final == sse.updates()[-1]
            assert [u["seq"] for u in updates] == list(range(1, len(updates) + 1))
            assert all(u["status"] == "PENDING" for u in updates[:-1])
            assert final["status"] == status
            assert final["message"] == message
            for name, value in details.items():
                assert final["details"][name] == value
            if scenario in ("completed_update", "duplicate"):
                assert isinstance(final["details"]["existingUserId"], int)
            assert [(e["stage"], e["status"]) for e in final["processLog"]] == stages
            assert_documented_fields(updates)
            # every update frame carries an id line equal to the message's eventId
            ids_seen = [f.id for f in sse.frames if f.type == "update"]
            assert ids_seen == [u["eventId"] for u in updates]

            row = (await http.get(f"/api/registrations/{rid}")).json()
            assert row["status"] == status
            assert row["inProgress"] is False
            assert row["result"] == {"message": message, "details": final["details"]}
            assert [(e["stage"], e["status"]) for e in row["processLog"] if e["stage"]] == stages
            assert row["seq"] == final["seq"]


def documented_fields() -> dict[str, tuple[set[str], set[str]]]:
    """README's table of message fields: per kind, (always, only sometimes)."""
    table: dict[str, tuple[set[str], set[str]]] = {}
    for line in README.read_text().splitlines():
        row = re.fullmatch(r"\| (stage update|final) \| (.*) \| (.*) \|", line)
        if row:
            always, sometimes = (
                set(re.findall(r"`([a-zA-Z]+)`(?: \(|,)", cell + ",")) for cell in row.groups()[1:]
            )
            table[row[1]] = (always, sometimes)
    assert set(table) == {"stage update", "final"}, "README lost its table of message fields"
    return table


def assert_documented_fields(updates: list[dict[str, Any]]) -> None:
    """Each message has exactly the fields README lists for its kind; a stage update carries
    ``details`` only where README says it may, and always where it must."""
    table = documented_fields()
    for update in updates:
        always, sometimes = table["final" if update.get("final") else "stage update"]
        assert set(update) - sometimes == always, update
        if not update.get("final"):
            step = (update["stage"], update["stageStatus"])
            if "details" in update:
                assert step in STAGE_DETAILS or step[1] == "failed", update
            if step == ("t24_lookup", "completed") or step[1] == "failed":
                assert "details" in update, update


def applicant(scenario: str) -> DemoApplicant:
    return BY_SCENARIO[scenario]
