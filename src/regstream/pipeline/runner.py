"""Runs validations in the background: claim, stages in order, log, persist, publish.

Every step follows the same order: write the process-log entries (and any data change) in one
transaction, commit, then publish them. So the database is always ahead of Redis, the final
status is stored before the final message goes out, and a failed publish never changes an
outcome (the publisher keeps it for later and never raises). A validation that reaches T24 takes
three transactions: the claim (with its audit entry), the duplicate check with its log entries,
and the outcome with its log entries and data change. Under load, the steps of many runs commit
together (``db.group_commit``), each still all-or-nothing. The run keeps its own log in memory
for the final message's ``processLog``.

Data changes that decide the outcome (enrolling a user, updating an enrolled user) commit in the
same transaction as the final status: a crash can never leave a person enrolled without the
APPROVED status, nor apply an update twice.

Shared work (``db/work_queue.py``): a claimed run is held by this instance when it has a free
pipeline slot (a click starts at once), and is otherwise *queued* in the database, as every
bulk validation's runs are. ``run()`` takes queued runs for its free slots, a small batch at a
time so that a bulk spreads over the fleet; it looks when told (this instance queued runs, or
another one did: LISTEN/NOTIFY on PostgreSQL) or when slots free while the queue may hold more,
in both cases once it has room for a batch (a quarter of its slots, 16 at most), and at least
every poll interval.

Crash recovery: each instance beats (``pipeline/fleet.py``); the runs of an instance whose
heartbeat is older than ``REGSTREAM_HEARTBEAT_TIMEOUT`` (or that stopped) are taken by the
others under a new run id and resumed: a T24 lookup that completed before the crash is not
repeated (its result is in the process log), one that was cut off is retried. A runner whose
run was taken cannot write anything more (``RunLost``). The lease stays as a backstop: renewed
at every step and every half lease for every run the instance holds (``renew_leases``), it
only expires for a run a live instance lost track of, which ``take`` then resumes too.
At shutdown (``drain``) runs not started go back to the queue at once, and those still running
after the grace period too, so the others resume them without waiting for the timeout.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from regstream import metrics
from regstream.core_banking.client import CoreBanking
from regstream.core_banking.errors import CoreBankingError
from regstream.db import registrations, users, work_queue
from regstream.db.driver import Bound
from regstream.db.engine import unavailable as database_unavailable
from regstream.db.group_commit import GroupCommit
from regstream.db.registrations import Event, LogEvent, RunLost
from regstream.db.tables import RegistrationRequest
from regstream.domain.enums import RegistrationStatus, Stage, StageStatus
from regstream.domain.errors import ERROR_MESSAGES, ErrorCode, ValidationFailure
from regstream.domain.models import Applicant
from regstream.domain.pii import NationalIdKeys
from regstream.pipeline import stages
from regstream.pipeline.fleet import FleetMember

log = logging.getLogger(__name__)

PENDING = RegistrationStatus.PENDING.value

Claims = list[tuple[str, Row[Any]]]  # (run id, claimed row)


class Publisher(Protocol):
    def enqueue_update(self, update: dict[str, Any]) -> None: ...

    async def wait_for_room(self) -> None: ...


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


@dataclass(slots=True)
class _Run:
    registration_id: int
    run_id: str
    run: int
    applicant: Applicant | None = None  # known from the claim; read again when resuming
    logged: list[LogEvent] = field(default_factory=list)  # this run's log, in order
    started: bool = False  # has a pipeline slot (until then, a shutdown gives it back)


class Outcome(Exception):
    """Internal control flow: the run ended with this final status."""

    def __init__(self, status: RegistrationStatus, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


def stage_message(stage: Stage, status: StageStatus) -> str:
    return f"{status.value}: {stage.value}"


def event_to_update(
    event: LogEvent, process_log: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The published form of a log entry (exactly the seed's fields plus seq/stageStatus)."""
    update: dict[str, Any] = {
        "registrationId": event.registration_id,
        "status": event.status,
        "timestamp": event.timestamp_ms,
        "message": event.message,
        "seq": event.seq,
    }
    if event.stage is not None:
        update["stage"] = event.stage
        update["stageStatus"] = event.stage_status
        if event.details:
            update["details"] = event.details
    else:
        update["details"] = event.details or {}
        update["final"] = True
        if process_log is not None:
            update["processLog"] = process_log
    return update


def log_entry_view(event: LogEvent) -> dict[str, Any]:
    view: dict[str, Any] = {
        "seq": event.seq,
        "stage": event.stage,
        "status": event.stage_status or event.status,
        "message": event.message,
        "timestamp": event.timestamp_ms,
    }
    if event.details:
        view["details"] = event.details
    return view


def applicant_of(row: RegistrationRequest | Row[Any]) -> Applicant:
    return Applicant(
        customer_number=row.customer_number,
        first_name=row.first_name,
        last_name=row.last_name,
        date_of_birth=row.date_of_birth,
        national_id=row.national_id,
        id_type=row.id_type,
        phone=row.phone,
        email=row.email,
        account_number=row.account_number,
        device_id=row.device_id,
    )


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
        self._commits = GroupCommit(
            sessions, max_open=open_transactions, decided=(ValidationFailure,)
        )
        self._core = core
        self._publisher = publisher
        self._keys = keys  # national-id HMAC keys: the current one, then any being rotated out
        self._semaphore = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._lease_ms = int(lease_seconds * 1000)
        # this instance's heartbeat and wake-ups; ``engine`` for LISTEN (PostgreSQL)
        self.fleet = FleetMember(
            sessions=sessions, engine=engine, heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout, poll_interval=poll_interval,
        )  # fmt: skip
        # at most this many runs per take: a bulk spreads over the instances with room
        self._take_batch = take_batch
        # a slot freed (or a click queued) wakes the take loop only once this many are free: a
        # busy instance then takes a batch at a time, not one run per take
        self._wake_at = min(take_batch, max(1, concurrency // 4))
        self._more = True  # the queue may hold runs for us (not looked since told or polled)
        # the runs this process holds, queued or running, by the task that runs each
        self._tasks: dict[asyncio.Task[None], _Run] = {}
        self.accepting = True

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
            # Room here: hold it at once (no round trip through the queue). Under a burst the
            # clicks of one batch all see the same room, so a few may wait for a slot here.
            mine = self._has_room()
            claim = await registrations.claim_for_processing(
                session, registration_id=registration_id, now_ms=_now_ms(),
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
                run = _Run(registration_id, run_id, claimed.run_count, applicant_of(claimed))
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
                session, registration_ids=registration_ids, now_ms=_now_ms(),
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
        runs = list(self._tasks.values())
        renewed = 0
        for start in range(0, len(runs), 500):
            chunk = runs[start : start + 500]
            async with self._sessions.begin() as session:
                renewed += await registrations.renew_leases(
                    session, runs=[(r.registration_id, r.run_id) for r in chunk],
                    lease_until_ms=_now_ms() + self._lease_ms,
                )  # fmt: skip
        return renewed

    async def drain(self, grace: float) -> int:
        """Stop accepting and taking runs. Runs waiting for a pipeline slot go back to the
        shared queue at once; running validations get up to ``grace`` s, and those still running
        then go back too, so other instances resume them at once (from the process log) instead
        of after the heartbeat timeout. Returns how many were still running."""
        self.accepting = False
        waiting = {task: run for task, run in self._tasks.items() if not run.started}
        for task in waiting:
            task.cancel()
        if waiting:
            await asyncio.wait(set(waiting), timeout=1)
        await self._release(list(waiting.values()))
        running = dict(self._tasks)
        if running:
            await asyncio.wait(set(running), timeout=grace)
        left = {task: run for task, run in running.items() if not task.done()}
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(set(left), timeout=1)
        await self._commits.idle(timeout=1)
        await self._release(list(left.values()))
        await self.fleet.stop()
        return len(left)

    # --- the shared queue ----------------------------------------------------------------------

    def _has_room(self) -> bool:
        return (
            self.accepting
            and self.fleet.registered.is_set()
            and len(self._tasks) < self._concurrency
        )

    def _queued(self) -> None:
        """Runs were queued here: look for them now if we have room for a batch (the other
        instances were NOTIFYed; a freed slot or the poll brings them here otherwise)."""
        self._more = True
        if self._concurrency - len(self._tasks) >= self._wake_at:
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
        """Take queued runs for the free pipeline slots, a batch at most, and start them.
        True: a full batch came, so the queue may hold more."""
        free = self._concurrency - len(self._tasks)
        if not (self._more and free > 0 and self.accepting and self.fleet.registered.is_set()):
            return False
        limit = min(free, self._take_batch)

        # a step of the group commit, like the claim: it shares the transaction of the runs'
        # steps committing meanwhile (on SQLite a transaction of its own took the write turn
        # from them) and the runs start right after the commit
        async def step(session: AsyncSession) -> work_queue.Taken:
            now = _now_ms()
            return await work_queue.take(
                session, instance_id=self.fleet.instance_id, limit=limit, now_ms=now,
                lease_ms=self._lease_ms, dead_before_ms=now - self.fleet.timeout_ms,
            )  # fmt: skip

        def start(taken: work_queue.Taken) -> None:
            for row in taken.rows:
                fresh = row.current_stage is None  # nothing logged in this run yet
                applicant = applicant_of(row) if fresh else None  # resumed: read with its log
                run = _Run(row.id, taken.run_id, row.run_count, applicant)
                self._spawn(run, resume=not fresh)
            if taken.taken_over:
                log.warning("took over %d runs of an instance that stopped", taken.taken_over)
                metrics.RUNS_TAKEN.labels("taken_over").inc(taken.taken_over)
            metrics.RUNS_TAKEN.labels("queued").inc(len(taken.rows) - taken.taken_over)

        taken = await self._commits.run(step, then=start)
        self._more = len(taken.rows) == limit
        return self._more

    async def _release(self, runs: list[_Run]) -> None:
        if not runs:
            return
        try:
            async with self._sessions.begin() as session:
                released = await work_queue.release(
                    session, instance_id=self.fleet.instance_id,
                    runs=[(r.registration_id, r.run_id) for r in runs],
                )  # fmt: skip
                await work_queue.announce(session)
        except Exception as exc:  # noqa: BLE001 - they are taken over after the timeout
            log.warning(
                "could not give %d runs back to the queue: %s", len(runs), type(exc).__name__
            )
            return
        metrics.RUNS_RELEASED.inc(released)
        log.info("gave %d runs back to the shared queue", released)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 2000)
            try:
                await self.renew_leases()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop must survive a database blip
                log.warning("lease renewal failed: %s", type(exc).__name__)

    def _spawn(self, run: _Run, *, resume: bool) -> None:
        task = asyncio.create_task(
            self._guarded(run, resume), name=f"validate-{run.registration_id}"
        )
        self._tasks[task] = run
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        free = self._concurrency - len(self._tasks)
        if self._more and free >= self._wake_at:  # the queue may hold more, and we have room
            self.fleet.work_queued()

    # --- the run -------------------------------------------------------------------------------

    async def _guarded(self, run: _Run, resume: bool) -> None:
        async with self._semaphore:
            # A run publishes ~7 updates: start it only when the outbox can take them (Redis
            # slower than the pipeline must slow the pipeline, not drop live updates).
            await self._publisher.wait_for_room()
            run.started = True
            metrics.RUNS_IN_PROGRESS.inc()
            try:
                await self._run_through_outages(run, resume)
            except RunLost:
                log.warning(
                    "registration %d: run taken over by another worker", run.registration_id
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - last resort, see _fail_unexpected
                await self._fail_unexpected(run, exc)
            finally:
                metrics.RUNS_IN_PROGRESS.dec()

    async def _run_through_outages(self, run: _Run, resume: bool) -> None:
        """``_run``; when the database cannot answer (down, cut off, past its timeouts), wait for
        it and resume the run from its process log (a completed T24 lookup is not repeated)
        instead of failing it — failing needs the database too, so the run stayed IN PROGRESS
        until its lease expired (issue 16). Gives up after a lease's length: the lease backstop
        (another instance, or this one) takes it from there."""
        waited, delay = 0.0, 0.5
        while True:
            try:
                await self._run(run, resume)
                return
            except (RunLost, asyncio.CancelledError):
                raise
            except Exception as exc:
                if not database_unavailable(exc) or waited >= self._lease_ms / 1000:
                    raise
                if waited == 0:
                    log.warning(
                        "registration %d: database unavailable (%s); resuming when it answers",
                        run.registration_id, type(exc).__name__,
                    )  # fmt: skip
                pause = delay * (0.5 + random.random())
                await asyncio.sleep(pause)
                waited += pause
                delay = min(delay * 2, 5.0)
                resume = True

    async def _run(self, run: _Run, resume: bool) -> None:
        cached_accounts = None
        applicant = run.applicant
        if resume or applicant is None:
            async with self._sessions() as session:
                row = await registrations.get(session, registration_id=run.registration_id)
                if row is None:
                    return
                applicant = applicant_of(row)
                entries = await registrations.get_log(session, registration_id=row.id, run=run.run)
            run.logged = [registrations.to_log_event(e) for e in entries]
            cached_accounts = _completed_lookup(entries)
            if resume:
                # what the run's previous holder committed may never have reached Redis (it died
                # while Redis was down): queued again ahead of this run's updates, so they go out
                # in order; the publish script skips what Redis has seen (pipeline/catch_up.py)
                self._publish(run.logged)
        nid_hashes = self._keys.hashes(applicant.id_type, applicant.national_id)
        nid_hash = nid_hashes[0]  # what a new enrolment stores
        stage = Stage.DUPLICATE_CHECK
        started = time.perf_counter()
        try:
            if cached_accounts is not None:
                stage = Stage.STATUS_UPDATE
                await self._approve(run, applicant, nid_hash, cached_accounts, announce=True)
                return
            existing_found = await self._duplicate_check(run, applicant, nid_hashes)
            _observe(Stage.DUPLICATE_CHECK, "ok", started)
            if existing_found:
                stage = Stage.UPDATE_USER_INFO
                started = time.perf_counter()
                await self._update_existing(run, applicant, nid_hashes)
                _observe(Stage.UPDATE_USER_INFO, "ok", started)
                return
            stage = Stage.T24_LOOKUP
            started = time.perf_counter()
            count = await stages.t24_lookup(self._core, applicant)
            _observe(Stage.T24_LOOKUP, "ok", started)
            stage = Stage.STATUS_UPDATE
            started = time.perf_counter()
            approved = await self._approve(run, applicant, nid_hash, count, announce=False)
            _observe(Stage.STATUS_UPDATE, "ok" if approved else "failed", started)
        except ValidationFailure as failure:
            _observe(stage, "failed", started)
            details: dict[str, Any] = {"error": failure.code.value, "retryable": failure.retryable}
            if failure.fields:
                details["mismatchedFields"] = failure.fields
            await self._fail(run, stage, failure.code, details)
        except CoreBankingError as error:
            _observe(stage, "failed", started)
            log.info("registration %d: core banking error %s", run.registration_id, error.code)
            details = {"error": error.code.value, "retryable": error.retryable}
            await self._fail(run, stage, error.code, details)

    async def _duplicate_check(
        self, run: _Run, applicant: Applicant, nid_hashes: tuple[str, ...]
    ) -> bool:
        """One transaction: the check, "started" logged with its result. True: the applicant
        is enrolled already (same CIF)."""

        async def step(session: AsyncSession) -> tuple[list[LogEvent], bool]:
            # Most applicants match no one: the query and that result's log entries are one
            # statement (one round trip to PostgreSQL); the rows, if any, are decided here.
            query = users.matching(
                customer_number=applicant.customer_number, phone=applicant.phone,
                national_id_hashes=nid_hashes,
            )  # fmt: skip
            logged, rows = await registrations.append_events_unless(
                session, unless=query, registration_id=run.registration_id, run_id=run.run_id,
                run=run.run, events=_NO_DUPLICATE, now_ms=_now_ms(), lease_ms=self._lease_ms,
            )  # fmt: skip
            if logged is not None:
                return logged, False
            matches = [users.Match(*row) for row in rows]
            existing = stages.duplicate_check(matches, applicant, nid_hashes).existing
            assert existing is not None  # a match on the phone or id alone raised above
            events = [
                _started(Stage.DUPLICATE_CHECK),
                _done(
                    Stage.DUPLICATE_CHECK, "Existing user found", {"existingUserId": existing.id}
                ),
                _started(Stage.UPDATE_USER_INFO),
            ]
            return await self._append(session, run, events), True

        def publish(result: tuple[list[LogEvent], bool]) -> None:
            run.logged.extend(result[0])
            self._publish(result[0])

        _, existing_found = await self._commits.run(step, then=publish)
        return existing_found

    async def _update_existing(
        self, run: _Run, applicant: Applicant, nid_hashes: tuple[str, ...]
    ) -> None:
        async def work(session: AsyncSession) -> tuple[list[Event], Outcome]:
            user = await users.get_by_customer_number(
                session, customer_number=applicant.customer_number
            )
            if user is None:  # removed meanwhile: treat as a plain failure, re-validation works
                raise ValidationFailure(ErrorCode.INTERNAL_ERROR)
            updated = await stages.update_user_info(session, user, applicant, nid_hashes)
            if updated:
                outcome = Outcome(
                    RegistrationStatus.COMPLETED, "User already exists - information updated",
                    {"updatedFields": updated, "existingUserId": user.id},
                )  # fmt: skip
                message = "Updated fields: " + ", ".join(updated)
            else:
                outcome = Outcome(
                    RegistrationStatus.DUPLICATE, "User already exists with identical information",
                    {"existingUserId": user.id},
                )  # fmt: skip
                message = "No changes"
            events = [
                _done(
                    Stage.UPDATE_USER_INFO, message, {"updatedFields": updated} if updated else None
                ),
                _started(Stage.STATUS_UPDATE),
                _done(Stage.STATUS_UPDATE, f"Status set to {outcome.status.value}"),
            ]
            return events, outcome

        await self._finish(run, work)

    async def _approve(
        self, run: _Run, applicant: Applicant, nid_hash: str, count: int, *, announce: bool
    ) -> bool:
        """Enrol and approve in one transaction with the T24 result's log entries (``announce``:
        resuming after a crash, the lookup's result is already logged). False: someone enrolled
        the same person meanwhile, and the run ended FAILED."""
        before: list[Event] = [_started(Stage.STATUS_UPDATE)]
        if not announce:
            lookup = _done(Stage.T24_LOOKUP, f"Found {count} accounts", {"accountsFound": count})
            before.insert(0, lookup)

        enrolment = users.enrolment(
            customer_number=applicant.customer_number,
            first_name=applicant.first_name,
            last_name=applicant.last_name,
            phone=applicant.phone,
            email=applicant.email,
            date_of_birth=applicant.date_of_birth,
            national_id_hash=nid_hash,
            national_id_last4=applicant.national_id[-4:],
            device_id=applicant.device_id,
            registration_id=run.registration_id,
        )

        async def work(_session: AsyncSession) -> tuple[list[Event], Outcome]:
            outcome = Outcome(
                RegistrationStatus.APPROVED,
                f"Customer validated successfully. Found {count} accounts.",
                {"accountsFound": count},
            )
            return [*before, _done(Stage.STATUS_UPDATE, "Status set to APPROVED")], outcome

        try:
            await self._finish(run, work, also=enrolment)  # the enrolment commits with APPROVED
            return True
        except IntegrityError:
            # Someone enrolled the same person between our duplicate check and now; the
            # transaction (with the lookup's log entries) rolled back, so log them with the failure.
            code = ErrorCode.ID_ALREADY_ENROLLED
            retryable = ValidationFailure(code).retryable
            details = {"error": code.value, "retryable": retryable}
            await self._fail(run, Stage.STATUS_UPDATE, code, details, before=before)
            return False

    async def _fail(
        self,
        run: _Run,
        stage: Stage,
        code: ErrorCode,
        details: dict[str, Any],
        *,
        before: list[Event] | None = None,
    ) -> None:
        message = ERROR_MESSAGES[code]
        events: list[Event] = list(before or ())
        if not any(e.stage == stage.value for e in run.logged) and not events:
            # a stage that failed inside its own transaction logged nothing: say it started
            events.append(_started(stage))
        events.append(
            (stage.value, StageStatus.FAILED.value, PENDING, message, {"error": code.value})
        )

        async def work(_session: AsyncSession) -> tuple[list[Event], Outcome]:
            return events, Outcome(RegistrationStatus.FAILED, message, details)

        await self._finish(run, work)

    async def _fail_unexpected(self, run: _Run, exc: BaseException) -> None:
        # Log where it happened, never the exception text: driver errors quote SQL parameters,
        # which are personal data.
        frames = "".join(traceback.format_tb(exc.__traceback__)[-5:])
        log.error(
            "registration %d: unexpected %s\n%s", run.registration_id, type(exc).__name__, frames
        )
        try:
            await self._fail(
                run, Stage.STATUS_UPDATE, ErrorCode.INTERNAL_ERROR,
                {"error": ErrorCode.INTERNAL_ERROR.value, "retryable": True},
            )  # fmt: skip
        except Exception as again:  # noqa: BLE001 - the lease will expire and recovery resumes it
            log.error(
                "registration %d: could not record failure (%s)",
                run.registration_id,
                type(again).__name__,
            )

    # --- persistence + publication -------------------------------------------------------------

    async def _finish(
        self,
        run: _Run,
        work: Callable[[AsyncSession], Awaitable[tuple[list[Event], Outcome]]],
        *,
        also: Bound | None = None,
    ) -> None:
        """End the run: ``work``'s log entries, the final status, and ``also`` (a write that
        commits with them, ``registrations.append_events``) in one transaction."""

        async def step(session: AsyncSession) -> tuple[list[LogEvent], Outcome]:
            events, outcome = await work(session)
            final: Event = (None, None, outcome.status.value, outcome.message, outcome.details)
            logged = await self._append(
                session, run, [*events, final], final=(outcome.status.value, {
                    "message": outcome.message, "details": outcome.details,
                }), also=also,
            )  # fmt: skip
            return logged, outcome

        def publish(result: tuple[list[LogEvent], Outcome]) -> None:
            logged, outcome = result
            run.logged.extend(logged)
            status, error = outcome.status.value, str(outcome.details.get("error", ""))
            metrics.OUTCOMES.labels(status, error).inc()
            self._publish(logged, [log_entry_view(e) for e in run.logged if e.stage])

        await self._commits.run(step, then=publish)

    async def _append(
        self,
        session: AsyncSession,
        run: _Run,
        events: list[Event],
        final: tuple[str, dict[str, Any]] | None = None,
        also: Bound | None = None,
    ) -> list[LogEvent]:
        return await registrations.append_events(
            session, registration_id=run.registration_id, run_id=run.run_id, run=run.run,
            events=events, now_ms=_now_ms(), lease_ms=self._lease_ms, final=final, also=also,
        )  # fmt: skip

    def _publish(
        self, logged: list[LogEvent], process_log: list[dict[str, Any]] | None = None
    ) -> None:
        for event in logged:
            self._publisher.enqueue_update(
                event_to_update(event, process_log if event.stage is None else None)
            )


def _started(stage: Stage) -> Event:
    return (
        stage.value,
        StageStatus.STARTED.value,
        PENDING,
        stage_message(stage, StageStatus.STARTED),
        None,
    )


def _done(stage: Stage, message: str, details: dict[str, Any] | None = None) -> Event:
    return (stage.value, StageStatus.COMPLETED.value, PENDING, message, details)


#: The duplicate check's common result, appended by its query's statement (``_duplicate_check``).
_NO_DUPLICATE: list[Event] = [
    _started(Stage.DUPLICATE_CHECK),
    _done(Stage.DUPLICATE_CHECK, "No duplicate found"),
    _started(Stage.T24_LOOKUP),
]


def _completed_lookup(entries: list[Any]) -> int | None:
    for entry in entries:
        if (
            entry.stage == Stage.T24_LOOKUP.value
            and entry.stage_status == StageStatus.COMPLETED.value
        ):
            count = (entry.details or {}).get("accountsFound")
            if isinstance(count, int):
                return count
    return None


def _observe(stage: Stage, result: str, started: float) -> None:
    metrics.STAGE_DURATION.labels(stage.value, result).observe(time.perf_counter() - started)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
