"""The stream's write path (``api/takeover.py``): the fast path taken with the tested versions,
the portable path when told, and every stream counted by the service's limit and shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket

import httpx
import pytest
from prometheus_client import REGISTRY

from regstream.api.takeover import TESTED, installed_versions
from tests.conftest import SettingsFactory
from tests.support import StreamClient, auth_headers, on_write_path, serve_app, wait_until

STREAM = "/api/registrations/updates/stream"


def _path_metric(path: str) -> float | None:
    return REGISTRY.get_sample_value("regstream_sse_stream_write_path", {"path": path})


def test_the_installed_versions_are_the_tested_ones() -> None:
    """Fails when pyproject.toml allows versions the take-over was not tested with (the fast path
    is then never taken: the ``transport`` case below fails too)."""
    versions = installed_versions()
    assert all(versions[name] in tested for name, tested in TESTED.items()), (
        f"installed {versions}, the take-over was tested with {TESTED}: run the stream tests on "
        "both paths with these versions, then add them to TESTED and pyproject.toml"
    )


async def test_the_write_path_is_said_counted_and_taken(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture, stream_path: str
) -> None:
    """``transport``: with the tested versions, streams are taken over; ``queued``: when told
    (REGSTREAM_STREAM_FAST_PATH=false), every stream is on the portable path."""
    fast = stream_path == "transport"
    caplog.set_level(logging.INFO, logger="regstream.api.takeover")
    with serve_app(make_settings(stream_fast_path=fast)) as live:
        said = f"streams are written on the {stream_path} path"
        assert (said if fast else f"{said}: REGSTREAM_STREAM_FAST_PATH=false") in caplog.text
        assert (_path_metric("transport"), _path_metric("queued")) == (float(fast), float(not fast))
        async with StreamClient(live.url, headers=auth_headers(live, "admin")):
            await wait_until(lambda: on_write_path(live, stream_path), what=stream_path)


async def test_another_http_protocol_falls_back_per_request(
    make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Decided for the fast path, served by uvicorn's h11 protocol: queued, said once."""
    caplog.set_level(logging.INFO, logger="regstream.api.takeover")
    with serve_app(make_settings(), http="h11") as live:
        assert _path_metric("transport") == 1.0
        headers = auth_headers(live, "admin")
        async with StreamClient(live.url, headers=headers), StreamClient(live.url, headers=headers):
            await wait_until(lambda: len(live.services.hub) == 2, what="two streams")
            assert on_write_path(live, "queued")
        assert (_path_metric("transport"), _path_metric("queued")) == (0.0, 1.0)
        assert caplog.text.count("streams fall back to the queued path") == 1


async def test_every_stream_counts_against_the_stream_limit(
    make_settings: SettingsFactory, stream_path: str
) -> None:
    """uvicorn forgets a taken-over connection; SSE_MAX_STREAMS still counts it, until it ends."""
    settings = make_settings(sse_max_streams=2, stream_fast_path=stream_path == "transport")
    with serve_app(settings) as live:
        headers = auth_headers(live, "admin")
        async with (
            StreamClient(live.url, headers=headers),
            httpx.AsyncClient(base_url=live.url, headers=headers, timeout=10) as http,
        ):
            async with StreamClient(live.url, headers=headers):
                await wait_until(lambda: len(live.services.hub) == 2, what="two streams")
                await wait_until(lambda: on_write_path(live, stream_path), what=stream_path)
                third = await http.get(STREAM)
                assert third.status_code == 503 and third.json()["message"] == "too many streams"
            await wait_until(lambda: len(live.services.hub) == 1, what="one stream left")
            async with StreamClient(live.url, headers=headers):  # its place is free again
                await wait_until(lambda: len(live.services.hub) == 2, what="two streams again")


async def test_shutdown_closes_taken_over_streams_and_waits_for_them(
    make_settings: SettingsFactory,
) -> None:
    """A client that is slow to read its backlog still gets all of it and the end of the stream:
    the server does not exit (closing every socket) while a closed stream has bytes unsent."""
    with serve_app(make_settings(sse_max_buffer_bytes=1 << 20, sse_retry_ms=1000)) as live:
        headers = auth_headers(live, "admin")
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", int(live.url.rsplit(":", 1)[1])))
        slow.settimeout(15)
        try:
            slow.sendall(f"GET {STREAM} HTTP/1.1\r\nHost: t\r\n"
                         f"Authorization: {headers['Authorization']}\r\n\r\n".encode())  # fmt: skip
            await wait_until(lambda: on_write_path(live, "transport"), what="a taken-over stream")
            count, padding = 100, "x" * 2000  # ~200 KB: far more than the kernel buffers hold
            for i in range(count):
                await live.call(live.services.publisher.publish_update(
                    {"registrationId": 1, "status": "PENDING", "timestamp": 0, "seq": i + 1,
                     "message": "load", "stage": "duplicate_check", "pad": padding}
                ))  # fmt: skip
            await wait_until(
                lambda: next(iter(live.services.hub.streams())).unsent() > 64 * 1024,
                what="a backlog in the server's buffer",
            )
            live.server.should_exit = True  # a shutdown without a signal: no drain delay
            await asyncio.sleep(1.5)
            assert live.thread.is_alive(), "the server exited with a stream's bytes unsent"
            received = bytearray()
            while chunk := await asyncio.to_thread(slow.recv, 65536):
                received.extend(chunk)
            await asyncio.to_thread(live.thread.join, 20)
            assert not live.thread.is_alive()  # it ended once the client had read everything
        finally:
            slow.close()
    assert received.count(b'"type":"update"') == count
    assert received.endswith(b"\r\n0\r\n\r\n")  # the chunked stream's end, after
    assert b"retry: " in received[-100:]  # the shutdown's retry hint
