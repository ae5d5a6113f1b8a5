"""Issue 15 item 6: a rolling restart without a herd (``drain.py``).

Real ``regstream serve`` subprocesses on a private Redis, a T24 simulator and SQLite or the real
PostgreSQL; signals sent to the process as an orchestrator would. The three phases: readiness off
while everything is still served (the drain delay), streams closed in batches over the spread
with jittered ``retry:`` hints, then the validations' grace; and a client moved by a restart to
the next instance resumes there with exactly what it missed.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from regstream.core_banking.simulator.server import RunningSimulator
from regstream.drain import FLUSH
from regstream.realtime.embedded import EmbeddedRedis
from tests.integration.test_crash_and_shutdown import _env, _serve, _sim, _token
from tests.support import SseReader, StreamClient, free_port, wait_until

RETRY_MS = 1000  # SSE_RETRY_MS of these tests: hints drawn from 500-1500 ms
EXIT_MARGIN = 15.0  # the process's own start of shutdown and exit, on a busy 2-core machine


async def _ready_state(http: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await http.get("/readyz")
    return response.status_code, response.json()


def _close_times(readers: list[SseReader]) -> dict[int, float]:
    """When each reader saw its stream end (monotonic), filled in as they end."""
    ended: dict[int, float] = {}

    def note(task: asyncio.Task[None]) -> None:
        ended.setdefault(id(task), time.monotonic())

    for reader in readers:
        assert reader.task is not None
        reader.task.add_done_callback(note)
    return ended


def _closing_hint(reader: SseReader) -> int:
    """The ``retry:`` hint a stream got as its last frame before the server ended it."""
    last = reader.frames[-1]
    assert last.data is None and last.retry is not None, reader.raw[-200:]
    assert reader.raw.endswith(b"retry: %d\n\n" % last.retry)
    return last.retry


async def test_sigterm_serves_through_the_delay_then_closes_streams_over_the_spread(
    tmp_path: Path, redis_server: EmbeddedRedis, t24: RunningSimulator, stream_path: str
) -> None:
    """On both stream write paths (api/takeover.py)."""
    delay, spread, grace = 3.0, 2.0, 5.0
    env = _env(
        tmp_path, redis_server, t24, REGSTREAM_DRAIN_DELAY=str(delay),
        REGSTREAM_DRAIN_SPREAD=str(spread), REGSTREAM_SHUTDOWN_GRACE=str(grace),
        SSE_RETRY_MS=str(RETRY_MS), REGSTREAM_STREAMS_PER_USER="100",
        REGSTREAM_METRICS_PUBLIC="true",
        REGSTREAM_STREAM_FAST_PATH=str(stream_path == "transport").lower(),
    )  # fmt: skip
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with _serve(env, port, log, "--demo") as server:
        headers = {"Authorization": f"Bearer {_token(log)}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as http:
            rid = (await http.get("/api/registrations", params={"q": "Otieno"})).json()["items"][0][
                "id"
            ]
            clients = [StreamClient(url, headers=headers) for _ in range(40)]
            readers = [await client.__aenter__() for client in clients]
            late = StreamClient(url, registration_id=rid, headers=headers)
            try:
                assert (await _ready_state(http))[0] == 200
                server.send_signal(signal.SIGTERM)
                signalled = time.monotonic()

                async def unready() -> bool:
                    return (await _ready_state(http))[0] == 503

                await wait_until(unready, timeout=1.5, interval=0.02, what="/readyz to turn 503")
                status, body = await _ready_state(http)
                assert (status, body) == (503, {"ready": False, "checks": {"server": "draining"}})
                # the drain delay: everything else is still served, on new connections too
                late_reader = await late.__aenter__()
                assert late_reader.response.status_code == 200
                async with httpx.AsyncClient(base_url=url, headers=headers, timeout=5) as fresh:
                    assert (await fresh.get("/healthz")).status_code == 200
                    metrics = (await fresh.get("/metrics")).text
                    assert "regstream_shutdown_phase 1.0" in metrics
                    assert f'regstream_sse_stream_write_path{{path="{stream_path}"}} 1.0' in metrics
                    started = await fresh.post(f"/api/registrations/{rid}/process")
                    assert started.status_code == 202
                await late_reader.wait_final(rid, timeout=5)
                served_until = time.monotonic()
                everyone = [*readers, late_reader]
                # all of that happened before the first stream was closed: within the delay
                assert not any(reader.closed for reader in everyone)
                ended = _close_times(everyone)
                await wait_until(
                    lambda: len(ended) == len(everyone), timeout=delay + spread + 10,
                    what="every stream closed by the server",
                )  # fmt: skip
            finally:
                for client in [*clients, late]:
                    await client.__aexit__(None, None, None)
        # within delay + spread + grace + flush (+ the process's own start and exit)
        exit_code = await asyncio.to_thread(
            server.wait, delay + spread + grace + FLUSH + EXIT_MARGIN
        )
    text = log.read_text()
    assert exit_code == 0, text[-3000:]
    # closed after the delay, in batches over most of the spread (41 streams in 20 batches)
    first, last = min(ended.values()), max(ended.values())
    assert first >= served_until and first - signalled >= delay * 0.9, (first - signalled, delay)
    assert last - first >= spread * 0.6, f"streams closed within {last - first:.2f} s"
    # each stream got a retry hint of its own before the end, drawn from 500-1500 ms
    hints = [_closing_hint(reader) for reader in everyone]
    assert all(RETRY_MS // 2 <= hint <= RETRY_MS * 3 // 2 for hint in hints), hints
    assert len(set(hints)) >= 30 and max(hints) - min(hints) >= RETRY_MS // 2, sorted(hints)
    # one log line per phase
    assert "draining: readiness off; serving on for 3.0 s" in text
    assert "closed 41 streams over " in text
    assert "no validation left running" in text


class _Follower:
    """A client of one stream that moves, as a browser would, when its instance closes it: it
    waits the ``retry:`` hint, then reconnects to the next instance with its last event id."""

    def __init__(self, url: str, headers: dict[str, str], registration_id: int | None) -> None:
        self.headers, self.registration_id = headers, registration_id
        self.client = StreamClient(url, registration_id=registration_id, headers=headers)
        self.readers: list[SseReader] = []
        self.moved_at_ms = 0

    async def open(self) -> None:
        self.readers.append(await self.client.__aenter__())

    def updates(self) -> list[dict[str, Any]]:
        return [update for reader in self.readers for update in reader.updates()]

    def finals(self) -> set[int]:
        return {update["registrationId"] for update in self.updates() if update.get("final")}

    def _last_event_id(self) -> str:
        first = self.readers[0]
        if (last := first.last_event_id()) is not None:
            return last
        connected = next(f for f in first.frames if f.type == "connected")
        assert connected.data is not None
        return str(connected.data["lastEventId"])

    async def move(self, url: str) -> None:
        first = self.readers[0]
        await wait_until(lambda: first.closed, timeout=15, what="the stream closed by its instance")
        await asyncio.sleep(_closing_hint(first) / 1000)  # what EventSource does with retry:
        await self.client.__aexit__(None, None, None)
        self.moved_at_ms = time.time_ns() // 1_000_000
        self.client = StreamClient(
            url, registration_id=self.registration_id, headers=self.headers,
            last_event_id=self._last_event_id(),
        )  # fmt: skip
        await self.open()

    async def close(self) -> None:
        await self.client.__aexit__(None, None, None)


async def test_a_client_moved_by_a_restart_resumes_on_the_next_instance_exactly(
    tmp_path: Path, redis_server: EmbeddedRedis, t24_private: RunningSimulator, postgres_url: str
) -> None:
    await _sim(t24_private, "config", {"latency_ms": 1200})  # runs in flight across the restart
    delay, spread, grace = 1.0, 1.0, 15.0
    common = dict(
        DATABASE_URL=postgres_url, REGSTREAM_DRAIN_DELAY=str(delay),
        REGSTREAM_DRAIN_SPREAD=str(spread), REGSTREAM_SHUTDOWN_GRACE=str(grace),
        SSE_RETRY_MS=str(RETRY_MS), REGSTREAM_STREAMS_PER_USER="100",
    )  # fmt: skip
    env_a = _env(tmp_path / "a", redis_server, t24_private, **common)
    env_b = _env(tmp_path / "b", redis_server, t24_private, **common)
    port_a, port_b, log_a, log_b = free_port(), free_port(), tmp_path / "a.log", tmp_path / "b.log"
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    rids: list[int] = []

    def wanted(follower: _Follower) -> list[int]:
        return rids if follower.registration_id is None else [follower.registration_id]

    with _serve(env_a, port_a, log_a, "--demo") as server_a, _serve(env_b, port_b, log_b):
        headers = {"Authorization": f"Bearer {_token(log_a)}"}
        async with httpx.AsyncClient(base_url=url_a, headers=headers, timeout=20) as http:
            page = (await http.get("/api/registrations", params={"pageSize": 50})).json()
            rids.extend(item["id"] for item in page["items"])
            assert len(rids) == 10
            followers = [_Follower(url_a, headers, None) for _ in range(4)]
            followers += [_Follower(url_a, headers, rid) for rid in rids]
            try:
                for follower in followers:
                    await follower.open()
                bulk = await http.post("/api/registrations/process", json={"registrationIds": rids})
                assert bulk.status_code == 200 and sorted(bulk.json()["accepted"]) == sorted(rids)
                await (
                    followers[0]
                    .readers[0]
                    .wait_for(
                        lambda fs: sum(f.type == "update" for f in fs) >= 10, what="runs under way"
                    )
                )
                server_a.send_signal(signal.SIGTERM)
                await asyncio.gather(*(follower.move(url_b) for follower in followers))

                def complete() -> bool:
                    return all(f.finals() >= set(wanted(f)) for f in followers)

                await wait_until(complete, timeout=60, interval=0.1, what="every final update")
            finally:
                for follower in followers:
                    await follower.close()
        exit_code = await asyncio.to_thread(
            server_a.wait, delay + spread + grace + FLUSH + EXIT_MARGIN
        )
    assert exit_code == 0, log_a.read_text()[-3000:]

    from sqlalchemy import select

    from regstream.db.engine import create_engine, create_session_factory
    from regstream.db.tables import ProcessLogEntry

    engine = create_engine(postgres_url)
    try:
        async with create_session_factory(engine)() as session:
            logged = list(await session.execute(
                select(ProcessLogEntry.registration_id, ProcessLogEntry.seq)
                .order_by(ProcessLogEntry.registration_id, ProcessLogEntry.seq)
            ))  # fmt: skip
    finally:
        await engine.dispose()
    expected = {rid: [seq for r, seq in logged if r == rid] for rid in rids}
    assert all(len(seqs) >= 5 for seqs in expected.values()), expected
    replayed = 0
    for follower in followers:
        got = [(u["registrationId"], u["seq"]) for u in follower.updates()]
        # 0 lost and 0 duplicated by (registrationId, seq), in order, against the database
        for rid in wanted(follower):
            assert [seq for r, seq in got if r == rid] == expected[rid], (follower, rid, got)
        assert len(got) == sum(len(expected[rid]) for rid in wanted(follower))
        # the history covered the gap: a replay, never a snapshot
        resumed = follower.readers[1]
        assert not any(f.type == "snapshot" for f in resumed.frames), resumed.raw[:500]
        replayed += sum(u["timestamp"] < follower.moved_at_ms for u in resumed.updates())
    # updates were published while the clients moved: the resume had something to replay
    assert replayed > 0


async def test_serve_with_workers_drains_every_worker(
    tmp_path: Path, redis_server: EmbeddedRedis, t24: RunningSimulator
) -> None:
    """``serve --workers 2`` sent SIGTERM as an orchestrator does (the supervisor only): the
    supervisor passes it on, and each worker drains as a single process does."""
    delay, spread, grace = 2.0, 1.0, 3.0
    env = _env(
        tmp_path, redis_server, t24, REGSTREAM_DRAIN_DELAY=str(delay),
        REGSTREAM_DRAIN_SPREAD=str(spread), REGSTREAM_SHUTDOWN_GRACE=str(grace),
        SSE_RETRY_MS=str(RETRY_MS), REGSTREAM_STREAMS_PER_USER="100",
    )  # fmt: skip
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with _serve(env, port, log, "--demo", "--workers", "2") as server:
        headers = {"Authorization": f"Bearer {_token(log)}"}
        clients = [StreamClient(url, headers=headers) for _ in range(8)]
        late = StreamClient(url, headers=headers)
        try:
            readers = [await client.__aenter__() for client in clients]
            async with httpx.AsyncClient(base_url=url, timeout=5) as http:
                server.send_signal(signal.SIGTERM)

                async def unready() -> bool:
                    return (await _ready_state(http))[0] == 503

                await wait_until(unready, timeout=2, interval=0.02, what="/readyz to turn 503")
                late_reader = await late.__aenter__()  # a new connection, still accepted
                assert late_reader.response.status_code == 200
                assert (await http.get("/healthz")).status_code == 200
            everyone = [*readers, late_reader]
            assert not any(reader.closed for reader in everyone)
            await wait_until(
                lambda: all(reader.closed for reader in everyone), timeout=delay + spread + 10,
                what="every stream closed by its worker",
            )  # fmt: skip
        finally:
            for client in [*clients, late]:
                await client.__aexit__(None, None, None)
        exit_code = await asyncio.to_thread(
            server.wait, delay + spread + grace + FLUSH + EXIT_MARGIN
        )
    text = log.read_text()
    assert exit_code == 0, text[-3000:]
    hints = [_closing_hint(reader) for reader in everyone]
    assert all(RETRY_MS // 2 <= hint <= RETRY_MS * 3 // 2 for hint in hints), hints
    closed = [int(line.split("closed ", 1)[1].split()[0]) for line in text.splitlines()
              if "regstream.drain: closed " in line]  # fmt: skip
    assert len(closed) == 2 and sum(closed) == 9, closed  # each worker closed its own streams
