"""Database CPU per validation: the pipeline's database steps, batched as the service batches them.

  .venv/bin/python bench/db_bench.py --tree before=/tmp/h1-before/src --tree after=src -n 2000

Each measurement is a child process (``--child``) running one source tree (on PYTHONPATH) against a
fresh database (PostgreSQL: a new database per child; SQLite: a new file): it inserts N
registrations (not timed), then runs the service's ``Runner`` as ``regstream serve`` runs it (its
group commit, the shared queue, the validator and recorder) on a zero-latency in-process core (a
stub that answers every applicant with a matching active customer and two accounts) and a
publisher that only counts: bulk submissions of ``--bulk`` ids, ``--concurrency`` pipeline slots,
until every run reached its final status (bounded). What it measures is the process's CPU time
(every thread: aiosqlite's and the executor's too) from the first submission to the last final,
per validation. So the CPU is the database work of a validation (claim, take, duplicate check,
outcome with enrolment, their transactions) plus the pipeline's own Python around it.

The parent alternates the trees rep by rep (order swapped every rep) and reports medians per tree
and database and the ratio to the first tree, with the machine noise (a timeit and the load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date
from typing import Any

PG_ADMIN = os.environ.get("TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")


# --- the child: one tree, one database ---------------------------------------------------------


async def _child(url: str, n: int, bulk: int, concurrency: int) -> dict[str, Any]:
    from sqlalchemy import insert

    from regstream.db import engine as db_engine
    from regstream.db.tables import RegistrationRequest
    from regstream.domain.core_records import CoreAccount, CoreCustomer, LegalId
    from regstream.domain.pii import NationalIdKeys
    from regstream.pipeline.runner import Runner

    engine = db_engine.create_engine(url)
    await db_engine.migrate(engine)
    sessions = db_engine.create_session_factory(engine)
    people = {}
    rows = []
    for i in range(n):
        cif = f"7{i:09d}"
        person = {
            "customer_number": cif, "first_name": "Load", "last_name": f"Person{i}",
            "date_of_birth": date(1990, 1, 1), "national_id": f"7{i:09d}", "id_type": "NATIONAL.ID",
            "phone": f"+2548{i:08d}", "email": None, "account_number": None, "device_id": None,
            "status": "PENDING", "seq": 0, "run_count": 0, "in_progress": False,
        }  # fmt: skip
        people[cif] = person
        rows.append(person)
    async with engine.begin() as conn:
        for start in range(0, n, 500):
            await conn.execute(insert(RegistrationRequest.__table__), rows[start : start + 500])
        ids = [r[0] for r in (await conn.exec_driver_sql(
            "SELECT id FROM registration_requests ORDER BY id")).all()]  # fmt: skip

    class Core:
        async def get_customer(self, customer_id: str) -> CoreCustomer:
            p = people[customer_id]
            return CoreCustomer(
                customer_id=customer_id, names=(f"{p['first_name']} {p['last_name']}",),
                date_of_birth=p["date_of_birth"], customer_status="1", posting_restrict="",
                kyc_complete=True, legal_ids=(LegalId(p["national_id"], p["id_type"]),),
                phones=(p["phone"],),
            )  # fmt: skip

        async def list_accounts(self, customer_id: str) -> list[CoreAccount]:
            return [CoreAccount(f"{customer_id}-{k}", f"AA{k}", "AUTH", "") for k in (1, 2)]

        async def aclose(self) -> None:
            return None

    finals: dict[str, int] = {}
    done = asyncio.Event()

    class Publisher:
        def enqueue_update(self, update: dict[str, Any]) -> None:
            if update.get("type") == "final" or update.get("stage") is None:
                status = str(update.get("status"))
                finals[status] = finals.get(status, 0) + 1
                if sum(finals.values()) >= n:
                    done.set()

        async def wait_for_room(self) -> None:
            return None

    runner = Runner(
        sessions=sessions, core=Core(), publisher=Publisher(), keys=NationalIdKeys(b"bench-key"),
        concurrency=concurrency, engine=engine,
        open_transactions=1 if engine.dialect.name == "sqlite" else 4,
    )  # fmt: skip
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(runner.fleet.registered.wait(), 30)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for start in range(0, n, bulk):
        await runner.submit_many(ids[start : start + bulk], started_by="bench")
    await asyncio.wait_for(done.wait(), 600)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await runner.drain(1)
    await engine.dispose()
    return {
        "dialect": engine.dialect.name, "n": n, "finals": finals,
        "cpu_ms_per_validation": round(cpu * 1000 / n, 4),
        "validations_per_s": round(n / wall, 1),
    }  # fmt: skip


# --- the parent: trees alternated, medians ------------------------------------------------------


def _fresh_database(kind: str, tmp: str) -> tuple[str, str | None]:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{tmp}/{uuid.uuid4().hex}.sqlite3", None
    name = f"h1bench_{uuid.uuid4().hex[:12]}"
    subprocess.run(["psql", PG_ADMIN, "-qc", f"CREATE DATABASE {name}"], check=True, timeout=60)
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}", name


def _drop(name: str | None) -> None:
    if name is not None:
        subprocess.run(["psql", PG_ADMIN, "-qc", f"DROP DATABASE IF EXISTS {name}"], timeout=60)


def _noise() -> str:
    timeit = subprocess.run(
        [sys.executable, "-m", "timeit", "[i for i in range(10)]"],
        capture_output=True, text=True, timeout=120,
    ).stdout.strip()  # fmt: skip
    return f"timeit: {timeit}; load: {os.getloadavg()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[], help="name=path/to/src")
    parser.add_argument("--db", choices=["postgres", "sqlite", "both"], default="both")
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--bulk", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_child(args.child, args.n, args.bulk, args.concurrency))))
        return
    trees = [t.split("=", 1) for t in args.tree] or [["cwd", "src"]]
    kinds = ["postgres", "sqlite"] if args.db == "both" else [args.db]
    print(_noise(), flush=True)
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for kind in kinds:
                order = trees if rep % 2 == 0 else trees[::-1]
                for name, path in order:
                    url, dbname = _fresh_database(kind, tmp)
                    try:
                        out = subprocess.run(
                            [sys.executable, __file__, "--child", url, "-n", str(args.n),
                             "--bulk", str(args.bulk), "--concurrency", str(args.concurrency)],
                            env={**os.environ, "PYTHONPATH": os.path.abspath(path)},
                            capture_output=True, text=True, timeout=900, check=False,
                        )  # fmt: skip
                    finally:
                        _drop(dbname)
                    if out.returncode:
                        sys.exit(f"{name} {kind}: child failed\n{out.stderr[-3000:]}")
                    line = json.loads(out.stdout.strip().splitlines()[-1])
                    line.update(tree=name, rep=rep, db=kind)
                    print(json.dumps(line), flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(line) + "\n")
                    results.setdefault((kind, name), []).append(line["cpu_ms_per_validation"])
    print(_noise())
    for kind in kinds:
        base = statistics.median(results[(kind, trees[0][0])])
        for name, _ in trees:
            med = statistics.median(results[(kind, name)])
            print(f"{kind:8} {name:10} median CPU {med:.3f} ms/validation "
                  f"({base / med:.2f}x less than {trees[0][0]})  reps {results[(kind, name)]}")  # fmt: skip


if __name__ == "__main__":
    main()
