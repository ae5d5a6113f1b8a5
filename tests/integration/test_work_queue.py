"""The shared work queue (db/work_queue.py) and heartbeat takeover (pipeline/fleet.py).

Data-layer tests run on SQLite and PostgreSQL. The fleet tests run three ``regstream serve``
processes on one PostgreSQL database and one private Redis (issue 15's targets): a bulk of 300
sent to one of them is run at least 20 % by each, and the runs of one SIGKILLed mid-bulk are
finished by the others within 15 s with the default heartbeat settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from regstream.auth import credentials
from regstream.auth.principal import Role
from regstream.core_banking.simulator.dataset import load_applicant
from regstream.core_banking.simulator.server import RunningSimulator
from regstream.db import instances, registrations, work_queue
from regstream.db.engine import SessionFactory, create_engine, create_session_factory, migrate
from regstream.db.tables import MobileUser, ProcessLogEntry, RegistrationRequest
from regstream.pipeline.fleet import FleetMember
from regstream.realtime.embedded import EmbeddedRedis
from tests.support import free_port, wait_until

A, B, C = "a" * 32, "b" * 32, "c" * 32
NOW = 1_000_000
TIMEOUT_MS = 10_000


def _fields(n: int) -> dict[str, Any]:
    """A registration that validates to APPROVED against the simulator's load customer n."""
    body = load_applicant(n)
    return dict(
        customer_number=body["customerNumber"], first_name=body["firstName"],
        last_name=body["lastName"], date_of_birth=date.fromisoformat(body["dateOfBirth"]),
        national_id=body["nationalId"], id_type=body["idType"], phone=body["phone"],
        email=body["email"], account_number=None, device_id=None,
    )  # fmt: skip


@asynccontextmanager
async def _migrated(url: str) -> AsyncIterator[SessionFactory]:
    engine = create_engine(url)
    try:
        await migrate(engine)
        yield create_session_factory(engine)
    finally:
        await engine.dispose()


async def _take(session: AsyncSession, instance_id: str, limit: int = 10) -> work_queue.Taken:
    return await work_queue.take(
        session, instance_id=instance_id, limit=limit, now_ms=NOW, lease_ms=60_000,
        dead_before_ms=NOW - TIMEOUT_MS,
    )  # fmt: skip


# --- the queue's statements ---------------------------------------------------------------------


async def test_take_queued_runs_and_those_of_dead_or_stopped_instances(database_url: str) -> None:
    """Queued runs are taken oldest first; runs of a live instance are not (not even when
    our own heartbeat is late); those of a dead or stopped one are, and so is a run whose lease
    expired; each take gives a new run id, so the previous holder can write nothing more."""
    async with _migrated(database_url) as sessions:
        async with sessions.begin() as session:
            for iid, beat in ((A, NOW), (B, NOW - TIMEOUT_MS - 1), (C, NOW)):
                await instances.register(
                    session, instance_id=iid, host="h", pid=1, version="t", now_ms=beat
                )
            await instances.mark_stopped(session, instance_id=C, now_ms=NOW)
            ids = [(await registrations.create(session, **_fields(n))).id for n in range(6)]
            held_by = [None, None, A, B, C, A]  # ids[5]: A's, with an expired lease
            claims = {}
            for rid, holder in zip(ids, held_by, strict=True):
                [(run_id, _)] = await registrations.claim_many(
                    session, registration_ids=[rid], now_ms=NOW, started_by="op",
                    lease_ms=-1 if rid == ids[5] else 60_000, instance_id=holder,
                )  # fmt: skip
                claims[rid] = run_id

        async with sessions.begin() as session:  # oldest first, up to the limit
            taken = await _take(session, A, limit=1)
            assert [r.id for r in taken.rows] == [ids[0]] and taken.taken_over == 0
        async with sessions.begin() as session:
            taken = await _take(session, A)
        # the queued one, B's (dead), C's (stopped), A's own expired lease; not A's live one
        assert [r.id for r in taken.rows] == [ids[1], ids[3], ids[4], ids[5]]
        assert taken.taken_over == 3
        assert all(r.instance_id == A and r.run_id == taken.run_id for r in taken.rows)
        assert all(taken.run_id != claims[r.id] for r in taken.rows)
        async with sessions.begin() as session:
            assert (await _take(session, C)).rows == []  # everything is held by a live A

        async with sessions.begin() as session:  # B's old runner lost its run
            try:
                await registrations.append_events(
                    session, registration_id=ids[3], run_id=claims[ids[3]], run=1, now_ms=NOW,
                    lease_ms=100, events=[("t24_lookup", "started", "PENDING", "x", None)],
                )  # fmt: skip
                raise AssertionError("a run taken over was written by its old holder")
            except registrations.RunLost:
                pass

        async with sessions.begin() as session:  # a shutdown gives runs back
            released = await work_queue.release(
                session, instance_id=A, runs=[(ids[1], taken.run_id), (ids[2], claims[ids[2]])]
            )
            assert released == 2
        async with sessions.begin() as session:
            again = await _take(session, C)  # C is stopped, but may still take: it is the caller
            assert [r.id for r in again.rows] == [ids[1], ids[2]] and again.taken_over == 0


async def test_a_take_is_exactly_the_oldest_batch_and_never_our_own_runs(
    database_url: str,
) -> None:
    """The one-statement take (an UPDATE of a LIMITed subquery on PostgreSQL): exactly the
    ``limit`` oldest candidates change holder, all under the new run id, the others stay as
    they were; an instance whose own heartbeat is late takes nothing of its own back (it is
    not dead to itself), while another instance takes its runs over, oldest first, and counts
    them."""
    async with _migrated(database_url) as sessions:
        async with sessions.begin() as session:
            for iid, beat in ((A, NOW - TIMEOUT_MS - 1), (B, NOW)):  # A: late heartbeat
                await instances.register(
                    session, instance_id=iid, host="h", pid=1, version="t", now_ms=beat
                )
            ids = [(await registrations.create(session, **_fields(n))).id for n in range(30)]
            for rid in ids[:5]:  # A's runs, leases valid
                await registrations.claim_many(
                    session, registration_ids=[rid], now_ms=NOW, lease_ms=60_000,
                    started_by="op", instance_id=A,
                )  # fmt: skip
            await registrations.claim_many(
                session, registration_ids=ids[5:], now_ms=NOW, lease_ms=60_000, started_by="op"
            )
        async with sessions.begin() as session:
            mine = await _take(session, A, limit=7)
        assert [r.id for r in mine.rows] == ids[5:12] and mine.taken_over == 0
        async with sessions.begin() as session:
            theirs = await _take(session, B, limit=8)
        assert [r.id for r in theirs.rows] == ids[:8]  # A's five, then three A just took
        assert theirs.taken_over == 8
        assert all(r.instance_id == B and r.run_id == theirs.run_id for r in theirs.rows)
        async with sessions() as session:
            held = await session.execute(
                select(RegistrationRequest.id, RegistrationRequest.instance_id,
                       RegistrationRequest.run_id)
            )  # fmt: skip
            state = {rid: (holder, run_id) for rid, holder, run_id in held.all()}
        assert {rid for rid, (holder, _) in state.items() if holder == A} == set(ids[8:12])
        assert {rid for rid, (holder, _) in state.items() if holder == B} == set(ids[:8])
        assert all(state[rid][1] == mine.run_id for rid in ids[8:12])
        assert all(state[rid][0] is None for rid in ids[12:])


async def test_concurrent_takers_skip_each_others_rows(postgres_url: str) -> None:
    """PostgreSQL: while one instance's take is uncommitted, another takes the next runs at
    once (SKIP LOCKED) instead of waiting for it or taking the same ones."""
    async with _migrated(postgres_url) as sessions:
        async with sessions.begin() as session:
            for iid in (A, B):
                await instances.register(
                    session, instance_id=iid, host="h", pid=1, version="t", now_ms=NOW
                )
            ids = [(await registrations.create(session, **_fields(n))).id for n in range(10)]
            await registrations.claim_many(
                session, registration_ids=ids, now_ms=NOW, lease_ms=60_000, started_by="op"
            )
        async with sessions.begin() as first:
            mine = await _take(first, A, limit=4)
            async with sessions.begin() as second:
                theirs = await asyncio.wait_for(_take(second, B, limit=4), 5)
        assert [r.id for r in mine.rows] == ids[:4]
        assert [r.id for r in theirs.rows] == ids[4:8]


# --- three instances ----------------------------------------------------------------------------


@contextmanager
def _fleet(
    tmp: Path, database_url: str, redis: EmbeddedRedis, sim: RunningSimulator, n: int = 3,
    **extra: str,
) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:  # fmt: skip
    """``n`` ``regstream serve`` processes on one database and Redis, started together; yields
    (base URL, process) each; stops each by its process group (SIGTERM, then SIGKILL)."""
    drop = ("REDIS_URL", "REDIS_HOST", "DATABASE_URL", "T24_BASE_URL", "REGSTREAM_SECRET_KEY")
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        for i in range(n):
            env = {k: v for k, v in os.environ.items() if k not in drop}
            env.update(
                REGSTREAM_DATA_DIR=str(tmp / f"var{i}"), REDIS_URL=redis.url,
                T24_BASE_URL=sim.base_url, DATABASE_URL=database_url,
                REGSTREAM_SECRET_KEY="fleet-secret-" + "k" * 20,
                REGSTREAM_PROCESS_RATE_PER_MINUTE="100000", REGSTREAM_DRAIN_DELAY="0",
                REGSTREAM_DRAIN_SPREAD="0", REGSTREAM_SHUTDOWN_GRACE="2",
                REGSTREAM_METRICS_PUBLIC="true",
            )  # fmt: skip
            env.update(extra)
            port, log = free_port(), tmp / f"serve{i}.log"
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "regstream", "serve", "--port", str(port)],
                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            procs.append((f"http://127.0.0.1:{port}", proc, log))
        deadline = time.monotonic() + 60
        for url, proc, log in procs:
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "not ready:\n" + log.read_text()[-3000:]
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                time.sleep(0.1)
        yield [(url, proc) for url, proc, _ in procs]
    finally:
        for _, proc, _ in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc, _ in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


async def _setup(sessions: SessionFactory, count: int) -> tuple[list[int], dict[str, str]]:
    """``count`` registrations that validate to APPROVED, and an operator's API token."""
    async with sessions.begin() as session:
        ids = [(await registrations.create(session, **_fields(n))).id for n in range(count)]
        operator = await credentials.create_operator(
            session, username="fleet-operator", role=Role("operator"), password=None
        )
        token, _ = await credentials.issue_api_token(session, operator=operator)
    return ids, {"Authorization": f"Bearer {token}"}


async def _state(sessions: SessionFactory) -> dict[str, Any]:
    async with sessions() as session:
        rows = (await session.execute(select(
            RegistrationRequest.id, RegistrationRequest.status, RegistrationRequest.in_progress,
            RegistrationRequest.instance_id,
        ))).all()  # fmt: skip
        return {"rows": {r.id: r for r in rows}, "instances": await instances.list_all(session)}


async def _final_checks(sessions: SessionFactory, ids: list[int]) -> None:
    """Every registration APPROVED with exactly one final status in its log; every person
    enrolled once; a completed T24 lookup never followed by another one."""
    async with sessions() as session:
        entries = list(await session.scalars(
            select(ProcessLogEntry).order_by(ProcessLogEntry.registration_id, ProcessLogEntry.seq)
        ))  # fmt: skip
        enrolled = (await session.execute(
            select(MobileUser.customer_number, func.count()).group_by(MobileUser.customer_number)
        )).all()  # fmt: skip
        rows = await session.execute(select(RegistrationRequest.id, RegistrationRequest.status))
        statuses = {rid: status for rid, status in rows.all()}
    assert {statuses[rid] for rid in ids} == {"APPROVED"}
    assert len(enrolled) == len(ids) and {n for _, n in enrolled} == {1}  # nobody twice
    by_registration: dict[int, list[ProcessLogEntry]] = {}
    for entry in entries:
        by_registration.setdefault(entry.registration_id, []).append(entry)
    for rid in ids:
        log = by_registration[rid]
        assert [e.seq for e in log] == list(range(1, len(log) + 1)), rid
        assert [e.status for e in log if e.stage is None] == ["APPROVED"], rid  # one final
        kinds = [(e.stage, e.stage_status) for e in log]
        done = kinds.index(("t24_lookup", "completed"))
        assert ("t24_lookup", "started") not in kinds[done + 1 :], (rid, kinds)


async def _sim_latency(sim: RunningSimulator, ms: int) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{sim.control_url}/config", json={"latency_ms": ms})
        response.raise_for_status()


async def test_a_bulk_sent_to_one_instance_is_run_by_all_three(
    tmp_path: Path, postgres_url: str, redis_server: EmbeddedRedis, t24_private: RunningSimulator
) -> None:
    """The others learn of the bulk by NOTIFY: their poll is made 60 s here. Also: a single
    click on an idle instance is run by that instance (held at the claim, not queued for
    whoever looks first)."""
    await _sim_latency(t24_private, 50)  # the simulator's default latency
    async with _migrated(postgres_url) as sessions:
        ids, headers = await _setup(sessions, 301)
        single, ids = ids[-1], ids[:-1]
        with _fleet(
            tmp_path, postgres_url, redis_server, t24_private, REGSTREAM_QUEUE_POLL_INTERVAL="60"
        ) as fleet:
            async with httpx.AsyncClient(base_url=fleet[1][0], headers=headers, timeout=30) as http:
                response = await http.post(f"/api/registrations/{single}/process")
                assert response.status_code == 202, response.text

            async def single_done() -> bool:
                return not (await _state(sessions))["rows"][single].in_progress

            await wait_until(single_done, timeout=30, interval=0.05, what="the single click")
            state = await _state(sessions)
            by_pid = {i.pid: i.id for i in state["instances"]}
            assert state["rows"][single].instance_id == by_pid[fleet[1][1].pid]
            metrics = httpx.get(f"{fleet[1][0]}/metrics", timeout=10).text
            assert 'regstream_runs_taken_total{how="direct"} 1.0' in metrics

            async with httpx.AsyncClient(base_url=fleet[0][0], headers=headers, timeout=30) as http:
                response = await http.post(
                    "/api/registrations/process", json={"registrationIds": ids}
                )
                assert response.status_code == 200, response.text
                assert response.json()["accepted"] == ids

            async def all_done() -> bool:
                rows = (await _state(sessions))["rows"]
                return not any(rows[rid].in_progress for rid in ids)

            await wait_until(all_done, timeout=90, interval=0.25, what="the bulk to end")
            state = await _state(sessions)
        ran = Counter(state["rows"][rid].instance_id for rid in ids)
        registered = {i.id for i in state["instances"]}
        assert len(ran) == 3 and set(ran) <= registered, ran
        assert min(ran.values()) >= 60, ran  # each instance ran at least 20 %
        await _final_checks(sessions, [*ids, single])


async def test_a_killed_instance_s_runs_are_finished_by_the_others_within_15_s(
    tmp_path: Path, postgres_url: str, redis_server: EmbeddedRedis, t24_private: RunningSimulator
) -> None:
    """Default heartbeat settings (2 s, 10 s timeout). T24 made slow (300 ms a call) so that
    the victim holds runs mid-flight when it is killed: some before their lookup, some after."""
    await _sim_latency(t24_private, 300)
    async with _migrated(postgres_url) as sessions:
        ids, headers = await _setup(sessions, 300)
        with _fleet(tmp_path, postgres_url, redis_server, t24_private) as fleet:
            async with httpx.AsyncClient(base_url=fleet[0][0], headers=headers, timeout=30) as http:
                response = await http.post(
                    "/api/registrations/process", json={"registrationIds": ids}
                )
                assert response.status_code == 200, response.text

            victim_id = ""

            async def victim_busy() -> bool:  # the third instance holds runs in flight
                nonlocal victim_id
                state = await _state(sessions)
                ids_by_pid = {i.pid: i.id for i in state["instances"]}
                victim_id = ids_by_pid.get(fleet[2][1].pid, "")
                held = [
                    r
                    for r in state["rows"].values()
                    if r.in_progress and r.instance_id == victim_id
                ]
                return bool(victim_id) and len(held) >= 20

            await wait_until(victim_busy, timeout=30, interval=0.05, what="the victim to hold runs")
            fleet[2][1].send_signal(signal.SIGKILL)
            killed_ms = time.time_ns() // 1_000_000
            fleet[2][1].wait(10)
            held = [r.id for r in (await _state(sessions))["rows"].values()
                    if r.in_progress and r.instance_id == victim_id]  # fmt: skip
            assert held, "the victim finished everything before it died: the test proved nothing"

            async def all_done() -> bool:
                rows = (await _state(sessions))["rows"]
                return not any(rows[rid].in_progress for rid in ids)

            await wait_until(all_done, timeout=60, interval=0.25, what="the bulk to end")
        async with sessions() as session:
            finals = await session.execute(
                select(ProcessLogEntry.registration_id, ProcessLogEntry.timestamp_ms).where(
                    ProcessLogEntry.stage.is_(None), ProcessLogEntry.registration_id.in_(held)
                )
            )
            finished = {rid: at_ms for rid, at_ms in finals.all()}
            holders = await session.execute(
                select(RegistrationRequest.id, RegistrationRequest.instance_id).where(
                    RegistrationRequest.id.in_(held)
                )
            )
            owners = {rid: holder for rid, holder in holders.all()}
        late = max(finished.values()) - killed_ms
        assert late <= 15_000, f"the dead instance's last run ended {late} ms after its death"
        assert victim_id not in set(owners.values())  # all resumed by the other two
        await _final_checks(sessions, ids)


async def test_a_drained_instance_gives_its_runs_back_at_once(
    tmp_path: Path, postgres_url: str, redis_server: EmbeddedRedis, t24_private: RunningSimulator
) -> None:
    """SIGTERM with a short grace while it holds runs: what is still running then goes back to
    the queue and the instance is marked stopped, so the other instance resumes those runs at
    once, long before the heartbeat timeout (made 60 s here, so only the hand-back can explain
    a quick finish)."""
    await _sim_latency(t24_private, 1500)
    async with _migrated(postgres_url) as sessions:
        ids, headers = await _setup(sessions, 40)
        with _fleet(
            tmp_path, postgres_url, redis_server, t24_private, n=2,
            REGSTREAM_SHUTDOWN_GRACE="0.2", REGSTREAM_HEARTBEAT_TIMEOUT="60",
        ) as fleet:  # fmt: skip
            async with httpx.AsyncClient(base_url=fleet[0][0], headers=headers, timeout=30) as http:
                response = await http.post(
                    "/api/registrations/process", json={"registrationIds": ids}
                )
                assert response.status_code == 200, response.text
            leaver_id = ""

            async def leaver_busy() -> bool:
                nonlocal leaver_id
                state = await _state(sessions)
                leaver_id = {i.pid: i.id for i in state["instances"]}.get(fleet[1][1].pid, "")
                return any(
                    r.in_progress and r.instance_id == leaver_id for r in state["rows"].values()
                )

            await wait_until(leaver_busy, timeout=30, interval=0.05, what="the leaver to hold runs")
            os.killpg(fleet[1][1].pid, signal.SIGTERM)
            stopped_at = time.monotonic()
            assert await asyncio.to_thread(fleet[1][1].wait, 30) == 0

            async def all_done() -> bool:
                rows = (await _state(sessions))["rows"]
                return not any(rows[rid].in_progress for rid in ids)

            await wait_until(all_done, timeout=60, interval=0.1, what="the bulk to end")
            took = time.monotonic() - stopped_at
            state = await _state(sessions)
        leaver = next(i for i in state["instances"] if i.id == leaver_id)
        assert leaver.stopped_ms is not None  # marked stopped on the way out
        # its runs were cut after 0.2 s and resumed by the other (1.5 s per T24 call): far
        # sooner than the 60 s heartbeat timeout or the 60 s lease
        assert took < 20, took
        await _final_checks(sessions, ids)


async def test_the_listener_comes_back_after_its_connection_is_killed(postgres_url: str) -> None:
    """The LISTEN connection terminated by the server: the member reconnects and is woken by
    the next NOTIFY again (its poll is 60 s here, so only a notification can wake it)."""
    engine = create_engine(postgres_url)
    await migrate(engine)
    sessions = create_session_factory(engine)
    member = FleetMember(
        sessions=sessions, engine=engine, heartbeat_interval=1, heartbeat_timeout=5,
        poll_interval=60,
    )  # fmt: skip
    task = asyncio.create_task(member.run())

    async def woken() -> bool:
        return await asyncio.wait_for(member.wait_for_work(), 10)

    async def announce() -> None:
        async with sessions.begin() as session:
            await work_queue.announce(session)

    try:
        assert await woken()  # listening (it looks once when it starts listening)
        await announce()
        assert await woken()
        async with sessions.begin() as session:
            killed = await session.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
                )
            )
        assert killed == 1
        assert await woken()  # listening again
        await announce()
        assert await woken()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await engine.dispose()
