"""The audit trail of personal data and validations (issue 16): creating a registration is
audited, and every audited action carries the client's address."""

from __future__ import annotations

import httpx

from regstream.core_banking.simulator.dataset import DEMO_APPLICANTS
from tests.support import LiveServer, create_user, demo_payload


def test_create_and_process_are_audited_with_actor_and_client_address(live: LiveServer) -> None:
    operator = create_user(live, "operator")
    admin = create_user(live, "admin")
    with httpx.Client(base_url=live.url, headers=operator.headers, timeout=10) as client:
        ids = []
        for applicant in DEMO_APPLICANTS[:3]:
            created = client.post("/api/registrations", json=demo_payload(applicant))
            assert created.status_code == 201, created.text
            ids.append(created.json()["id"])
        assert client.post(f"/api/registrations/{ids[0]}/process").status_code == 202
        bulk = client.post("/api/registrations/process", json={"registrationIds": ids[1:]})
        assert bulk.status_code == 200 and bulk.json()["accepted"] == ids[1:]
    with httpx.Client(base_url=live.url, headers=admin.headers, timeout=10) as client:
        entries = client.get("/api/audit", params={"actor": operator.username}).json()["items"]
    by_action: dict[str, list[dict[str, object]]] = {}
    for entry in entries:
        by_action.setdefault(str(entry["action"]), []).append(entry)
    created_targets = {e["target"] for e in by_action.get("registration.create", [])}
    assert created_targets == {f"registration:{i}" for i in ids}
    processed = {e["target"] for e in by_action.get("registration.process", [])}
    assert processed == {f"registration:{i}" for i in ids}
    for entry in by_action["registration.create"] + by_action["registration.process"]:
        assert entry["clientIp"] == "127.0.0.1", entry
        assert entry["outcome"] == "ok"
    # ids only: no personal data of the applicants in the trail
    text = repr(entries)
    for applicant in DEMO_APPLICANTS[:3]:
        assert applicant.national_id not in text and applicant.last_name not in text
