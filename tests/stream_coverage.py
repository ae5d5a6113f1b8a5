"""What a stream must have after a failover (Sentinel or Redis Cluster): every ``(registrationId,
seq)`` of the database's process log it follows, received or covered by a re-sync marker or a
snapshot; and exactly one final status per registration in the database."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from regstream.db.tables import ProcessLogEntry
from tests.support import Frame, SseReader, run_in_db, wait_until


@dataclass
class Watched:
    """A stream under test and the registrations it must cover (None: all)."""

    name: str
    reader: SseReader
    rids: set[int] | None
    earlier: list[Frame] = field(default_factory=list)  # frames of its first connection

    @property
    def frames(self) -> list[Frame]:
        return [*self.earlier, *self.reader.frames]


def uncovered(watched: Watched, log: dict[int, list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """``(registrationId, seq)`` of the process log the stream neither received nor was told to
    re-read: a re-sync marker covers what was committed before it (the client re-reads then), a
    filtered snapshot covers its registration up to its seq."""
    received: set[tuple[int, int]] = set()
    resync_at: dict[int | None, int] = {}  # registration (None: all) -> latest marker time
    snapshot_seq: dict[int, int] = {}
    for frame in watched.frames:
        if frame.type == "update":
            update = frame.update
            received.add((update["registrationId"], update["seq"]))
        elif frame.type == "snapshot" and frame.data is not None:
            data = frame.data.get("data") or {}
            if frame.data.get("resync"):
                for rid in data.get("registrationIds") or [None]:
                    resync_at[rid] = max(resync_at.get(rid, 0), int(frame.data["timestamp"]))
            elif "id" in data:
                snapshot_seq[data["id"]] = max(snapshot_seq.get(data["id"], 0), data["seq"])
    missing = []
    for rid, entries in log.items():
        if watched.rids is not None and rid not in watched.rids:
            continue
        marker = max(resync_at.get(rid, 0), resync_at.get(None, 0))
        for seq, at_ms in entries:
            if (rid, seq) in received or seq <= snapshot_seq.get(rid, 0) or at_ms <= marker:
                continue
            missing.append((rid, seq))
    return missing


def process_log(live: Any, rids: list[int]) -> dict[int, list[tuple[int, int]]]:
    async def read(session: Any) -> list[Any]:
        query = select(
            ProcessLogEntry.registration_id, ProcessLogEntry.seq, ProcessLogEntry.stage,
            ProcessLogEntry.timestamp_ms,
        ).where(ProcessLogEntry.registration_id.in_(rids))  # fmt: skip
        return list((await session.execute(query)).all())

    log: dict[int, list[tuple[int, int]]] = {rid: [] for rid in rids}
    for rid, seq, _stage, at_ms in run_in_db(live, read):
        log[rid].append((seq, at_ms))
    return log


def final_rows(live: Any, rids: list[int]) -> dict[int, int]:
    async def read(session: Any) -> list[Any]:
        query = select(ProcessLogEntry.registration_id).where(
            ProcessLogEntry.registration_id.in_(rids), ProcessLogEntry.stage.is_(None)
        )
        return list((await session.execute(query)).scalars())

    counts = dict.fromkeys(rids, 0)
    for rid in run_in_db(live, read):
        counts[rid] += 1
    return counts




async def assert_all_ended_and_covered(
    live: Any, http: Any, rids: list[int], watched: list[Watched], *, timeout: float
) -> None:
    """Wait (bounded) until every run of ``rids`` ended, then until every watched stream holds
    or was told to re-read each of their process log entries; assert so, naming what is
    missing per stream, and exactly one final status per registration in the database."""
    wanted = set(rids)

    async def all_ended() -> bool:
        response = await http.get("/api/registrations", params={"pageSize": 200})
        mine = [row for row in response.json()["items"] if row["id"] in wanted]
        return len(mine) == len(wanted) and not any(row["inProgress"] for row in mine)

    await wait_until(all_ended, timeout=timeout, interval=0.25, what="every run to end")
    log = process_log(live, rids)
    with contextlib.suppress(AssertionError):  # the assert below says what is missing
        await wait_until(lambda: all(not uncovered(w, log) for w in watched), timeout=30,
                         what="every stream complete or re-synced")  # fmt: skip
    missing = {w.name: uncovered(w, log)[:10] for w in watched}
    assert missing == {w.name: [] for w in watched}
    assert final_rows(live, rids) == dict.fromkeys(rids, 1)
