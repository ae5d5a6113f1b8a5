"""Browser latency reports (issue 16): any viewer may report what its pages measured, but not
without limit — the dashboard and the Prometheus histogram are not one viewer's to skew."""

from __future__ import annotations

import httpx

from regstream.auth.runtime import LATENCY_REPORTS_PER_MINUTE
from tests.support import LiveServer, create_user


def test_a_viewer_may_send_only_so_many_latency_reports(live: LiveServer) -> None:
    viewer = create_user(live, "viewer")
    other = create_user(live, "viewer")
    admin = create_user(live, "admin")
    samples = {"samples": [1000.0] * 200}
    with httpx.Client(base_url=live.url, timeout=10) as client:
        answers = [
            client.post("/api/metrics/latency", json=samples, headers=viewer.headers).status_code
            for _ in range(LATENCY_REPORTS_PER_MINUTE + 5)
        ]
        assert answers[:LATENCY_REPORTS_PER_MINUTE] == [204] * LATENCY_REPORTS_PER_MINUTE
        refused = client.post("/api/metrics/latency", json=samples, headers=viewer.headers)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"] == "TOO_MANY_REQUESTS"
        # per user: another viewer still reports
        ok = client.post("/api/metrics/latency", json={"samples": [5.0]}, headers=other.headers)
        assert ok.status_code == 204
        # out-of-range samples are invalid input, not data
        bad = client.post("/api/metrics/latency", json={"samples": [1e12]}, headers=other.headers)
        assert bad.status_code == 422
        summary = client.get("/api/metrics/latency", headers=admin.headers).json()
    assert summary["count"] <= 500  # the ring; made of accepted reports only
    assert summary["max"] == 1000.0
