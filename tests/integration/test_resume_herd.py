"""Resume herds (issue 15, item 5): separate Redis clients, bounded admission, indexed resumes.

Real Redis (a private server per test), a live server, raw HTTP/1.1 streams.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from prometheus_client import REGISTRY

from regstream.core_banking.simulator.dataset import load_applicant
from regstream.realtime.connections import create_client
from regstream.realtime.embedded import EmbeddedRedis
from regstream.realtime.history import History
from regstream.realtime.messages import EventKey
from regstream.realtime.publisher import RegistrationPubSub
from tests.conftest import SettingsFactory
from tests.support import auth_headers, serve_app, wait_until

STREAM = "/api/registrations/updates/stream"


# --- the index: a filtered resume reads its registration's entries only ---------------------------


async def _publisher(
    redis_server: EmbeddedRedis, **kw: Any
) -> tuple[Any, RegistrationPubSub, History]:
    client = create_client(redis_server.url, name="test-history")
    publisher = RegistrationPubSub(client, **kw)
    return client, publisher, History(client, channel=publisher.channel)


async def _publish(publisher: RegistrationPubSub, rid: int, seq: int) -> None:
    await publisher.publish_stage_update(rid, "t24_lookup", "started", "looking up", seq=seq)


async def _commands(client: Any, name: str) -> int:
    """Calls of one Redis command so far (scripts' calls included)."""
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


async def test_filtered_resume_reads_only_its_registrations_entries(
    redis_server: EmbeddedRedis,
) -> None:
    """5,000 updates of other registrations around 6 of registration 7: the replay after the
    second is its 4 later updates exactly, read from the index (the history is not scanned:
    no XINFO), and equal to the whole history filtered."""
    client, publisher, history = await _publisher(redis_server)
    try:
        start = await history.position()
        rng = random.Random(5)
        ours = sorted(rng.sample(range(5006), 6))
        seq = 0
        for i in range(5006):
            if i in ours:
                seq += 1
                await _publish(publisher, 7, seq)
            else:
                await _publish(publisher, 1000 + i % 500, i)
        assert await publisher.wait_flushed(10)
        everything = await history.since(start)
        mine = [p for p in everything.entries if p.registration_id == 7]
        assert [p.seq for p in mine] == [1, 2, 3, 4, 5, 6]
        after = mine[1].key
        assert after is not None
        await client.config_resetstat()
        replay = await history.since_for(after, (7,))
        assert replay.complete
        assert [p.raw for p in replay.entries] == [p.raw for p in mine[2:]]
        assert await _commands(client, "xinfo") == 0  # the history itself was not read
        # several registrations at once: merged in history order
        two = await history.since_for(start, (7, 1001))
        assert [p.raw for p in two.entries] == [
            p.raw for p in everything.entries if p.registration_id in (7, 1001)
        ]
    finally:
        await publisher.aclose()
        await client.aclose()


async def test_filtered_resume_index_expired_or_history_trimmed(
    redis_server: EmbeddedRedis,
) -> None:
    """Without its index list the replay comes from the history (same entries); once the
    history is trimmed past the client's id, or past an entry the index names, the answer is
    incomplete (a snapshot)."""
    client, publisher, history = await _publisher(redis_server)
    try:
        start = await history.position()
        for seq in range(1, 4):
            await _publish(publisher, 7, seq)
            for i in range(50):
                await _publish(publisher, 2000 + i, seq)
        assert await publisher.wait_flushed(10)
        expected = [p.raw for p in (await history.since(start)).entries if p.registration_id == 7]
        epoch = (await history.position()).epoch
        index_key = f"{publisher.channel}:history:r:{epoch}:7"
        assert await client.exists(index_key) == 1
        assert 0 < await client.pttl(index_key) <= 3_600_000  # it expires (age cap at most)
        await client.delete(index_key)  # as if it had expired
        fallback = await history.since_for(start, (7,))
        assert fallback.complete and [p.raw for p in fallback.entries] == expected
        # a new index list names seq 4 and 5; the history lost seq 5 (trimmed): resuming after
        # seq 4 is incomplete, not an empty replay
        await _publish(publisher, 7, 4)
        await _publish(publisher, 7, 5)
        assert await publisher.wait_flushed(10)
        four, five = [p.key for p in (await history.since(start)).entries if p.seq in (4, 5)]
        assert four is not None and five is not None
        assert (await history.since_for(four, (7,))).complete
        await client.xtrim(
            publisher.history_key, minid=f"{five.ms}-{five.n + 1}", approximate=False
        )
        gone = await history.since_for(four, (7,))
        assert (gone.complete, gone.entries) == (False, [])
        await client.xtrim(publisher.history_key, maxlen=10, approximate=False)
        trimmed = await history.since_for(start, (7,))
        assert (trimmed.complete, trimmed.entries) == (False, [])
        other_epoch = await history.since_for(EventKey("1", start.ms, start.n), (7,))
        assert (other_epoch.complete, other_epoch.entries) == (False, [])
    finally:
        await publisher.aclose()
        await client.aclose()


async def test_entries_of_a_publisher_that_does_not_index_are_found(
    redis_server: EmbeddedRedis,
) -> None:
    """A rolling upgrade: an older instance adds updates to the history without indexing them,
    before and after this version's batches; a filtered replay still has every one, in order."""
    client, publisher, history = await _publisher(redis_server)
    try:
        start = await history.position()

        async def old_version_publishes(seq: int) -> None:
            body = json.dumps({"registrationId": 7, "seq": seq, "status": "PENDING"})
            await client.xadd(publisher.history_key, {"m": body.replace(" ", "")})

        async def this_version_publishes(rid: int, seq: int) -> None:
            await _publish(publisher, rid, seq)
            assert await publisher.wait_flushed(10)

        await this_version_publishes(7, 1)
        await old_version_publishes(2)
        await this_version_publishes(8, 1)
        await this_version_publishes(7, 3)
        await old_version_publishes(4)  # after this version's last batch
        replay = await history.since_for(start, (7,))
        assert replay.complete
        assert [p.seq for p in replay.entries] == [1, 2, 3, 4]
        resync = b'{"type":"resync","registrationIds":[7,9],"timestamp":1}'
        await publisher.publish_raw(resync)
        assert await publisher.wait_flushed(10)
        again = await history.since_for(start, (7,))
        assert again.entries[-1].resync == (7, 9)  # the stream turns this into a snapshot
        # a resync naming many registrations is not copied into each index: found in the history
        many = list(range(1000, 1150))
        await publisher.publish_raw(orjson.dumps({"type": "resync", "registrationIds": many}))
        await this_version_publishes(1100, 1)
        found = await history.since_for(start, (1100,))
        assert [(p.resync is not None, p.seq) for p in found.entries] == [(True, None), (False, 1)]
        epoch = (await history.position()).epoch
        index = await client.lrange(f"{publisher.channel}:history:r:{epoch}:1100", 0, -1)
        assert len(index) == 1  # its own update only
    finally:
        await publisher.aclose()
        await client.aclose()


# --- a live server: readiness and publishing never wait for resumes -------------------------------


async def test_readiness_and_publishing_do_not_wait_for_resume_connections(
    make_settings: SettingsFactory,
) -> None:
    """Every connection of the resume pool held (as by a herd of slow history reads): /readyz
    still answers 200 at once and updates are still published. With one shared pool both
    waited for a free connection (readiness failed after 2 s)."""
    with serve_app(make_settings(resume_concurrency=2)) as live:
        pool = live.services.bus.histories[0].redis.connection_pool

        async def hold() -> list[Any]:
            return [await pool.get_connection() for _ in range(pool.max_connections)]

        held = await live.call(hold())
        try:
            async with httpx.AsyncClient(base_url=live.url, timeout=10) as http:
                t0 = time.monotonic()
                ready = await http.get("/readyz")
                assert ready.status_code == 200, ready.text
                assert time.monotonic() - t0 < 1.5

                async def publish() -> bool:
                    publisher = live.services.publisher
                    await _publish(publisher, 4242, 1)
                    return bool(await publisher.wait_flushed(1.5))

                assert await live.call(publish()) is True
        finally:

            async def release() -> None:
                for connection in held:
                    await pool.release(connection)

            await live.call(release())


# --- a live server: a herd of 300 resumes during a bulk validation -------------------------------

DATA = re.compile(rb"^data: ?(.*)$", re.M)
EVENT_ID = re.compile(rb"^id: ?(.*)$", re.M)


@dataclass
class Resume:
    """One client resuming: what it asks for and what it must get."""

    rid: int | None  # None: unfiltered
    last_id: str
    expected: list[tuple[int, int]]  # (registrationId, seq) of the replay; [] with snapshot
    snapshot: bool
    accept_sse: bool = True
    deferred: int = 0
    frames: list[dict[str, Any]] = field(default_factory=list)


async def _run_resume(port: int, auth: str, resume: Resume, deadline: float) -> None:
    """Open the stream, following the server's retry answers like EventSource (or a client
    honouring Retry-After), until the replay or snapshot arrived (bounded by ``deadline``)."""
    query = f"?registrationId={resume.rid}" if resume.rid is not None else ""
    accept = "Accept: text/event-stream\r\n" if resume.accept_sse else ""
    request = (
        f"GET {STREAM}{query} HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\n{accept}"
        f"Last-Event-ID: {resume.last_id}\r\n\r\n"
    ).encode()
    for _attempt in range(50):
        assert time.monotonic() < deadline, "resume did not end in time"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status, lower = int(head[9:12]), head.lower()
            length = re.search(rb"content-length: *(\d+)", lower)
            if status == 503 or length is not None:  # deferred: the retry answer
                body = await reader.readexactly(int(length.group(1))) if length else b""
                if status == 503:
                    delay = json.loads(body)["retryMs"]
                else:
                    assert status == 200 and b"connected" not in body, body
                    delay = int(re.search(rb"^retry: (\d+)$", body, re.M).group(1))  # type: ignore[union-attr]
                assert b"retry-after:" in lower
                resume.deferred += 1
                await asyncio.sleep(delay / 1000)
                continue
            assert status == 200, head
            buffer = b""
            while not _ended(resume):
                chunk = await asyncio.wait_for(
                    reader.read(65536), max(0.1, deadline - time.monotonic())
                )
                assert chunk, "stream ended before its start-up"
                buffer += chunk
                blocks = buffer.split(b"\n\n")
                buffer = blocks.pop()
                for block in blocks:
                    for line in DATA.findall(block):
                        resume.frames.append(json.loads(line))
            return
        finally:
            writer.close()
    raise AssertionError("deferred 50 times")


def _subscriber_reconnects() -> float:
    """Re-subscriptions of the broker so far (``regstream_redis_reconnects_total``)."""
    value = REGISTRY.get_sample_value(
        "regstream_redis_reconnects_total", {"connection": "subscriber"}
    )
    return value or 0.0


def _ended(resume: Resume) -> bool:
    if resume.snapshot:
        return any(f["type"] == "snapshot" for f in resume.frames)
    wanted = {rid for rid, _ in resume.expected}
    got = [
        f for f in resume.frames if f["type"] == "update" and f["data"]["registrationId"] in wanted
    ]
    return len(got) >= len(resume.expected)


async def test_resume_herd_during_a_bulk_ends_exactly(make_settings: SettingsFactory) -> None:
    """300 resumes at once (filtered and not, ids in and out of the history; a few clients
    without EventSource's Accept header) while a bulk validation runs, through an admission of
    2 at a time and 30 waiting: /readyz 200 throughout, the subscription never rebuilt, the
    bulk's updates all published, many resumes deferred, and every resume ends exactly: its
    replay (none missing, none twice, in order) or one snapshot."""
    settings = make_settings(
        resume_concurrency=2, resume_queue=30, resume_wait=0.3, sse_retry_ms=300,
        streams_per_user=5000, process_rate_per_minute=10_000,
    )  # fmt: skip
    with serve_app(settings) as live:
        admin = auth_headers(live, "admin")
        port = int(live.url.rsplit(":", 1)[1])
        async with httpx.AsyncClient(base_url=live.url, headers=admin, timeout=30) as http:
            static = []
            for n in range(30):
                created = await http.post("/api/registrations", json=load_applicant(5000 + n))
                static.append(created.json()["id"])
            bulk = []
            for n in range(40):
                created = await http.post("/api/registrations", json=load_applicant(6000 + n))
                bulk.append(created.json()["id"])

            # the static registrations' updates: 5 each, interleaved, read back with their ids
            async def publish_static() -> EventKey:
                publisher = live.services.publisher
                start: EventKey = await live.services.bus.histories[0].position()
                for seq in range(1, 6):
                    for rid in static:
                        await _publish(publisher, rid, seq)
                assert await publisher.wait_flushed(5)
                return start

            start = await live.call(publish_static())
            replay = await live.call(live.services.bus.histories[0].since(start))
            ids = {(p.registration_id, p.seq): str(p.key) for p in replay.entries}
            order = [(p.registration_id, p.seq) for p in replay.entries]

            rng = random.Random(15)
            resumes: list[Resume] = []
            for i in range(300):
                rid = static[i % 30]
                kind = i % 4
                if kind in (0, 1):  # filtered, in the history
                    seq = rng.randint(1, 4)
                    expected = [(rid, s) for s in range(seq + 1, 6)]
                    resumes.append(Resume(rid, ids[(rid, seq)], expected, False))
                elif kind == 2:  # unfiltered, in the history
                    at = rng.randint(0, len(order) - 2)
                    resumes.append(Resume(None, ids[order[at]], order[at + 1 :], False))
                else:  # out of the history (another epoch): a snapshot, filtered or not
                    resumes.append(Resume(rid if i % 8 == 3 else None, "1_1-0", [], True))
                resumes[-1].accept_sse = i % 25 != 0

            reconnects = _subscriber_reconnects()
            readiness: list[int] = []
            stop = asyncio.Event()

            async def poll_readiness() -> None:
                async with httpx.AsyncClient(base_url=live.url, timeout=5) as probe:
                    while not stop.is_set():
                        readiness.append((await probe.get("/readyz")).status_code)
                        await asyncio.sleep(0.05)

            poller = asyncio.create_task(poll_readiness())
            accepted = await http.post("/api/registrations/process", json={"registrationIds": bulk})
            assert accepted.json()["accepted"] == sorted(bulk)
            deadline = time.monotonic() + 60
            auth = admin["Authorization"]
            await asyncio.gather(*(_run_resume(port, auth, r, deadline) for r in resumes))

            async def bulk_finished() -> bool:
                rows = [(await http.get(f"/api/registrations/{rid}")).json() for rid in bulk]
                return all(not row["inProgress"] for row in rows)

            await wait_until(bulk_finished, timeout=60, what="the bulk's final statuses")
            stop.set()
            await poller

            async def published() -> int:
                return int(live.services.publisher.pending)

            assert await live.call(published()) == 0
            final_ids = {
                p.registration_id
                for p in (await live.call(live.services.bus.histories[0].since(start))).entries
                if p.seq is not None and p.registration_id in bulk and b'"final":true' in p.raw
            }
            assert final_ids == set(bulk)  # every bulk run's final update reached the history

        assert readiness and set(readiness) == {200}, readiness
        assert _subscriber_reconnects() == reconnects
        assert sum(r.deferred > 0 for r in resumes) >= 30  # the admission was exercised
        assert any(r.deferred and not r.accept_sse for r in resumes)  # the 503 path too
        for r in resumes:
            snapshots = [f for f in r.frames if f["type"] == "snapshot"]
            updates = [
                (f["data"]["registrationId"], f["data"]["seq"])
                for f in r.frames if f["type"] == "update" and f["data"]["registrationId"] in static
            ]  # fmt: skip
            assert r.frames[0]["type"] == "connected"
            if r.snapshot:
                assert len(snapshots) == 1 and updates == [], r
            else:
                assert snapshots == [] and updates == r.expected, r


async def test_a_resume_across_a_resync_starts_with_a_snapshot(
    make_settings: SettingsFactory,
) -> None:
    """Updates of a registration were dropped before Redis (an outbox overflow, announced by a
    resync message in the history): its filtered resume gets a snapshot, not a replay with a
    hole; an unfiltered resume gets the resync frame the hub sends live, then the rest."""
    with serve_app(make_settings()) as live:
        admin = auth_headers(live, "admin")
        async with httpx.AsyncClient(base_url=live.url, headers=admin, timeout=10) as http:
            rid = (await http.post("/api/registrations", json=load_applicant(7000))).json()["id"]

        async def publish() -> list[EventKey]:
            publisher = live.services.publisher
            start = await live.services.bus.histories[0].position()
            await _publish(publisher, rid, 1)
            await publisher.publish_raw(b'{"type":"resync","registrationIds":[%d]}' % rid)
            await _publish(publisher, rid, 5)
            assert await publisher.wait_flushed(5)
            replay = await live.services.bus.histories[0].since(start)
            return [p.key for p in replay.entries if p.key is not None]

        first, last = await live.call(publish())  # (a resync carries no id of its own)
        for query, expected in ((f"?registrationId={rid}", "snapshot"), ("", "resync")):
            async with httpx.AsyncClient(base_url=live.url, headers=admin, timeout=10) as http:
                headers = {"Last-Event-ID": str(first)}
                async with http.stream("GET", STREAM + query, headers=headers) as response:
                    text = ""
                    async for chunk in response.aiter_text():
                        text += chunk
                        if '"seq":5' in text or '"snapshot"' in text and query:
                            break
            frames = [
                json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")
            ]
            kinds = [f["type"] for f in frames]
            if expected == "snapshot":
                assert kinds == ["connected", "snapshot"], kinds
                assert frames[1]["data"]["id"] == rid
            else:
                assert kinds == ["connected", "snapshot", "update"], kinds
                assert frames[1]["resync"] is True
                assert frames[1]["data"] == {"registrationIds": [rid]}
                assert frames[2]["data"]["seq"] == 5
            assert str(last) in text or expected == "snapshot"


async def test_a_history_that_cannot_be_inspected_proves_nothing(redis_server: EmbeddedRedis) -> None:
    """A Redis user without XINFO (a managed Redis that renamed it, a tight ACL): whether the
    history was trimmed cannot be told, so neither read may call a resume complete (it was
    reported complete, and a client resuming from before a trim silently missed updates)."""
    client, publisher, history = await _publisher(redis_server)
    limited = create_client(
        redis_server.url.replace("redis://", "redis://reader:reader-password@"), name="limited"
    )
    try:
        start = await history.position()
        for seq in range(1, 4):
            await _publish(publisher, 7, seq)
        assert await publisher.wait_flushed(10)
        await client.acl_setuser("reader", enabled=True, passwords=["+reader-password"],
                                 keys=["*"], commands=["+@all", "-xinfo"])  # fmt: skip
        await client.xtrim(publisher.history_key, maxlen=1, approximate=False)
        blind = History(limited, channel=publisher.channel)
        assert (await history.since(start)).complete is False  # XINFO allowed: trimmed, seen
        assert (await blind.since(start)).complete is False
        assert (await blind.since_for(start, (7,))).complete is False
    finally:
        await publisher.aclose()
        await limited.aclose()
        await client.aclose()
