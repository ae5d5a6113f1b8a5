"""The CLI's stream reader (cli/sse_client.follow, httpx-sse) against the real service: it
honours the server's ``retry:`` and reconnects with ``Last-Event-ID`` after the service closed
the stream, and the resume is exact — every update of every registration once, in order."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from regstream.cli.sse_client import StreamRefused, follow
from regstream.core_banking.simulator.dataset import DEMO_APPLICANTS
from regstream.realtime import messages
from tests.conftest import SettingsFactory
from tests.support import LiveServer, create_user, demo_payload, serve_app

STREAM = "/api/registrations/updates/stream"


@pytest.fixture
def pinging_live(make_settings: SettingsFactory) -> Iterator[LiveServer]:
    with serve_app(make_settings(sse_ping_interval=1.0)) as server:
        yield server


class _Follower(threading.Thread):
    def __init__(self, url: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(10.0, read=15.0))
        self.url = url
        self.frames: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for frame in follow(self.client, self.url, max_failures=3):
                self.frames.append(frame)
                if self.stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def updates(self) -> list[dict[str, Any]]:
        return [f["data"] for f in self.frames if f.get("type") == "update"]

    def wait(self, done: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.frames}"
            time.sleep(0.05)


def test_follow_reconnects_after_the_service_closed_the_stream_and_resumes_exactly(
    pinging_live: LiveServer,
) -> None:
    live = pinging_live
    admin = create_user(live, "admin")
    with httpx.Client(base_url=live.url, headers=admin.headers, timeout=10) as api:
        ids = [
            api.post("/api/registrations", json=demo_payload(a)).json()["id"]
            for a in DEMO_APPLICANTS[:3]
        ]
        follower = _Follower(live.url + STREAM, admin.headers)
        follower.start()
        try:
            follower.wait(lambda: follower.frames, 10, "connected")

            def final_of(rid: int) -> bool:
                return any(
                    u["registrationId"] == rid and u.get("final") for u in follower.updates()
                )

            assert api.post(f"/api/registrations/{ids[0]}/process").status_code == 202
            follower.wait(lambda: final_of(ids[0]), 20, "the first final")
            # the service ends every stream with a short retry hint (as a drain does) ...
            live.call_soon(live.services.hub.close_all, messages.retry_frame(200))
            # ... and updates go on while the client is away
            assert api.post("/api/registrations/process",
                            json={"registrationIds": ids[1:]}).status_code == 200  # fmt: skip
            follower.wait(lambda: all(final_of(i) for i in ids[1:]), 30, "the other finals")
        finally:
            follower.stop.set()
            follower.client.close()
            follower.join(5)
    connected = [f for f in follower.frames if f.get("type") == "connected"]
    assert len(connected) >= 2, "the client reconnected after the service closed the stream"
    seen = [(u["registrationId"], u["seq"]) for u in follower.updates()]
    assert len(seen) == len(set(seen)), "an update arrived twice across the reconnect"
    for rid in ids:
        seqs = [seq for r, seq in seen if r == rid]
        assert seqs == list(range(1, len(seqs) + 1)), (rid, seqs)


def test_follow_stops_on_an_answer_a_retry_cannot_fix(live: LiveServer) -> None:
    with httpx.Client(headers={"Authorization": "Bearer rst_wrong"}) as client:
        with pytest.raises(StreamRefused) as refused:
            next(iter(follow(client, live.url + STREAM)))
    assert refused.value.status == 401
