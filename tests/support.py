"""Test support: a live regstream server in a thread, an SSE reader, waiting with deadlines.

Everything is real: uvicorn with httptools on a loopback port, a private redis-server, the T24
simulator over HTTP, SQLite files or a PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn

from regstream.app import Application, create_app
from regstream.config import Settings

#: ``make_settings``' REGSTREAM_SECRET_KEY (at least 32 characters, as the settings require)
TEST_SECRET_KEY = "test-secret-key-0123456789abcdef"


@dataclass
class LiveServer:
    url: str
    app: Application
    server: uvicorn.Server
    thread: threading.Thread
    settings: Settings

    @property
    def services(self) -> Any:
        return self.app.state.services

    async def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine on the server's event loop (its engine and Redis belong there)."""
        future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(
            coro, self.app.state.loop
        )
        return await asyncio.wrap_future(future)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.app.state.loop.call_soon_threadsafe(fn, *args)

    async def load_demo(self) -> dict[str, int]:
        from regstream.demo import load_demo

        rows = await self.call(load_demo(self.services.sessions, TEST_SECRET_KEY.encode()))
        return {row.scenario: row.registration_id for row in rows}


@contextmanager
def serve_app(
    settings: Settings, *, startup_timeout: float = 20.0, http: str = "httptools"
) -> Iterator[LiveServer]:
    """Run the whole app (lifespan included) in a background thread on a free port."""
    app = create_app(settings)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, log_config=None, access_log=False, loop="uvloop", http=http,
        timeout_graceful_shutdown=5, ws="none",
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("regstream test server did not start")
        time.sleep(0.02)
    port = sock.getsockname()[1]
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", app, server, thread, settings)
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


class LoopbackServer:
    """An asyncio TCP server of a test's own on a free loopback port (``async with``): the
    subclass's ``_serve`` handles each connection and adds the writers to close at the end to
    ``_writers``."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Any:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


def free_port(*, below: int = 65536, also_free: int | None = None) -> int:
    """A free loopback port under ``below`` (55000 for servers of our own: the rule for test
    ports); with ``also_free``, the port that many above it is free too (a cluster node's bus
    port, P + 10000)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port < below and (also_free is None or _is_free(port + also_free)):
            return port
    raise RuntimeError(f"no free loopback port below {below} found in 200 tries")


def _is_free(port: int) -> bool:
    if port > 65535:
        return False
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def wait_until(
    predicate: Callable[[], Awaitable[bool]] | Callable[[], bool], *, timeout: float = 10.0,
    interval: float = 0.05, what: str = "condition",
) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Frame:
    data: dict[str, Any] | None
    id: str | None = None
    retry: int | None = None

    @property
    def type(self) -> str | None:
        return None if self.data is None else self.data.get("type")

    @property
    def update(self) -> dict[str, Any]:
        assert self.data is not None and self.data.get("type") == "update", self.data
        return dict(self.data["data"])


@dataclass
class SseReader:
    """Reads an SSE response in a background task; ``frames`` grows as frames arrive."""

    response: httpx.Response
    frames: list[Frame] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)
    task: asyncio.Task[None] | None = None
    closed: bool = False

    async def _run(self) -> None:
        buffer = ""
        try:
            async for text in self.response.aiter_text():
                self.raw.extend(text.encode())
                buffer += text
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    self.frames.append(_parse_block(block))
        except (httpx.HTTPError, asyncio.CancelledError):
            pass
        finally:
            self.closed = True

    def updates(self, registration_id: int | None = None) -> list[dict[str, Any]]:
        return [
            f.update for f in self.frames
            if f.type == "update"
            and (registration_id is None or f.update.get("registrationId") == registration_id)
        ]  # fmt: skip

    def last_event_id(self) -> str | None:
        ids = [f.id for f in self.frames if f.id]
        return ids[-1] if ids else None

    async def wait_for(self, predicate: Callable[[list[Frame]], bool], timeout: float = 15.0,
                       what: str = "frames") -> None:  # fmt: skip
        await wait_until(lambda: predicate(self.frames), timeout=timeout, what=what)

    async def wait_final(self, registration_id: int, timeout: float = 20.0) -> dict[str, Any]:
        def done(frames: list[Frame]) -> bool:
            return any(u.get("final") for u in self.updates(registration_id))

        await self.wait_for(done, timeout, what=f"final update of {registration_id}")
        return [u for u in self.updates(registration_id) if u.get("final")][-1]


def _parse_block(block: str) -> Frame:
    data_lines, event_id, retry = [], None, None
    for line in block.split("\n"):
        if line.startswith("data:"):
            data_lines.append(line[5:].lstrip())
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("retry:"):
            retry = int(line[6:].strip())
    data = json.loads("\n".join(data_lines)) if data_lines else None
    return Frame(data=data, id=event_id, retry=retry)


class StreamClient:
    """``async with StreamClient(url, params) as sse:`` opens a stream and reads it live."""

    def __init__(self, base_url: str, *, registration_id: int | str | None = None,
                 last_event_id: str | None = None, headers: dict[str, str] | None = None,
                 wait_connected: bool = True) -> None:  # fmt: skip
        self._client = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(10, read=None))
        self._params = {"registrationId": str(registration_id)} if registration_id else {}
        self._headers = dict(headers or {})
        if last_event_id:
            self._headers["Last-Event-ID"] = last_event_id
        self._wait_connected = wait_connected
        self._cm: Any = None
        self.reader: SseReader | None = None

    async def __aenter__(self) -> SseReader:
        self._cm = self._client.stream(
            "GET", "/api/registrations/updates/stream", params=self._params, headers=self._headers
        )
        response = await self._cm.__aenter__()
        self.reader = SseReader(response)
        if response.status_code == 200:
            self.reader.task = asyncio.create_task(self.reader._run())
            if self._wait_connected:
                await self.reader.wait_for(
                    lambda fs: any(f.type == "connected" for f in fs), 10, what="connected frame"
                )
        return self.reader

    async def __aexit__(self, *exc: object) -> None:
        if self.reader is not None and self.reader.task is not None:
            self.reader.task.cancel()
            try:
                await self.reader.task
            except asyncio.CancelledError:
                pass
        await self._cm.__aexit__(None, None, None)
        await self._client.aclose()


@asynccontextmanager
async def open_stream(
    live: LiveServer, headers: dict[str, str] | None = None, **kwargs: Any
) -> AsyncIterator[SseReader]:
    """A stream of ``live`` that must be accepted (200) and connected: ``StreamClient``'s
    ``registration_id`` / ``last_event_id``; as a new admin unless ``headers`` are given."""
    client = StreamClient(live.url, headers=headers or auth_headers(live, "admin"), **kwargs)
    async with client as reader:
        assert reader.response.status_code == 200, reader.response.status_code
        yield reader


REGISTRATION = {
    "customerNumber": "100231",
    "firstName": "Test",
    "lastName": "Person",
    "dateOfBirth": "1990-01-01",
    "nationalId": "12345678",
    "idType": "NATIONAL.ID",
    "phone": "+254700000999",
    "email": "test@example.test",
}


def demo_payload(applicant: Any) -> dict[str, Any]:
    """The REST body for a simulator ``DemoApplicant``."""
    body = {
        "customerNumber": applicant.customer_number,
        "firstName": applicant.first_name,
        "lastName": applicant.last_name,
        "dateOfBirth": applicant.date_of_birth,
        "nationalId": applicant.national_id,
        "idType": applicant.id_type,
        "phone": applicant.phone,
        "email": applicant.email,
        "deviceId": applicant.device_id,
    }
    if applicant.account_number:
        body["accountNumber"] = applicant.account_number
    return body


# --- authentication (issue 4) ------------------------------------------------------------------


@dataclass(frozen=True)
class AuthUser:
    """A user made directly in the live server's database (``create_user``)."""

    username: str
    role: str
    token: str | None
    password: str | None

    @property
    def headers(self) -> dict[str, str]:
        assert self.token is not None, "created without a token"
        return {"Authorization": f"Bearer {self.token}"}


def in_fresh_loop(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine on a new event loop in a worker thread: callable from sync and async tests
    alike, and never touching the server's own engine (its connections belong to its loop)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result(timeout=60)


def run_in_db(live: LiveServer, work: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    """``await work(session)`` in one transaction on ``live``'s database (a fresh engine)."""
    from regstream.db.engine import create_engine, create_session_factory

    async def make() -> Any:
        engine = create_engine(live.settings.effective_database_url)
        try:
            async with create_session_factory(engine).begin() as session:
                return await work(session)
        finally:
            await engine.dispose()

    return in_fresh_loop(make)


def create_user(
    live: LiveServer, role: str = "operator", *, username: str | None = None,
    password: str | None = None, token: bool = True, disabled: bool = False,
) -> AuthUser:  # fmt: skip
    """Create a user (and an API token) through the auth data functions, in ``live``'s database."""
    import uuid

    from regstream.auth import credentials
    from regstream.auth.principal import Role
    from regstream.db import accounts
    from regstream.db.engine import create_engine, create_session_factory

    name = username or f"{role}-{uuid.uuid4().hex[:8]}"

    async def make() -> str | None:
        engine = create_engine(live.settings.effective_database_url)
        try:
            async with create_session_factory(engine).begin() as session:
                operator = await credentials.create_operator(
                    session, username=name, role=Role(role), password=password
                )
                value = None
                if token:
                    value, _ = await credentials.issue_api_token(session, operator=operator)
                if disabled:
                    await accounts.update_operator(session, operator=operator, disabled=True)
                return value
        finally:
            await engine.dispose()

    return AuthUser(name, role, in_fresh_loop(make), password)


def auth_headers(live: LiveServer, role: str = "operator") -> dict[str, str]:
    """``Authorization: Bearer …`` headers of a new user with ``role`` (viewer/operator/admin)."""
    return create_user(live, role).headers


def on_write_path(live: LiveServer, path: str) -> bool:
    """Whether the server has streams and every one is on ``path`` (``api/takeover.py``):
    ``transport`` (taken over from uvicorn: its connection owned by a ``StreamProtocol``) or
    ``queued`` (the portable path)."""
    from regstream.realtime.hub import QueuedStream, StreamProtocol, TransportStream

    streams = list(live.services.hub.streams())
    if path == "queued":
        return bool(streams) and all(isinstance(s, QueuedStream) for s in streams)
    return bool(streams) and all(
        isinstance(s, TransportStream) and isinstance(s.transport.get_protocol(), StreamProtocol)
        for s in streams
    )


def metric_value(name: str, labels: dict[str, str] | None = None) -> float:
    """A sample of the process's Prometheus registry (``prometheus_client``'s public reader)."""
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(name, labels or {})
    assert value is not None, f"no sample {name} {labels or ''}"
    return value
