"""The stream guard: per-user cap and closing streams whose credential died."""

from __future__ import annotations

import json
import time

from regstream.auth.principal import Principal, Role
from regstream.auth.streams import StreamGuard
from regstream.realtime.hub import Hub, QueuedStream


def _principal(operator_id: int = 1, **kw: object) -> Principal:
    return Principal(
        operator_id=operator_id, username=f"u{operator_id}", role=Role.VIEWER,
        credential_kind="token", credential_id=operator_id, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _final(stream: QueuedStream) -> dict[str, object]:
    raw = stream._final.decode()
    assert raw.startswith("data: ")
    return dict(json.loads(raw[6:]))


async def test_revoked_principal_stream_gets_an_auth_frame_and_closes() -> None:
    guard = StreamGuard(per_user=5, interval=1.0)
    stream = QueuedStream(1, max_buffer=1024, info=_principal())
    guard.on_tick(stream, 0.0)
    assert stream.closed is False
    stream.info.revoked = "revoked"
    guard.on_tick(stream, 0.0)
    assert stream.closed is True
    assert _final(stream)["type"] == "auth" and _final(stream)["reason"] == "revoked"


async def test_expired_principal_stream_is_closed() -> None:
    guard = StreamGuard(per_user=5, interval=1.0)
    expired = _principal(expires_ms=int(time.time() * 1000) - 1)
    stream = QueuedStream(1, max_buffer=1024, info=expired)
    guard.on_tick(stream, 0.0)
    assert _final(stream)["reason"] == "expired"


async def test_streams_without_a_principal_are_left_alone() -> None:
    guard = StreamGuard(per_user=5, interval=1.0)
    stream = QueuedStream(1, max_buffer=1024, info=None)
    guard.on_tick(stream, 0.0)
    assert stream.closed is False


async def test_per_user_cap_counts_live_streams_only() -> None:
    hub = Hub()
    guard = StreamGuard(per_user=2, interval=1.0)
    first, second = _principal(), _principal()
    streams = [QueuedStream(i, max_buffer=1024, info=p) for i, p in ((1, first), (2, second))]
    for principal, stream in zip((first, second), streams, strict=True):
        assert await guard.admit(principal, hub) is True
        hub.attach(stream)
    assert await guard.admit(_principal(), hub) is False
    assert await guard.admit(_principal(operator_id=2), hub) is True  # another user
    hub.detach(streams[0])
    assert await guard.admit(_principal(), hub) is True


async def test_revoke_closes_matching_streams_now() -> None:
    hub = Hub()
    guard = StreamGuard(per_user=5, interval=1.0)
    mine, other = (
        QueuedStream(1, max_buffer=1024, info=_principal(1)),
        QueuedStream(1, max_buffer=1024, info=_principal(2)),
    )
    hub.attach(mine)
    hub.attach(other)
    assert guard.revoke(hub, lambda p: p.operator_id == 1) == 1
    assert (mine.closed, other.closed) == (True, False)
