"""The T24 transport (regstream.core_banking._http) against scripted servers on loopback sockets.

Each test runs a real asyncio TCP server whose handler plays one behaviour (keep-alive, close,
chunked, stall, garbage ...) and counts connections and requests, so what crossed the wire is
asserted, not assumed. The T24 client's own behaviour over this transport is tested against the
simulator in ``test_t24_client.py``.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from regstream.core_banking._http import (
    ConnectionFailed,
    ConnectTimeout,
    Disconnected,
    HttpClient,
    MalformedAnswer,
    PoolTimeout,
    ReadTimeout,
    SentRequest,
    UnreadableBody,
)

Handler = Callable[["Peer"], Awaitable[None]]


class Peer:
    """One accepted connection, with helpers to read a request and write raw answers."""

    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.writer = writer

    async def request(self) -> bytes | None:
        """The next request's head (None at EOF), counted on the server."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        self.server.requests.append(head)
        return head

    async def answer(self, body: bytes = b'{"ok":true}', *, extra: bytes = b"") -> None:
        self.writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body
        )  # fmt: skip
        await self.writer.drain()


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.closed_by_client = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.handler(Peer(self, reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()


@asynccontextmanager
async def listening(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[Server, int]]:
    server = Server(handler)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=ssl_context)
    try:
        yield server, listener.sockets[0].getsockname()[1]
    finally:
        listener.close()


@asynccontextmanager
async def serving(handler: Handler, **options: Any) -> AsyncIterator[tuple[Server, HttpClient]]:
    """A scripted server and an ``HttpClient`` (``options``) to it, closed afterwards."""
    async with listening(handler) as (server, port):
        headers = {"Accept": "application/json"}
        async with HttpClient(f"http://127.0.0.1:{port}", headers=headers, **options) as http:
            yield server, http


async def keep_alive(peer: Peer) -> None:
    while await peer.request() is not None:
        await peer.answer()


def answering_after(release: asyncio.Event) -> Handler:
    """A keep-alive server that answers each request only once ``release`` is set."""

    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            await release.wait()
            await peer.answer()

    return handler


async def test_keep_alive_reuses_one_connection_and_sends_the_headers() -> None:
    sent: list[SentRequest] = []
    async with listening(keep_alive) as (server, port):
        async with HttpClient(
            f"http://127.0.0.1:{port}/ignored/path",
            headers={"Accept": "application/json", "companyId": "GB0010001"},
            on_request=sent.append,
        ) as http:
            for i in range(3):
                answer = await http.get(f"/api/x/{i}?a=1", {"X-Correlation-ID": f"c{i}"})
                assert (answer.status_code, answer.content) == (200, b'{"ok":true}')
                assert answer.headers["content-type"] == "application/json"
    assert server.connections == 1
    assert len(server.requests) == 3
    first = server.requests[0].decode()
    assert first.startswith("GET /api/x/0?a=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{port}\r\n" in first
    assert "companyId: GB0010001\r\n" in first and "X-Correlation-ID: c0\r\n" in first
    assert "Accept-Encoding: identity\r\n" in first
    assert [s.url for s in sent] == [f"http://127.0.0.1:{port}/api/x/{i}?a=1" for i in range(3)]
    assert sent[2].headers["X-Correlation-ID"] == "c2"


async def test_connection_close_answer_is_not_reused() -> None:
    per_connection: list[int] = []

    async def close_but_stay(peer: Peer) -> None:
        # says "Connection: close" but keeps the socket open: only the client's own decision
        # can keep it from sending the next request here
        count = 0
        while await peer.request() is not None:
            count += 1
            await peer.answer(extra=b"Connection: close\r\n")
        per_connection.append(count)

    async with serving(close_but_stay, read_timeout=1.0) as (server, http):
        for _ in range(3):
            assert (await http.get("/", {})).status_code == 200
    assert server.connections == 3
    for _ in range(200):  # each handler ends when the client closes its connection
        if len(per_connection) == 3:
            break
        await asyncio.sleep(0.01)
    assert per_connection == [1, 1, 1]


async def test_bytes_after_an_answer_never_become_the_next_answer() -> None:
    async def too_much(peer: Peer) -> None:
        if peer.server.connections == 1:
            await peer.request()  # Content-Length 2, then a whole second answer in the same write
            peer.writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nRetry-After: 7\r\n\r\nEVIL!"
            )
            await peer.reader.read()
            return
        await keep_alive(peer)

    async with serving(too_much) as (server, http):
        first = await http.get("/", {})
        assert (first.content, dict(first.headers)) == (b"ok", {"content-length": "2"})
        second = await http.get("/", {})
        assert second.content == b'{"ok":true}'
    assert server.connections == 2


async def test_trailers_are_not_headers_and_other_framings() -> None:
    async def framings(peer: Peer) -> None:
        if peer.server.connections > 1:
            await keep_alive(peer)
            return
        await peer.request()
        peer.writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nhi\r\n0\r\nRetry-After: 9\r\n\r\n"
        )
        await peer.request()
        peer.writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await peer.request()
        peer.writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold")
        await peer.reader.read()  # kept open, never answering again: reusing it would time out

    async with serving(framings) as (server, http):
        chunked = await http.get("/", {})
        assert chunked.content == b"hi" and "retry-after" not in chunked.headers
        assert (await http.get("/", {})).status_code == 204
        assert (await http.get("/", {})).content == b"old"  # HTTP/1.0: not kept alive
        assert (await http.get("/", {})).status_code == 200  # so this one on a new connection
    assert server.connections == 2


async def test_chunked_and_read_to_close_bodies() -> None:
    async def chunked(peer: Peer) -> None:
        await peer.request()
        peer.writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
        )
        await keep_alive(peer)  # still usable afterwards

    async def to_close(peer: Peer) -> None:
        await peer.request()
        peer.writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await peer.writer.drain()

    async with serving(chunked) as (server, http):
        assert (await http.get("/", {})).content == b"hello world"
        assert (await http.get("/", {})).content == b'{"ok":true}'
    assert server.connections == 1
    async with serving(to_close) as (_, http):
        assert (await http.get("/", {})).content == b"all of it"


async def test_interim_answer_is_skipped_and_gzip_decoded() -> None:
    async def interim_then_gzip(peer: Peer) -> None:
        await peer.request()
        body = gzip.compress(b'{"zipped":1}')
        peer.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await peer.answer(body, extra=b"Content-Encoding: gzip\r\n")
        await peer.request()
        await peer.answer(b"not gzip", extra=b"Content-Encoding: gzip\r\n")

    async with serving(interim_then_gzip) as (_, http):
        answer = await http.get("/", {})
        assert (answer.status_code, answer.content) == (200, b'{"zipped":1}')
        with pytest.raises(UnreadableBody):
            await http.get("/", {})


async def test_a_kept_alive_connection_the_server_closed_is_retried_once_on_a_new_one() -> None:
    async def one_answer_then_close(peer: Peer) -> None:
        await peer.request()
        await peer.answer()  # keep-alive allowed, but the server closes after it anyway
        await peer.request()  # the client's next request arrives (or EOF): close unanswered

    async with serving(one_answer_then_close) as (server, http):
        assert (await http.get("/1", {})).status_code == 200
        await asyncio.sleep(0)  # (whether the close is seen before the next send or not)
        assert (await http.get("/2", {})).status_code == 200
    assert server.connections == 2


async def test_a_fresh_connection_closed_without_answer_fails_without_retry() -> None:
    async def hang_up(peer: Peer) -> None:
        await peer.request()

    async with serving(hang_up) as (server, http):
        with pytest.raises(Disconnected):
            await http.get("/", {})
    assert server.connections == 1 and len(server.requests) == 1


async def test_an_answer_cut_short_is_not_retried() -> None:
    async def partial_then_close(peer: Peer) -> None:
        while await peer.request() is not None:
            if len(peer.server.requests) == 1:
                await peer.answer()
            else:
                peer.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
                await peer.writer.drain()
                return

    async with serving(partial_then_close) as (server, http):
        await http.get("/", {})
        with pytest.raises(Disconnected):
            await http.get("/", {})  # on the kept-alive connection, but bytes came back
    assert len(server.requests) == 2


async def test_read_timeout_closes_the_connection() -> None:
    async def stall(peer: Peer) -> None:
        await peer.request()
        await peer.reader.read()  # until the client closes
        peer.server.closed_by_client.set()

    async with serving(stall, read_timeout=0.2) as (server, http):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ReadTimeout):
            await http.get("/", {})
        assert 0.15 < loop.time() - started < 2.0
        await asyncio.wait_for(server.closed_by_client.wait(), 2.0)


async def test_cancelled_request_closes_its_connection_and_it_is_not_reused() -> None:
    started = asyncio.Event()

    async def slow_then_keep_alive(peer: Peer) -> None:
        if peer.server.connections == 1:
            await peer.request()
            started.set()
            await peer.reader.read()
            peer.server.closed_by_client.set()
            return
        await keep_alive(peer)

    async with serving(slow_then_keep_alive) as (server, http):
        task = asyncio.create_task(http.get("/", {}))
        await asyncio.wait_for(started.wait(), 2.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed_by_client.wait(), 2.0)
        assert (await http.get("/", {})).status_code == 200
    assert server.connections == 2


async def test_malformed_and_oversized_answers() -> None:
    async def garbage(peer: Peer) -> None:
        await peer.request()
        peer.writer.write(b"SMTP ready\r\n\r\n")
        await peer.writer.drain()
        await peer.reader.read()

    async def huge(peer: Peer) -> None:
        await peer.request()
        await peer.answer(b"x" * 5000)

    async with serving(garbage) as (_, http):
        with pytest.raises(MalformedAnswer):
            await http.get("/", {})
    async with serving(huge, max_body=4096) as (_, http):
        with pytest.raises(UnreadableBody):
            await http.get("/", {})


async def test_pool_limits_connections_and_times_out_waiting() -> None:
    release = asyncio.Event()
    slow = answering_after(release)
    async with serving(slow, max_connections=2, pool_timeout=1.0) as (server, http):
        waiting = [asyncio.create_task(http.get("/", {})) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(PoolTimeout):
            await http.get("/", {})
        late = [asyncio.create_task(http.get("/", {})) for _ in range(3)]
        await asyncio.sleep(0.05)
        release.set()
        answers = await asyncio.gather(*waiting, *late)
        assert [a.status_code for a in answers] == [200] * 5
    assert server.most_open == 2


async def test_connect_failures() -> None:
    async with listening(keep_alive) as (_, port):
        pass  # closed: nothing listens on the port any more
    async with HttpClient(f"http://127.0.0.1:{port}", headers={}) as http:
        with pytest.raises(ConnectionFailed):
            await http.get("/", {})

    # TCP is accepted but TLS never answered: the connect (TCP + TLS) times out.
    async def silent(peer: Peer) -> None:
        await peer.reader.read()

    async with listening(silent) as (server, port):
        url = f"https://127.0.0.1:{port}"
        async with HttpClient(url, headers={}, connect_timeout=0.3) as http:
            started = asyncio.get_running_loop().time()
            with pytest.raises(ConnectTimeout):
                await http.get("/", {})
            assert asyncio.get_running_loop().time() - started < 3.0
    assert server.connections == 1


async def test_a_slot_is_released_after_every_failure() -> None:
    async def misbehave(peer: Peer) -> None:
        await peer.request()
        number = peer.server.connections
        if number == 1:
            await peer.reader.read()  # never answers: read timeout
        elif number == 2:
            peer.writer.write(b"garbage\r\n\r\n")  # malformed
            await peer.reader.read()
        elif number == 3:
            await peer.answer(b"not gzip", extra=b"Content-Encoding: gzip\r\n")
        elif number == 4:
            await peer.answer(gzip.compress(b"{}")[:-4], extra=b"Content-Encoding: gzip\r\n")
        else:
            await peer.answer()
            await keep_alive(peer)

    options = {"max_connections": 1, "pool_timeout": 0.5, "read_timeout": 0.3}
    async with serving(misbehave, **options) as (server, http):
        for error in (ReadTimeout, MalformedAnswer, UnreadableBody, UnreadableBody):
            with pytest.raises(error):
                await http.get("/", {})
        assert (await http.get("/", {})).status_code == 200  # the one slot is free again
        assert server.connections == 5


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("ftp://host", {}),
        ("http://user:secret@host", {}),
        ("http://host", {"X-Bad": "a\r\nInjected: 1"}),
        ("http://host", {"X(Bad)": "1"}),
        ("http://host", {"X-Bad": "nul\x00"}),
        ("http://host", {"X-Bad": "not latin-1 \u20ac"}),
    ],
)
def test_bad_urls_and_headers_are_refused(url: str, headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        HttpClient(url, headers=headers)


async def test_header_injection_in_a_request_is_refused() -> None:
    async with serving(keep_alive) as (server, http):
        with pytest.raises(ValueError):
            await http.get("/", {"X-Correlation-ID": "a\r\nInjected: 1"})
        for target in ("/a b", "/a#frag", "/tab\there", "/caf\u00e9", "relative"):
            with pytest.raises(ValueError):
                await http.get(target, {})
    assert server.requests == []


async def test_a_server_that_acts_then_hangs_up_is_not_sent_the_request_twice() -> None:
    async def act_then_hang_up(peer: Peer) -> None:
        await peer.request()
        await peer.answer()
        await peer.request()  # the second request, on the kept-alive connection
        await asyncio.sleep(0.6)  # works on it, then closes without a byte: not a stale close
        peer.writer.close()

    async with serving(act_then_hang_up) as (server, http):
        await http.get("/", {})
        with pytest.raises(Disconnected):
            await http.get("/", {})
    assert len(server.requests) == 2 and server.connections == 1


async def test_the_authorization_header_is_sent_but_not_shown() -> None:
    sent: list[SentRequest] = []
    async with listening(keep_alive) as (server, port):
        headers = {"Authorization": "Basic c2VjcmV0"}
        async with HttpClient(
            f"http://127.0.0.1:{port}", headers=headers, on_request=sent.append
        ) as http:
            await http.get("/", {})
    assert "Authorization: Basic c2VjcmV0\r\n" in server.requests[0].decode()
    assert sent[0].headers["Authorization"] == "***"


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def test_https_verifies_the_server_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    async with listening(keep_alive, server_tls) as (server, port):
        url = f"https://127.0.0.1:{port}"
        trust = ssl.create_default_context(cafile=str(cert))
        async with HttpClient(url, headers={}, ssl_context=trust) as trusting:
            assert (await trusting.get("/", {})).status_code == 200
            assert (await trusting.get("/", {})).status_code == 200
        async with HttpClient(url, headers={}) as default:  # system CAs only
            with pytest.raises(ConnectionFailed):
                await default.get("/", {})
        other_name = f"https://localhost:{port}"  # trusted certificate, not for this name
        async with HttpClient(other_name, headers={}, ssl_context=trust) as wrong_host:
            with pytest.raises(ConnectionFailed):
                await wrong_host.get("/", {})
    assert len(server.requests) == 2


async def test_a_request_waiting_for_a_slot_is_not_sent_after_aclose() -> None:
    release = asyncio.Event()
    slow = answering_after(release)
    async with serving(slow, max_connections=1) as (server, http):
        first = asyncio.create_task(http.get("/1", {}))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(http.get("/2", {}))
        await asyncio.sleep(0.05)
        await http.aclose()
        release.set()
        assert (await first).status_code == 200
        with pytest.raises(RuntimeError, match="closed"):
            await waiting
    assert len(server.requests) == 1
