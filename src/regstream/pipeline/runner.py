"""Runs validations in the background: takes submissions, holds the runs' tasks, gives them back.

The path of one click (docs/architecture.md, "One way through"): ``api/registrations.py`` calls
``Runner.submit``, which claims the run in a group-commit transaction (``db/group_commit.py``)
and, right after that commit (the step's ``then``), starts its task here when a pipeline slot is
free; the task (``_guarded``) waits for a slot and for room in the publisher's outbox, then
``recovery.run_through_outages`` → ``validation.Validator.validate`` runs the stages, each step
committed and then queued for publication by ``persist.Recorder``.

Shared work (``db/work_queue.py``): a click is held by this instance when it has room (see
below), and is otherwise *queued* in the database, as every bulk validation's runs are.
``run()`` takes queued runs a batch at a time (``take_batch``, 16, at most ``concurrency``), so
that a bulk spreads over the fleet.

The refill rule: the runner holds up to ``concurrency`` + one batch of runs. The runs beyond
``concurrency`` wait for a pipeline slot (the semaphore of ``_guarded``), so a slot freed
during a bulk starts a held run at once, without waiting for a take (a round trip and a
commit); the held runs are covered by lease renewal and given back by ``drain``. It takes
when it has room for a whole batch (it holds ``concurrency`` runs or fewer: every waiting run
has started), when told (this instance queued runs, or another one did: LISTEN/NOTIFY on
PostgreSQL) or when a run ends while the queue may hold more, and at least every poll
interval (then for whatever room it has). A click has room beyond that while the queue may
hold more (a bulk): it is held while the runner holds fewer than ``concurrency`` + two batches,
so it waits for a slot behind the batch held before it (and clicks held before it), not behind
the rest of the bulk in the queue (taken oldest first). Taken runs of a dead instance are resumed
(``recovery``).

Leases (``leases``): renewed at every step and every half lease for every run this instance
holds (``renew_leases``). At shutdown (``drain``) runs not started go back to the queue at once,
and those still running after the grace period too, so the others resume them without waiting
for the heartbeat timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from regstream import metrics
from regstream.core_banking.client import CoreBanking
from regstream.db import registrations, work_queue
from regstream.db.group_commit import GroupCommit
from regstream.db.registrations import RunLost
from regstream.db.tables import RegistrationRequest
from regstream.domain.errors import ValidationFailure
from regstream.domain.pii import NationalIdKeys
from regstream.pipeline import leases
from regstream.pipeline.fleet import FleetMember
from regstream.pipeline.persist import Publisher, Recorder, Run, now_ms
from regstream.pipeline.recovery import run_through_outages
from regstream.pipeline.validation import Validator, applicant_of

log = logging.getLogger(__name__)

Claims = list[tuple[str, Row[Any]]]  # (run id, claimed row)


@dataclass(frozen=True, slots=True)
class Submission:
    """What ``submit`` decided: ``accepted``, ``conflict`` (with the row) or ``not_found``."""

    outcome: str
    registration: RegistrationRequest | None = None


@dataclass(frozen=True, slots=True)
class BulkSubmission:
    """What ``submit_many`` decided for each registration asked for."""

    accepted: list[int]
    conflicts: list[RegistrationRequest]  # the rows as they are (running, or already final)
    not_found: list[int]


class Runner:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        core: CoreBanking,
        publisher: Publisher,
        keys: NationalIdKeys,
        concurrency: int = 64,
        lease_seconds: float = 60.0,
        open_transactions: int = 1,
        engine: AsyncEngine | None = None,
        heartbeat_interval: float = 2.0,
        heartbeat_timeout: float = 10.0,
        poll_interval: float = 1.0,
        take_batch: int = 16,
    ) -> None:
        self._sessions = sessions
        # the run's steps commit in groups; a validation failure is decided by reading only
        # (a drained worker's connection waits 0.25 s for the next batch: no pool checkout,
        # whose pre-ping is three round trips on PostgreSQL, when steps pause for a moment)
        self._commits = GroupCommit(
            sessions, max_open=open_transactions, decided=(ValidationFailure,), linger=0.25
        )
        self._publisher = publisher
        self._lease_ms = int(lease_seconds * 1000)
        # a run's steps: committed and published by the recorder, decided by the validator
        self._recorder = Recorder(self._commits, publisher, lease_ms=self._lease_ms)
        self._validator = Validator(self._recorder, core, keys)
        self._semaphore = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        # this instance's heartbeat and wake-ups; ``engine`` for LISTEN (PostgreSQL)
        self.fleet = FleetMember(
            sessions=sessions, engine=engine, heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout, poll_interval=poll_interval,
        )  # fmt: skip
        # at most this many runs per take: a bulk spreads over the instances with room
        self._take_batch = max(1, min(take_batch, concurrency))
        # the runs held at most: every slot busy and one batch waiting for a slot (the refill
        # rule, module doc); a run ending (or a click queued) wakes the take loop only once a
        # whole batch fits, so a busy instance takes a batch at a time, not one run per take
        self._capacity = concurrency + self._take_batch
        self._more = True  # the queue may hold runs for us (not looked since told or polled)
        # the runs this process holds, queued or running, by the task that runs each
        self._tasks: dict[asyncio.Task[None], Run] = {}
        # runs a take or claim committed after ``drain`` began: never started, given back by it
        self._unstarted: list[Run] = []
        self._draining = False
        self.accepting = True  # new runs are not taken or held once False (shutdown's phase 2)

    @property
    def running(self) -> int:
        return len(self._tasks)

    # --- entry points --------------------------------------------------------------------------

    async def submit(
        self,
        registration_id: int,
        *,
        started_by: str | None = None,
        on_claimed: Callable[[AsyncSession], Awaitable[object]] | None = None,
    ) -> Submission:
        """Claim the run and start it here if a pipeline slot is free, else queue it for the
        fleet. ``on_claimed`` writes in the claim's transaction (the audit entry of who
        started it)."""

        async def step(session: AsyncSession) -> tuple[str, Row[Any]] | RegistrationRequest | None:
            # Room here: hold it at once (no round trip through the queue). The clicks of one
            # group-commit batch all see the same room, so up to a batch of them more (64).
            mine = self._has_room()
            claim = await registrations.claim_for_processing(
                session, registration_id=registration_id, now_ms=now_ms(),
                lease_ms=self._lease_ms, started_by=started_by,
                instance_id=self.fleet.instance_id if mine else None,
            )  # fmt: skip
            if claim is None:
                return await registrations.get(session, registration_id=registration_id)
            if not mine:
                await work_queue.announce(session)
            if on_claimed is not None:
                await on_claimed(session)
            return claim

        def start(claim: tuple[str, Row[Any]] | RegistrationRequest | None) -> None:
            if isinstance(claim, tuple):
                run_id, claimed = claim
                if claimed.instance_id is None:
                    self._queued()
                    return
                run = Run(registration_id, run_id, claimed.run_count, applicant_of(claimed))
                metrics.RUNS_TAKEN.labels("direct").inc()
                self._spawn(run, resume=False)

        claim = await self._commits.run(step, then=start)
        if not isinstance(claim, tuple):
            return Submission("not_found" if claim is None else "conflict", claim)
        return Submission("accepted")

    async def submit_many(
        self,
        registration_ids: list[int],
        *,
        started_by: str | None = None,
        on_claimed: Callable[[AsyncSession, list[int]], Awaitable[object]] | None = None,
    ) -> BulkSubmission:
        """Bulk validation: claim every registration that may run now in one transaction (one
        statement) and queue them for the fleet (this instance included: it is woken at once).
        ``on_claimed`` gets the claimed ids, in that transaction."""

        async def step(session: AsyncSession) -> tuple[Claims, BulkSubmission]:
            claims = await registrations.claim_many(
                session, registration_ids=registration_ids, now_ms=now_ms(),
                lease_ms=self._lease_ms, started_by=started_by,
            )  # fmt: skip
            if claims:
                await work_queue.announce(session)
            accepted = sorted(row.id for _, row in claims)
            rest = sorted(set(registration_ids) - set(accepted))
            existing = await registrations.get_many(session, registration_ids=rest) if rest else []
            if accepted and on_claimed is not None:
                await on_claimed(session, accepted)
            found = {row.id for row in existing}
            return claims, BulkSubmission(
                accepted, sorted(existing, key=lambda r: r.id), [i for i in rest if i not in found]
            )

        def start(result: tuple[Claims, BulkSubmission]) -> None:
            if result[0]:
                self._queued()

        _, submission = await self._commits.run(step, then=start)
        return submission

    async def run(self) -> None:
        """This instance's part in the fleet, until cancelled: its heartbeat and wake-ups
        (``fleet``), taking queued runs, renewing the leases of the runs it holds."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.fleet.run(), name="fleet")
            group.create_task(self._take_loop(), name="work-queue")
            group.create_task(self._renew_loop(), name="lease-renewal")

    async def renew_leases(self) -> int:
        """Renew the lease of every run this process holds, including runs still waiting for a
        pipeline slot, so a live process's runs are never taken for lost (the backstop)."""
        return await leases.renew(self._sessions, list(self._tasks.values()),
                                  lease_ms=self._lease_ms)  # fmt: skip

    async def drain(self, grace: float) -> int:
        """Stop accepting and taking runs. Runs waiting for a pipeline slot go back to the
        shared queue at once; running validations get up to ``grace`` s, and those still running
        then go back too, so other instances resume them at once (from the process log) instead
        of after the heartbeat timeout. Returns how many were still running."""
        self.accepting = False
        self._draining = True
        waiting = {task: run for task, run in self._tasks.items() if not run.started}
        for task in waiting:
            task.cancel()
        if waiting:
            await asyncio.wait(set(waiting), timeout=1)
        await self._release([*waiting.values(), *self._take_unstarted()])
        running = dict(self._tasks)
        if running:
            await asyncio.wait(set(running), timeout=grace)
        left = {task: run for task, run in running.items() if not task.done()}
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(set(left), timeout=1)
        await self._commits.idle(timeout=1)
        # a take or claim still committing when drain began: its runs were not started either
        await self._release([*left.values(), *self._take_unstarted()])
        await self.fleet.stop()
        await self._commits.aclose()
        return len(left)

    async def aclose(self) -> None:
        """Give back the database connections the group commit keeps (``drain`` does too; this
        is for a shutdown that did not drain)."""
        await self._commits.aclose()

    # --- the shared queue ----------------------------------------------------------------------

    def _has_room(self) -> bool:
        """Room for a click: a free slot, or, while the shared queue may hold more (a bulk), up
        to one batch beyond what takes fill (the refill rule): with the queue empty, a click no
        slot here can take goes to the queue, where an idle instance starts it at once."""
        held = len(self._tasks)
        limit = self._capacity + self._take_batch if self._more else self._concurrency
        return self.accepting and self.fleet.registered.is_set() and held < limit

    def _queued(self) -> None:
        """Runs were queued here: look for them now if we have room for a batch (the other
        instances were NOTIFYed; a run ending or the poll brings them here otherwise)."""
        self._more = True
        if self._capacity - len(self._tasks) >= self._take_batch:
            self.fleet.work_queued()

    async def _take_loop(self) -> None:
        await self.fleet.registered.wait()
        while True:
            # woken or not (the poll): look, there may be runs we were not told of and runs of
            # dead instances to take over
            self._more = True
            try:
                while await self._take():
                    await asyncio.sleep(0)  # our runs, and the other instances, between batches
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop must survive a database blip
                log.warning("taking queued runs failed: %s", type(exc).__name__)
            await self.fleet.wait_for_work()

    async def _take(self) -> bool:
        """Take queued runs for the room left (``_capacity``), a batch at most, and start them
        (those beyond the free slots wait for one). True: a full batch came, so the queue may
        hold more."""
        free = self._capacity - len(self._tasks)
        if not (self._more and free > 0 and self.accepting and self.fleet.registered.is_set()):
            return False
        limit = min(free, self._take_batch)

        # a step of the group commit, like the claim: it shares the transaction of the runs'
        # steps committing meanwhile (on SQLite a transaction of its own took the write turn
        # from them) and the runs start right after the commit
        def step(session: Session) -> work_queue.Taken:
            now = now_ms()
            return work_queue.take_sync(
                session, instance_id=self.fleet.instance_id, limit=limit, now_ms=now,
                lease_ms=self._lease_ms, dead_before_ms=now - self.fleet.timeout_ms,
            )  # fmt: skip

        def start(taken: work_queue.Taken) -> None:
            for row in taken.rows:
                fresh = row.current_stage is None  # nothing logged in this run yet
                applicant = applicant_of(row) if fresh else None  # resumed: read with its log
                run = Run(row.id, taken.run_id, row.run_count, applicant)
                self._spawn(run, resume=not fresh)
            if taken.taken_over:
                log.warning("took over %d runs of an instance that stopped", taken.taken_over)
                metrics.RUNS_TAKEN.labels("taken_over").inc(taken.taken_over)
            metrics.RUNS_TAKEN.labels("queued").inc(len(taken.rows) - taken.taken_over)

        taken = await self._commits.run_sync(step, then=start)
        self._more = len(taken.rows) == limit
        return self._more

    async def _release(self, runs: list[Run]) -> None:
        await leases.release(self._sessions, runs, instance_id=self.fleet.instance_id)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 2000)
            try:
                await self.renew_leases()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop must survive a database blip
                log.warning("lease renewal failed: %s", type(exc).__name__)

    def _take_unstarted(self) -> list[Run]:
        runs, self._unstarted = self._unstarted, []
        return runs

    def _spawn(self, run: Run, *, resume: bool) -> None:
        if self._draining:  # committed after drain began: drain gives it back, unstarted
            self._unstarted.append(run)
            return
        task = asyncio.create_task(
            self._guarded(run, resume), name=f"validate-{run.registration_id}"
        )
        self._tasks[task] = run
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        free = self._capacity - len(self._tasks)
        if self._more and free >= self._take_batch:  # the queue may hold more, a batch fits
            self.fleet.work_queued()

    # --- the run -------------------------------------------------------------------------------

    async def _guarded(self, run: Run, resume: bool) -> None:
        async with self._semaphore:
            # A run publishes ~7 updates: start it only when the outbox can take them (Redis
            # slower than the pipeline must slow the pipeline, not drop live updates).
            await self._publisher.wait_for_room()
            run.started = True
            metrics.RUNS_IN_PROGRESS.inc()
            try:
                await run_through_outages(
                    run, resume=resume, sessions=self._sessions, validator=self._validator,
                    recorder=self._recorder, lease_ms=self._lease_ms,
                )  # fmt: skip
            except RunLost:
                log.warning(
                    "registration %d: run taken over by another worker", run.registration_id
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - last resort, see fail_unexpected
                await self._validator.fail_unexpected(run, exc)
            finally:
                metrics.RUNS_IN_PROGRESS.dec()
