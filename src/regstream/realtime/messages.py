"""The wire contract: channel names, update messages and SSE frames, encoded once.

Update messages keep the seed's fields (``registrationId``, ``status``, ``timestamp`` in ms,
``stage``, ``message``, ``details``, ``processLog``) and add ``seq`` (per registration, 1, 2, 3 ...
without gaps), ``stageStatus``, ``final`` and ``eventId`` (added by the publish script, see
``publisher``). ``stage_update`` and ``final_update`` are the only places that build them, and they
check the statuses (``ValueError`` naming the bad value and the allowed ones).

Event ids are ``<epoch>_<stream id>``: the epoch changes when Redis loses its history (flush, new
server), so an id from an older epoch is recognisably meaningless; the stream id (``ms-n``) is
the Redis Stream entry id, which orders every update of the channel.

SSE frames are bytes. An update frame embeds the published JSON unchanged (no re-serialisation on
the hot path); JSON never contains a raw newline, so it is a single ``data:`` line.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, NamedTuple

import orjson

from regstream.domain.enums import RegistrationStatus, StageStatus


class ServiceChannel(StrEnum):
    REGISTRATION_UPDATES = "service:registration-updates"


HISTORY_SUFFIX = ":history"
EPOCH_SUFFIX = ":epoch"
# the per-registration index of the history (``history``): its state hash, and the prefix of
# one capped list of entry ids per registration (``<channel>:history:r:<epoch>:<registrationId>``)
INDEX_SUFFIX = ":history:index"
INDEX_KEY_SUFFIX = ":history:r:"
# the replication id of the primary the epoch belongs to (publisher.check_primary)
PRIMARY_SUFFIX = ":primary"
PROBE_PREFIX = "regstream:probe:"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class EventKey(NamedTuple):
    """A comparable event id: ``(epoch, ms, n)``."""

    epoch: str
    ms: int
    n: int

    @property
    def stream_id(self) -> str:
        return f"{self.ms}-{self.n}"

    def __str__(self) -> str:
        return f"{self.epoch}_{self.ms}-{self.n}"


def _digits(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes ``²`` and other digits ``int`` refuses."""
    return text.isascii() and text.isdigit()


def parse_event_id(value: str | None) -> EventKey | None:
    """Parse ``<epoch>_<ms>-<n>``; anything else is None (treated as unknown by callers)."""
    if not value or len(value) > 80:
        return None
    text = value.strip()
    epoch, sep, stream_id = text.partition("_")
    ms, sep2, n = stream_id.partition("-")
    # (every received message's id passes here: ``_digits`` of each part, one isascii for all)
    if sep and sep2 and text.isascii() and epoch.isdigit() and ms.isdigit() and n.isdigit():
        return EventKey(epoch, int(ms), int(n))
    return None


def parse_resume_id(value: str | None) -> tuple[EventKey | None, int]:
    """A client's last event id: an update's id, or a snapshot's ``<event id>~<seq>``.

    A snapshot is positioned by the newest event read before it *and* the registration's seq it
    contains; resuming from it replays the history after the event, skipping seqs the snapshot
    already held. Returns ``(key, seq_floor)``; an unreadable id gives ``(None, 0)``.
    """
    if not value:
        return None, 0
    head, sep, tail = value.partition("~")
    key = parse_event_id(head)
    if key is None or (sep and not _digits(tail)) or len(tail) > 16:
        return None, 0
    return key, int(tail) if sep else 0


def snapshot_id(position: EventKey, seq: int) -> str:
    return f"{position}~{seq}"


# --- update messages ---------------------------------------------------------------------------
#
# The two kinds of update, built only here (the runner, the catch-up and ``RegistrationPubSub``
# call these). Field by field, as README "Messages and frames" lists them:
#   stage update: registrationId, status ("PENDING"), timestamp, stage, stageStatus, message,
#                 details (only when the step has some), seq
#   final:        registrationId, status (a final status), timestamp, message, details (always;
#                 {} when none), processLog (when given), seq, final (true); never a stage
# ``seq`` is left out when the caller has none (the publish script numbers such a message);
# ``eventId`` is added by the publish script. ``registrationId`` comes first: the script reads
# it from the message's first bytes.

#: a stage's state, as the seed's ``publishStageUpdate`` takes it
STAGE_STATUSES: tuple[str, ...] = tuple(s.value for s in StageStatus)
#: the status a final update ends a run with
FINAL_STATUSES: tuple[str, ...] = tuple(s.value for s in RegistrationStatus if s.is_terminal)
#: the status every stage update carries (the registration is PENDING while it runs)
RUNNING_STATUS: str = RegistrationStatus.PENDING.value


def stage_update(
    registration_id: int,
    stage: str,
    stage_status: str,
    message: str,
    *,
    seq: int | None = None,
    timestamp: int | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A stage's progress. Raises ``ValueError`` for a stage status not in ``STAGE_STATUSES``."""
    _check_id(registration_id)
    if not isinstance(stage, str) or not stage:
        raise ValueError(f"stage must be a non-empty string, not {stage!r}")
    _check_status("stage status", stage_status, STAGE_STATUSES)
    update: dict[str, Any] = {
        "registrationId": registration_id,
        "status": RUNNING_STATUS,
        "timestamp": now_ms() if timestamp is None else timestamp,
        "stage": stage,
        "stageStatus": stage_status,
        "message": message,
    }
    if details:
        update["details"] = dict(details)
    if seq is not None:
        update["seq"] = seq
    return update


def final_update(
    registration_id: int,
    status: str,
    message: str,
    *,
    seq: int | None = None,
    timestamp: int | None = None,
    details: Mapping[str, Any] | None = None,
    process_log: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The end of a run. Raises ``ValueError`` for a status not in ``FINAL_STATUSES``."""
    _check_id(registration_id)
    _check_status("final status", status, FINAL_STATUSES)
    update: dict[str, Any] = {
        "registrationId": registration_id,
        "status": status,
        "timestamp": now_ms() if timestamp is None else timestamp,
        "message": message,
        "details": dict(details) if details else {},
    }
    if process_log is not None:
        update["processLog"] = process_log
    if seq is not None:
        update["seq"] = seq
    update["final"] = True
    return update


def process_log_entry(
    *,
    seq: int,
    stage: str | None,
    status: str,
    message: str,
    timestamp: int,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One entry of a final update's ``processLog`` (and of the API's): ``status`` is the
    stage's state (``started``/``completed``/``failed``), or the final status."""
    entry: dict[str, Any] = {
        "seq": seq,
        "stage": stage,
        "status": status,
        "message": message,
        "timestamp": timestamp,
    }
    if details:
        entry["details"] = dict(details)
    return entry


def check_update(update: Mapping[str, Any]) -> None:
    """Check an update built elsewhere (the seed's ``publishUpdate``) like the builders do: a
    stage update (it names a ``stage``) carries status PENDING and a known ``stageStatus``; any
    other is a final and carries a final status."""
    if not isinstance(update, Mapping):
        raise TypeError(f"an update is a JSON object (a dict), not {type(update).__name__}")
    _check_id(update.get("registrationId"))
    if update.get("stage") is not None:
        _check_status("stage update status", update.get("status"), (RUNNING_STATUS,))
        if "stageStatus" in update:
            _check_status("stage status", update["stageStatus"], STAGE_STATUSES)
    else:
        _check_status("final status", update.get("status"), FINAL_STATUSES)


def _check_id(registration_id: object) -> None:
    if not isinstance(registration_id, int) or isinstance(registration_id, bool):
        raise TypeError(f"registrationId must be an int, not {registration_id!r}")


def _check_status(what: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of: {', '.join(allowed)}")


def encode(update: dict[str, Any]) -> bytes:
    return orjson.dumps(update)


class Parsed(NamedTuple):
    """What the hub needs from a received message, parsed once."""

    raw: bytes
    registration_id: int | None
    seq: int | None
    timestamp_ms: int | None
    key: EventKey | None
    resync: tuple[int, ...] | None = None  # a publisher outbox overflowed: re-sync these


def parse_message(raw: bytes) -> Parsed | None:
    """Parse a channel message; None when it is not a JSON object (ignored, counted by caller).

    Every message the instance receives passes here once (``broker``): one ``orjson.loads``,
    five lookups, positional tuples."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    if b"\n" in raw or b"\r" in raw:  # pretty-printed by some other publisher: one line please
        raw = orjson.dumps(obj)
    get = obj.get
    if get("type") == "resync":
        ids = get("registrationIds")
        valid = tuple(i for i in ids if isinstance(i, int)) if isinstance(ids, list) else ()
        return Parsed(raw, None, None, None, None, valid)  # a publisher outbox overflowed
    rid = get("registrationId")
    seq = get("seq")
    ts = get("timestamp")
    eid = get("eventId")
    return Parsed(
        raw,
        rid if type(rid) is int else None,  # (not a bool)
        seq if isinstance(seq, int) else None,
        ts if isinstance(ts, int) else None,
        parse_event_id(eid) if isinstance(eid, str) else None,
    )


def with_event_id(raw: bytes, key: EventKey) -> bytes:
    """Add ``eventId`` to a stored JSON object (same splice the publish script does)."""
    return raw[:-1] + b',"eventId":"' + str(key).encode() + b'"}'


# --- SSE frames --------------------------------------------------------------------------------


def update_frame(parsed: Parsed, event_id: str | None = None) -> bytes:
    """An update's frame, with its own id or ``event_id`` (a position: ``positions.py``)."""
    if event_id is not None:
        head = b"id: " + event_id.encode() + b"\n"
    else:
        head = b"id: " + str(parsed.key).encode() + b"\n" if parsed.key else b""
    return head + b'data: {"type":"update","data":' + parsed.raw + b"}\n\n"


def control_frame(kind: str, **fields: Any) -> bytes:
    body: dict[str, Any] = {"type": kind, "timestamp": now_ms()}
    body.update(fields)
    return b"data: " + orjson.dumps(body) + b"\n\n"


def snapshot_frame(
    data: dict[str, Any] | None, *, resync: bool = False, event_id: str | None = None
) -> bytes:
    body: dict[str, Any] = {"type": "snapshot", "timestamp": now_ms()}
    if data is not None:
        body["data"] = data
    if resync:
        body["resync"] = True
    head = b"id: " + event_id.encode() + b"\n" if event_id else b""
    return head + b"data: " + orjson.dumps(body) + b"\n\n"


def retry_frame(retry_ms: int) -> bytes:
    return b"retry: %d\n\n" % retry_ms


def chunk(frame: bytes) -> bytes:
    """HTTP/1.1 chunked-transfer framing of one frame (for direct transport writes)."""
    return b"%x\r\n%b\r\n" % (len(frame), frame)
