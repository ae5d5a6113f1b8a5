"""A model client for soak and fault tests: follows registrations through disconnects.

It keeps, per registration, the ordered list of ``seq`` it has seen, and counts duplicates and
gaps. A ``snapshot`` frame resets that registration to the snapshot's process log; a
``resync`` marker makes it re-read its registrations from the API (as the browser module does),
after which updates it already has are ignored as covered (counted apart, not as duplicates).
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class View:
    seqs: list[int] = field(default_factory=list)
    stages: list[tuple[str, str]] = field(default_factory=list)
    status: str | None = None


@dataclass
class Viewer:
    base_url: str
    headers: dict[str, str]
    registration_id: int | None = None
    views: dict[int, View] = field(default_factory=dict)
    last_id: str | None = None
    duplicates: int = 0
    gaps: int = 0
    covered: int = 0
    snapshots: int = 0
    resyncs: int = 0
    connections: int = 0
    drops: int = 0
    needs_resync: bool = False
    resync_position: str | None = None
    resync_floor: dict[int, int] = field(default_factory=dict)

    def apply(self, frame: dict[str, Any], event_id: str | None) -> None:
        kind = frame.get("type")
        if kind == "connected" and self.last_id is None and frame.get("lastEventId"):
            self.last_id = frame["lastEventId"]  # the stream's start position
        elif kind == "update":
            self._update(frame["data"])
            if event_id:
                self.last_id = event_id
        elif kind == "snapshot":
            self.snapshots += 1
            if event_id and not frame.get("resync"):
                self.last_id = event_id
            elif event_id:
                self.resync_position = event_id  # taken once the re-read from the API is done
            data = frame.get("data")
            if frame.get("resync"):
                self.resyncs += 1
                self.needs_resync = True
            elif data:
                self._reset(data)

    def _reset(self, data: dict[str, Any]) -> None:
        view = View()
        for entry in data.get("processLog", []):
            view.seqs.append(entry["seq"])
            if entry.get("stage"):
                view.stages.append((entry["stage"], entry["status"]))
        if not data.get("inProgress"):
            view.status = data["status"] if data["status"] != "PENDING" else None
        self.views[data["id"]] = view

    def _update(self, update: dict[str, Any]) -> None:
        view = self.views.setdefault(update["registrationId"], View())
        seq = update["seq"]
        last = view.seqs[-1] if view.seqs else 0
        if seq <= last:
            if seq <= self.resync_floor.get(update["registrationId"], 0):
                self.covered += 1  # the re-read from the API already had it
            else:
                self.duplicates += 1
            return
        if seq != last + 1 and not (last == 0 and not view.seqs and seq == 1):
            if view.seqs or seq != 1:
                self.gaps += 1
        view.seqs.append(seq)
        if update.get("stage"):
            view.stages.append((update["stage"], update["stageStatus"]))
        if update.get("final"):
            view.status = update["status"]

    async def resync(self, http: httpx.AsyncClient, rids: list[int]) -> None:
        for rid in rids:
            data = (await http.get(f"/api/registrations/{rid}")).json()
            if data["seq"]:
                self._reset(data)
                self.resync_floor[rid] = data["seq"]
        self.needs_resync = False
        if self.resync_position:
            self.last_id, self.resync_position = self.resync_position, None

    async def session(self, duration: float, rids: list[int]) -> None:
        """One connection: open (resuming), read for ``duration`` seconds, drop."""
        params = {"registrationId": str(self.registration_id)} if self.registration_id else {}
        headers = dict(self.headers)
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        self.needs_resync = False
        async with httpx.AsyncClient(base_url=self.base_url, timeout=httpx.Timeout(10, read=None),
                                     headers=self.headers) as http:  # fmt: skip
            try:
                async with asyncio.timeout(None) as budget:
                    async with http.stream("GET", "/api/registrations/updates/stream", params=params,
                                           headers=headers) as response:  # fmt: skip
                        assert response.status_code == 200, response.status_code
                        self.connections += 1
                        # the reading time starts once connected (connecting under load is slow)
                        budget.reschedule(asyncio.get_running_loop().time() + duration)
                        buffer = ""
                        async for text in response.aiter_text():
                            buffer += text
                            while "\n\n" in buffer:
                                block, buffer = buffer.split("\n\n", 1)
                                event_id, data = None, []
                                for line in block.split("\n"):
                                    if line.startswith("id:"):
                                        event_id = line[3:].strip()
                                    elif line.startswith("data:"):
                                        data.append(line[5:].lstrip())
                                if data:
                                    self.apply(json.loads("\n".join(data)), event_id)
                                if self.needs_resync:
                                    # a person's page re-reads to the end; no read budget here
                                    budget.reschedule(None)
                                    await self.resync(http, rids)
                                    budget.reschedule(asyncio.get_running_loop().time() + duration)
            except TimeoutError:
                pass
            except httpx.TransportError:
                self.drops += 1  # the server ended the stream (cut off as slow, restarted…)

    async def run(
        self, rids: list[int], until: asyncio.Event, deadline: float, rng: random.Random
    ) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            finished = until.is_set()
            await self.session(rng.uniform(0.05, 0.8) if not finished else 1.5, rids)
            if finished and self.complete(rids):
                return
            await asyncio.sleep(rng.uniform(0, 0.3))

    def complete(self, rids: list[int]) -> bool:
        return all(rid in self.views and self.views[rid].status for rid in rids)
