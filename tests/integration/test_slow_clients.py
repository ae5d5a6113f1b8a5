"""A client that stops reading is cut off after a bounded buffer; the others keep up (on both
write paths: taken over from uvicorn, or the portable queued path; ``api/takeover.py``)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from tests.conftest import SettingsFactory
from tests.support import (
    StreamClient,
    auth_headers,
    metric_value,
    on_write_path,
    serve_app,
    wait_until,
)


def _cut_count() -> float:
    return metric_value("regstream_sse_slow_clients_cut_total")


@pytest.mark.parametrize(
    ("stream_path", "settled"),
    [("transport", False), ("transport", True), ("queued", False)],
    ids=["checked", "direct", "queued"],
)
async def test_stalled_stream_is_cut_and_others_get_everything(
    make_settings: SettingsFactory, stream_path: str, settled: bool
) -> None:
    """``direct``: both streams settle after the first update (the hub then writes to them
    unchecked and the transport's high-water mark enforces the limit); ``checked``: the flood
    goes on at once; ``queued``: the portable path (a queued stream never settles)."""
    fast = stream_path == "transport"
    with serve_app(make_settings(sse_max_buffer_bytes=32 * 1024, stream_fast_path=fast)) as live:
        headers = auth_headers(live, "admin")
        port = int(live.url.rsplit(":", 1)[1])
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(
            b"GET /api/registrations/updates/stream HTTP/1.1\r\nHost: t\r\n"
            + f"Authorization: {headers['Authorization']}\r\n\r\n".encode()
        )
        before = _cut_count()
        try:
            async with StreamClient(live.url, headers=headers) as healthy:
                hub = live.services.hub
                if not settled:  # keep both streams on the checked path whatever the timer does
                    hub._settle = lambda stream: None  # noqa: SLF001
                await wait_until(lambda: len(hub) == 2, what="both streams attached")
                await wait_until(lambda: on_write_path(live, stream_path), what=stream_path)
                padding = "x" * 2000

                def received(n: int) -> Callable[[object], bool]:
                    return lambda _frames: len(healthy.updates()) >= n

                # ~1.3 MB for the stalled client: far past kernel (SO_SNDBUF 64 KiB on a taken-over
                # stream) + our buffer. The queued path cannot size the kernel's buffer (no
                # socket through ASGI): autotuned up to tcp_wmem's 4 MiB, filled first
                most = 600 if fast else 3000
                count = most
                for i in range(most):
                    await live.call(live.services.publisher.publish_update(
                        {"registrationId": 1, "status": "PENDING", "timestamp": 0, "seq": i + 1,
                         "message": "load", "stage": "duplicate_check", "pad": padding}
                    ))  # fmt: skip
                    if i % 10 == 9:  # the healthy reader (a thread of this process, under the
                        # GIL with the server) may lag, but never by the ~96 KB that cuts a stream
                        await healthy.wait_for(received(i - 10), timeout=20,
                                               what="the healthy client keeping up")  # fmt: skip
                        if not fast and _cut_count() > before:
                            count = i + 1
                            break
                    if settled and i == 0:  # past its start-up position, a stream settles
                        await wait_until(
                            lambda: len(hub._direct) == 2,  # noqa: SLF001
                            timeout=10, what="both streams direct (the timer ticks every 1 s)",
                        )  # fmt: skip
                await wait_until(
                    lambda: _cut_count() > before, timeout=20, what="the stalled stream cut"
                )
                await wait_until(
                    lambda: len(live.services.hub) == 1, what="stalled stream detached"
                )
                assert len(hub._direct) == (1 if settled else 0)  # noqa: SLF001 - the healthy one
                await healthy.wait_for(lambda fs: len(healthy.updates()) == count, timeout=20,
                                       what="every update at the healthy client")  # fmt: skip
                assert [u["seq"] for u in healthy.updates()] == list(range(1, count + 1))
        finally:
            stalled.close()
