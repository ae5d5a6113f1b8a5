"""The JSON Schema of the stream's frames and update messages, generated from models.

``realtime/messages.py`` builds the messages as plain dicts (the hot path encodes them once);
the TypedDicts here describe those dicts field by field (``tests/unit/test_stream_schema.py``
validates what ``messages`` and ``pipeline.runner`` really build against them), and the schema
published at ``GET /api/schema/stream.json`` (viewer, like ``/openapi.json``) is generated from
them. The JavaScript client (``clients/js``) keeps a copy in ``clients/js/schema/stream.json``
and checks its TypeScript types against it; after a change here run::

    .venv/bin/python -m regstream.api.stream_schema clients/js/schema/stream.json
    (cd clients/js && npm run schema)

``x-regstream`` carries the numbers a client must agree on (registrations per stream, the path).
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired

import orjson
from fastapi import APIRouter, Response
from pydantic import ConfigDict, Field, TypeAdapter
from typing_extensions import TypedDict  # pydantic needs it before Python 3.12

from regstream.api.auth import ViewerPrincipal
from regstream.api.schemas import ProcessLogItem, RegistrationRead
from regstream.api.stream import MAX_IDS, STREAM_PATH
from regstream.domain.enums import RegistrationStatus, Stage, StageStatus

SCHEMA_PATH = "/api/schema/stream.json"
_CLOSED = ConfigDict(extra="forbid")


class RegistrationUpdate(TypedDict):
    """A published update: a stage's progress (``stage``, ``stageStatus``, status PENDING) or
    the final status (``final``, ``details``, ``processLog``). ``seq`` counts a registration's
    updates 1, 2, 3 ... without gaps; ``timestamp`` is in ms; ``eventId`` is the SSE id."""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    registrationId: int
    status: RegistrationStatus
    timestamp: int
    stage: NotRequired[Stage]
    stageStatus: NotRequired[StageStatus]
    message: str
    details: NotRequired[dict[str, Any]]
    processLog: NotRequired[list[ProcessLogItem]]
    seq: int
    final: NotRequired[Literal[True]]
    eventId: NotRequired[str]


class RegistrationSnapshot(RegistrationRead):
    """A registration as the list shows it (masked) plus its latest run's process log."""

    process_log: list[ProcessLogItem]


class ResyncIds(TypedDict):
    """The registrations to re-read from the API."""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    registrationIds: list[int]


class ConnectedFrame(TypedDict):
    """The first frame; ``lastEventId``: where a fresh stream starts (null: empty history)."""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    type: Literal["connected"]
    timestamp: int
    lastEventId: NotRequired[str | None]


class UpdateFrame(TypedDict):
    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    type: Literal["update"]
    data: RegistrationUpdate


class PingFrame(TypedDict):
    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    type: Literal["ping"]
    timestamp: int


class SnapshotFrame(TypedDict):
    """A registration's state, or ``resync``: re-read from the API (``data.registrationIds``,
    else every registration the stream follows)."""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    type: Literal["snapshot"]
    timestamp: int
    data: NotRequired[RegistrationSnapshot | ResyncIds]
    resync: NotRequired[Literal[True]]


class AuthFrame(TypedDict):
    """The stream's credentials died: the last frame; sign in again."""

    __pydantic_config__ = _CLOSED  # type: ignore[misc]
    type: Literal["auth"]
    timestamp: int
    reason: Literal["revoked", "expired", "forbidden"]


StreamFrame = Annotated[
    ConnectedFrame | UpdateFrame | PingFrame | SnapshotFrame | AuthFrame,
    Field(discriminator="type"),
]
FRAME_ADAPTER: TypeAdapter[Any] = TypeAdapter(StreamFrame)
UPDATE_ADAPTER: TypeAdapter[RegistrationUpdate] = TypeAdapter(RegistrationUpdate)


@cache
def stream_schema() -> dict[str, Any]:
    """The schema document: a frame (``oneOf`` by ``type``) with every shape in ``$defs``."""
    schema: dict[str, Any] = FRAME_ADAPTER.json_schema(by_alias=True, mode="serialization")
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_PATH,
        "title": "StreamFrame",
        "description": "A frame of the registration update stream (one SSE data: line).",
        **schema,
        "x-regstream": {"maxIdsPerStream": MAX_IDS, "streamPath": STREAM_PATH},
    }
    return schema


def schema_bytes() -> bytes:
    return orjson.dumps(stream_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


router = APIRouter()


@router.get(SCHEMA_PATH, include_in_schema=False)
async def stream_schema_document(_: ViewerPrincipal) -> Response:
    return Response(schema_bytes(), media_type="application/schema+json")


def main(argv: list[str]) -> int:
    """``python -m regstream.api.stream_schema [PATH]``: write the schema (stdout without PATH)."""
    if len(argv) > 1:
        print("usage: python -m regstream.api.stream_schema [PATH]", file=sys.stderr)
        return 2
    if argv:
        Path(argv[0]).write_bytes(schema_bytes())
    else:
        sys.stdout.buffer.write(schema_bytes())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
