"""Issue 15, item 9: a fleet on loopback, through nginx, losing pieces during a bulk validation.

Debian's nginx, running the shipped configuration (``deploy/nginx/``, rendered for loopback by
``tests/fleet_support.py``), in front of three ``regstream serve`` processes on one PostgreSQL
database (fresh for the test, migrated once with ``regstream migrate`` as the compose file and
the Kubernetes Job do) and one private redis-server, all with the same REGSTREAM_SECRET_KEY.
Every client connects through nginx only (TLS, as browsers do). While a bulk validation of a
few hundred registrations runs:

* instance 0 is SIGKILLed (not restarted): its runs are taken over by the others;
* instance 1 gets SIGTERM (it drains), then is started again on the same port;
* instance 2's subscription connection is killed with ``CLIENT KILL`` (found by its client
  name, ``regstream-sub-<pid>``): it resubscribes and catches up from the history.

Unfiltered and filtered streams follow along like ``EventSource`` (reconnect with
``Last-Event-ID`` after the ``retry:`` hint). At the end each stream must hold exactly the
updates the database's process log holds, by ``(registrationId, seq)``: none missing, none
twice, with the final status (a snapshot or a resync re-read counts as holding what it
carried). Every registration has exactly one final status, nobody is enrolled twice, no
completed T24 lookup is repeated, and the killed instance's runs moved on within 15 s (the
issue's target with the default heartbeat settings, which this test keeps).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select

from regstream.core_banking.simulator.dataset import load_applicant
from regstream.core_banking.simulator.server import RunningSimulator
from regstream.realtime.embedded import EmbeddedRedis
from tests.conftest import unavailable
from tests.fleet_support import (
    EventSourceClient,
    Instance,
    admin_token,
    make_cert,
    nginx_binary,
    regstream_cli,
    render_nginx,
    running_nginx,
    stream_summary,
    wait_ready,
)
from tests.support import free_port, wait_until

REGISTRATIONS = 240
FINAL = ("APPROVED", "COMPLETED", "DUPLICATE", "FAILED")
TAKEOVER_TARGET_S = 15.0  # issue 15: a dead instance's runs taken over within 15 s (defaults)
# the taking instance's first step of a taken run: a scheduling allowance on a busy 2-core VM
STEP_ALLOWANCE_S = 2.0
ENV_DROP = ("REDIS_URL", "REDIS_HOST", "DATABASE_URL", "T24_BASE_URL", "REGSTREAM_SECRET_KEY",
            "REGSTREAM_DATA_DIR")  # fmt: skip


def _fleet_env(tmp: Path, redis: EmbeddedRedis, sim: RunningSimulator, db: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    env.update(
        DATABASE_URL=db, REDIS_URL=redis.url, T24_BASE_URL=sim.base_url,
        REGSTREAM_SECRET_KEY="fleet-test-secret-key-" + "k" * 24,  # one key for every instance
        REGSTREAM_DATA_DIR=str(tmp / "cli"),
        REGSTREAM_MIGRATE_ON_START="false",  # migrated once, as the deploy files do
        REGSTREAM_TRUST_PROXY="true",
        REGSTREAM_PROCESS_RATE_PER_MINUTE="100000", REGSTREAM_STREAMS_PER_USER="200",
        REGSTREAM_PIPELINE_CONCURRENCY="4",  # runs stay in flight long enough to be hit
        # short where the defaults only cost time: pings (the followers' clock), the retry
        # hint, the drain's phases; the heartbeat and lease keep their defaults (the target)
        SSE_PING_INTERVAL="1", SSE_RETRY_MS="500", REGSTREAM_PROBE_INTERVAL="1",
        REGSTREAM_DRAIN_DELAY="1", REGSTREAM_DRAIN_SPREAD="1", REGSTREAM_SHUTDOWN_GRACE="3",
    )  # fmt: skip
    return env


async def _sim_config(sim: RunningSimulator, body: dict[str, Any]) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        (await http.post(f"{sim.control_url}/config", json=body)).raise_for_status()


async def _subscription_id(redis: Redis, pid: int) -> str | None:
    clients = await redis.client_list()
    ids = [c["id"] for c in clients if c.get("name") == f"regstream-sub-{pid}"]
    assert len(ids) <= 1, ids
    return ids[0] if ids else None


async def test_fleet_behind_nginx_loses_nothing(
    tmp_path: Path, redis_server: EmbeddedRedis, postgres_url: str, t24_private: RunningSimulator
) -> None:
    if nginx_binary() is None:
        unavailable("nginx (Debian package nginx)")
    from regstream.db.engine import create_engine, create_session_factory
    from regstream.db.tables import Instance as InstanceRow
    from regstream.db.tables import MobileUser, ProcessLogEntry, RegistrationRequest

    await _sim_config(t24_private, {"latency_ms": 100})
    env = _fleet_env(tmp_path, redis_server, t24_private, postgres_url)
    await asyncio.to_thread(regstream_cli, env, "migrate")
    token = await asyncio.to_thread(admin_token, env, "fleet-admin")
    auth = {"Authorization": f"Bearer {token}"}
    fleet = [
        Instance(f"instance-{n}", free_port(), {**env, "REGSTREAM_DATA_DIR": str(tmp_path / f"i{n}")},
                 tmp_path / f"instance-{n}.log")
        for n in range(3)
    ]  # fmt: skip
    cert = make_cert(tmp_path / "tls")
    https_port = free_port()
    conf = render_nginx(tmp_path / "nginx", upstream_ports=[i.port for i in fleet],
                        http_port=free_port(), https_port=https_port, cert=cert)  # fmt: skip
    engine = create_engine(postgres_url)
    sessions = create_session_factory(engine)
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    loop = asyncio.get_running_loop()
    events: dict[str, tuple[int, int]] = {}  # what happened → (wall ms, registrations final)
    try:
        for instance in fleet:
            instance.start()  # all three at once, on the migrated database
        await asyncio.to_thread(wait_ready, fleet, 60)
        with running_nginx(conf, https_port):
            base = f"https://127.0.0.1:{https_port}"
            async with httpx.AsyncClient(base_url=base, headers=auth, verify=cert.client_context(),
                                         timeout=20) as http:  # fmt: skip
                run = random.randrange(10, 99)
                gate = asyncio.Semaphore(16)

                async def create(i: int) -> int:
                    body = load_applicant(run * 1_000_000 + i)
                    if i % 8 == 0:  # not found in T24: ends FAILED after one lookup
                        body["customerNumber"] = "8" + body["customerNumber"][1:]
                    async with gate:
                        response = await http.post("/api/registrations", json=body)
                    assert response.status_code == 201, response.text
                    return int(response.json()["id"])

                rids = list(await asyncio.gather(*(create(i) for i in range(REGISTRATIONS))))

                async def finished() -> int:
                    async with sessions() as session:
                        return int(await session.scalar(
                            select(func.count()).select_from(RegistrationRequest).where(
                                RegistrationRequest.id.in_(rids),
                                RegistrationRequest.in_progress.is_(False),
                                RegistrationRequest.status.in_(FINAL))
                        ) or 0)  # fmt: skip

                def mark(what: str, done: int) -> None:
                    events[what] = (time.time_ns() // 1_000_000, done)

                async def at_progress(share: float) -> int:
                    while (done := await finished()) < share * len(rids):
                        await asyncio.sleep(0.05)
                    return done

                async def held_by(pid: int) -> list[int]:
                    """The runs the instance with this pid holds now (db/work_queue.py)."""
                    async with sessions() as session:
                        return list(await session.scalars(
                            select(RegistrationRequest.id)
                            .join(InstanceRow, InstanceRow.id == RegistrationRequest.instance_id)
                            .where(InstanceRow.pid == pid, RegistrationRequest.in_progress,
                                   RegistrationRequest.id.in_(rids))
                        ))  # fmt: skip

                watched = [rids[0], rids[len(rids) // 2], rids[-1], *random.sample(rids, 3)]
                followers = [EventSourceClient(base, auth, cert.client_context()) for _ in range(3)]
                followers += [EventSourceClient(base, auth, cert.client_context(),
                                                registration_id=rid) for rid in watched]  # fmt: skip
                until = asyncio.Event()
                deadline = loop.time() + 80
                tasks = [
                    asyncio.create_task(f.follow([f.registration_id] if f.registration_id else rids,
                                                 until, deadline))
                    for f in followers
                ]  # fmt: skip
                await wait_until(lambda: all(f.viewer.connections for f in followers), timeout=20,
                                 what="every stream connected through nginx")  # fmt: skip

                for chunk in (rids[i : i + 80] for i in range(0, len(rids), 80)):
                    response = await http.post("/api/registrations/process",
                                               json={"registrationIds": chunk})  # fmt: skip
                    assert response.status_code == 200, response.text
                    assert sorted(response.json()["accepted"]) == sorted(chunk)
                mark("bulk sent", 0)

                killed, restarted, resubscribed = fleet

                async def restart(instance: Instance) -> None:
                    assert instance.proc is not None
                    instance.proc.send_signal(signal.SIGTERM)
                    try:
                        code = await asyncio.to_thread(instance.proc.wait, 40)
                    except subprocess.TimeoutExpired:
                        tail = instance.tail()
                        raise AssertionError(f"no exit 40 s after SIGTERM:\n{tail}") from None
                    assert code == 0, instance.tail()
                    mark("SIGTERM exited", await finished())
                    instance.start()
                    await asyncio.to_thread(wait_ready, [instance], 60)
                    mark("restarted ready", await finished())

                await at_progress(0.10)
                held = await held_by(killed.pid)
                assert killed.proc is not None
                killed.proc.send_signal(signal.SIGKILL)
                mark("SIGKILL", await finished())
                await asyncio.to_thread(killed.proc.wait, 10)
                mark("SIGTERM", await at_progress(0.25))
                restarting = asyncio.create_task(restart(restarted))
                await at_progress(0.45)
                sub_id = await _subscription_id(redis, resubscribed.pid)
                assert sub_id is not None, "no regstream-sub-<pid> client: the name changed?"
                assert await redis.client_kill_filter(_id=sub_id) == 1
                mark("CLIENT KILL", await finished())

                async def resubscribed_again() -> bool:
                    new = await _subscription_id(redis, resubscribed.pid)
                    return new is not None and new != sub_id

                await wait_until(resubscribed_again, timeout=20, what="subscription rebuilt")
                await restarting
                await _wait_all_final(finished, len(rids), timeout=45)
                mark("all final", len(rids))
                until.set()
                # each stream has 20 s to catch up (it is live: normally under a second); one
                # that cannot is stopped and the checks below say what it lacks
                _, late = await asyncio.wait(tasks, timeout=20)
                for task in late:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for task in tasks:
                    error = None if task.cancelled() else task.exception()
                    if error is not None:
                        raise error

        async with sessions() as session:
            log_rows = list(await session.scalars(
                select(ProcessLogEntry).where(ProcessLogEntry.registration_id.in_(rids))
                .order_by(ProcessLogEntry.registration_id, ProcessLogEntry.seq)
            ))  # fmt: skip
            rows = {r.id: r for r in await session.scalars(
                select(RegistrationRequest).where(RegistrationRequest.id.in_(rids)))}  # fmt: skip
            per_cif = list(await session.execute(
                select(MobileUser.customer_number, func.count()).group_by(MobileUser.customer_number)
            ))  # fmt: skip
    finally:
        for instance in fleet:  # all drain at once, then each is waited for (bounded)
            if instance.proc is not None and instance.proc.poll() is None:
                instance.proc.send_signal(signal.SIGTERM)
        for instance in fleet:
            instance.stop()
        await redis.aclose()
        await engine.dispose()

    by_rid: dict[int, list[Any]] = {rid: [] for rid in rids}
    for entry in log_rows:
        by_rid[entry.registration_id].append(entry)
    killed_ms = events["SIGKILL"][0]
    # seconds from the kill to the last log entry of each run the killed instance held
    took = {rid: (by_rid[rid][-1].timestamp_ms - killed_ms) / 1000 for rid in held}
    summaries = [stream_summary(f) for f in followers]
    (tmp_path / "fleet.json").write_text(
        json.dumps({"events": events, "took": took, "streams": summaries}, indent=1)
    )

    # --- the database: one final status each, nobody twice, no repeated lookup ---------------
    for rid, entries in by_rid.items():
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1)), rid
        finals = [e for e in entries if e.stage is None]
        assert len(finals) == 1, (rid, [(e.seq, e.stage, e.status) for e in entries])
        assert finals[0].status == rows[rid].status and rows[rid].in_progress is False
        kinds = [(e.stage, e.stage_status) for e in entries]
        if ("t24_lookup", "completed") in kinds:
            later = kinds[kinds.index(("t24_lookup", "completed")) + 1 :]
            assert ("t24_lookup", "started") not in later, (rid, kinds)
    assert all(count == 1 for _, count in per_cif)  # nobody enrolled twice
    statuses = {rows[rid].status for rid in rids}
    assert statuses <= {"APPROVED", "FAILED"}, statuses

    # --- the chaos hit runs in flight ----------------------------------------------------------
    for what in ("SIGKILL", "SIGTERM", "CLIENT KILL"):
        assert events[what][1] < len(rids), (what, events)  # the bulk was still running
    # the killed instance's runs: finished by the others within 15 s of its death
    assert held, "the killed instance held no run: the kill proved nothing"
    assert max(took.values()) <= TAKEOVER_TARGET_S + STEP_ALLOWANCE_S, (took, events)

    # --- every stream: exactly what the database holds -----------------------------------------
    for follower, summary in zip(followers, summaries, strict=True):
        viewer = follower.viewer
        assert viewer.duplicates == 0 and viewer.gaps == 0, summary
        scope = [follower.registration_id] if follower.registration_id else rids
        for rid in scope:
            view = viewer.views.get(rid)
            assert view is not None, (rid, summary)
            assert view.seqs == [e.seq for e in by_rid[rid]], (rid, view.seqs, summary)
            assert view.status == rows[rid].status, (rid, summary)
        if follower.registration_id is None:
            assert set(viewer.views) == set(rids), summary
    # the streams were really cut and resumed (not a quiet run that proved nothing)
    assert sum(s["connections"] for s in summaries) > len(followers), summaries


async def _wait_all_final(finished: Any, total: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (done := await finished()) < total:
        assert time.monotonic() < deadline, f"{total - done} registrations not final"
        await asyncio.sleep(0.25)


pytestmark = pytest.mark.timeout(150)
