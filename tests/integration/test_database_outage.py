"""A bad day for the database (issue 16): PostgreSQL refusing connections, and a table lock held
for long. Every answer stays JSON (503 + Retry-After, never a 500 or a traceback per request),
``/readyz`` says not ready, the log says it once per outage, and requests answer within the
statement timeout instead of hanging behind a lock.

The outage is real: the service reaches the real PostgreSQL through a TCP forwarder of the
test's own (bytes pass through unchanged); closing it cuts every connection and refuses new ones,
as a server that went away does."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from regstream.core_banking.simulator.dataset import DEMO_APPLICANTS
from tests.conftest import SettingsFactory
from tests.support import auth_headers, demo_payload, free_port, serve_app


class TcpForwarder:
    """127.0.0.1:<port> → target, in a thread of its own; ``cut()`` closes the listener and every
    open connection (refused from then on), ``restore()`` listens again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> TcpForwarder:
        self._thread.start()
        self.restore()
        return self

    def __exit__(self, *_: object) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    def restore(self) -> None:
        async def listen() -> None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

        self._call(listen())

    def cut(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self._call(close())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def lines() -> Iterator[_Lines]:
    handler = _Lines()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


@pytest.fixture
def forwarded(postgres_url: str) -> Iterator[tuple[TcpForwarder, str]]:
    parts = urlsplit(postgres_url)
    with TcpForwarder(parts.hostname or "127.0.0.1", parts.port or 5432) as forwarder:
        netloc = f"{parts.username}@127.0.0.1:{forwarder.port}"
        yield forwarder, parts._replace(netloc=netloc).geturl()


def _assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, (response.request.url, response.text)
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"] == "UNAVAILABLE"
    assert response.json()["requestId"]
    assert 1 <= int(response.headers["retry-after"]) <= 10


def test_postgresql_refusing_connections_gives_503_json_and_one_log_line(
    make_settings: SettingsFactory, forwarded: tuple[TcpForwarder, str], lines: _Lines
) -> None:
    forwarder, url = forwarded
    with serve_app(make_settings(database_url=url, db_statement_timeout=2.0)) as live:
        headers = auth_headers(live, "admin")
        with httpx.Client(base_url=live.url, headers=headers, timeout=15) as client:
            created = client.post("/api/registrations", json=demo_payload(DEMO_APPLICANTS[0]))
            assert created.status_code == 201
            rid = created.json()["id"]
            forwarder.cut()
            for _ in range(3):  # a burst of requests during one outage
                _assert_unavailable(client.get("/api/registrations"))
                _assert_unavailable(client.get(f"/api/registrations/{rid}"))
                _assert_unavailable(client.post(f"/api/registrations/{rid}/process"))
                _assert_unavailable(
                    client.post("/api/registrations", json=demo_payload(DEMO_APPLICANTS[1]))
                )
                _assert_unavailable(client.get("/api/audit"))
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
            assert client.get("/healthz").status_code == 200
            forwarder.restore()
            deadline = time.monotonic() + 15
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, client.get("/readyz").text
                time.sleep(0.2)
            assert client.get(f"/api/registrations/{rid}").status_code == 200
    messages = lines.messages()
    assert sum("database unavailable" in m for m in messages) == 1, messages
    assert sum("database reachable again" in m for m in messages) == 1, messages
    assert not [r for r in lines.records if r.exc_info or r.levelno >= logging.ERROR], messages


async def test_a_table_lock_held_long_answers_within_the_statement_timeout(
    make_settings: SettingsFactory, postgres_url: str
) -> None:
    settings = make_settings(database_url=postgres_url, db_statement_timeout=1.0)
    with serve_app(settings) as live:
        headers = auth_headers(live, "operator")
        async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=30) as client:
            created = await client.post("/api/registrations", json=demo_payload(DEMO_APPLICANTS[0]))
            rid = created.json()["id"]
            locker = await asyncpg.connect(postgres_url.replace("+asyncpg", ""))
            try:
                tx = locker.transaction()
                await tx.start()
                await locker.execute("LOCK TABLE registration_requests IN ACCESS EXCLUSIVE MODE")
                for request in (
                    client.get("/api/registrations"),
                    client.get(f"/api/registrations/{rid}"),
                    client.post(f"/api/registrations/{rid}/process"),
                ):
                    started = time.monotonic()
                    response = await request
                    took = time.monotonic() - started
                    _assert_unavailable(response)
                    # the lock is held for as long as the test wants (30 s in the issue):
                    # answering at all while it is held is the point; the bound is generous
                    assert took < 10, took
                await tx.rollback()
            finally:
                await locker.close()
            assert (await client.get(f"/api/registrations/{rid}")).status_code == 200


def test_runs_caught_by_a_database_outage_resume_when_it_answers(
    make_settings: SettingsFactory,
    forwarded: tuple[TcpForwarder, str],
    t24_private: Any,
    lines: _Lines,
) -> None:
    """A bulk validation while PostgreSQL goes away for a few seconds: the runs that hit the
    outage wait and resume from their process log once it answers, each ending with exactly one
    final status — instead of "could not record failure" and IN PROGRESS until the lease expires
    (the lease here is 60 s; the bound below is far shorter)."""
    forwarder, url = forwarded
    httpx.post(f"{t24_private.control_url}/config", json={"latency_ms": 400}, timeout=5)
    settings = make_settings(
        database_url=url, db_statement_timeout=2.0, lease_seconds=60.0,
        t24_base_url=t24_private.base_url,
    )  # fmt: skip
    with serve_app(settings) as live:
        headers = auth_headers(live, "admin")
        with httpx.Client(base_url=live.url, headers=headers, timeout=15) as client:
            ids = [
                client.post("/api/registrations", json=demo_payload(a)).json()["id"]
                for a in DEMO_APPLICANTS
            ]
            bulk = client.post("/api/registrations/process", json={"registrationIds": ids})
            assert bulk.status_code == 200 and bulk.json()["accepted"] == ids
            time.sleep(0.2)  # the runs are in their T24 lookups
            forwarder.cut()
            time.sleep(3)
            forwarder.restore()
            deadline = time.monotonic() + 30
            while True:
                rows = [client.get(f"/api/registrations/{i}") for i in ids]
                if all(r.status_code == 200 and not r.json()["inProgress"] for r in rows):
                    break
                assert time.monotonic() < deadline, [r.text[:120] for r in rows]
                time.sleep(0.3)
    for row in (r.json() for r in rows):
        finals = [e for e in row["processLog"] if e["stage"] is None]
        assert len(finals) == 1, row["processLog"]
        assert (row["result"]["details"] or {}).get("error") != "INTERNAL_ERROR", row["result"]
    messages = lines.messages()
    assert not any("could not record failure" in m for m in messages), messages
    assert any("resuming when it answers" in m for m in messages), messages
