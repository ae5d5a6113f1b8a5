"""Writing a run's steps and publishing them: commit first, then publish, in commit order.

Every step of a run is one step of the group commit (``Recorder.commit_after``, ``finish``,
``finish_with``): its log entries (and any data change) in one transaction of the group commit
(``db/group_commit.py``: the steps of many runs commit together, each still all-or-nothing),
then, right after that commit, its entries are queued for publication (``publish``). That
hand-off is the group commit's ``then``, the one callback of a step: it runs in the commit's
worker, in commit order, even when the run's task was cancelled meanwhile (a shutdown), so
whatever was committed is published. So the database is always ahead of Redis, the final status
is stored before the final message goes out, and a failed publish never changes an outcome (the
publisher keeps it for later and never raises).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from sqlalchemy.orm import Session

from regstream import metrics
from regstream.db.group_commit import GroupCommit
from regstream.db.registrations import Append, Appended, Bound, Event, LogEvent
from regstream.domain.enums import RegistrationStatus
from regstream.domain.models import Applicant
from regstream.pipeline import events
from regstream.pipeline.events import LogEntry

T = TypeVar("T")


class Publisher(Protocol):
    def enqueue_update(self, update: dict[str, Any]) -> None: ...

    async def wait_for_room(self) -> None: ...


@dataclass(slots=True)
class Run:
    """One run of a registration's validation, as this instance holds it."""

    registration_id: int
    run_id: str
    run: int
    applicant: Applicant | None = None  # known from the claim; read again when resuming
    logged: list[LogEvent] = field(default_factory=list)  # this run's log, in order
    started: bool = False  # has a pipeline slot (until then, a shutdown gives it back)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run ends: its final status, message and details."""

    status: RegistrationStatus
    message: str
    details: dict[str, Any]


#: a step's work in the transaction: the entries to log before the final one, and the outcome
Work = Callable[[Session], tuple[list[LogEntry], Outcome]]


class Recorder:
    """Commits a run's steps (``commit_after``, ``finish``, ``finish_with``) and publishes what
    they logged.

    Steps are sync functions of a ``Session`` (``GroupCommit.run_sync``, ``run_after``): the
    consecutive steps of a batch run in one hop into SQLAlchemy's greenlet, and on SQLite in one
    thread; a step that begins with its append (``appending``) has that statement sent with the
    batch's others on PostgreSQL."""

    def __init__(self, commits: GroupCommit, publisher: Publisher, *, lease_ms: int) -> None:
        self._commits = commits
        self._publisher = publisher
        self._lease_ms = lease_ms

    def appending(
        self,
        run: Run,
        entries: list[Event],
        *,
        unless: Bound | None = None,
        final: tuple[str, dict[str, Any]] | None = None,
        also: Bound | None = None,
    ) -> Append:
        """The append of ``entries`` (as ``events.rows`` makes them) to ``run``'s log, the lease
        renewed, to run in a step (``execute``, or first: ``commit_after``), timed when it runs.
        ``unless``: only if this query finds no rows (``registrations.append_events_unless``);
        or ``final`` and ``also`` as ``registrations.append_events`` takes them."""
        if unless is not None and (final is not None or also is not None):
            raise ValueError("a guarded append writes no final status and no member")
        return Append(
            run.registration_id, run.run_id, run.run, entries, None, self._lease_ms,
            final=final, member=unless if unless is not None else also, guard=unless is not None,
        )  # fmt: skip

    def append(self, session: Session, run: Run, entries: list[LogEntry]) -> list[LogEvent]:
        """Write ``entries`` in ``session`` (numbered by the database; the lease renewed)."""
        return self.appending(run, events.rows(entries)).written(session)

    async def commit_after(
        self,
        run: Run,
        first: Append,
        step: Callable[[Session, Appended], tuple[list[LogEvent], T]],
    ) -> T:
        """Run ``step``, which begins with the append ``first`` (``appending``) and is given
        what it did, in a group-commit transaction (``GroupCommit.run_after``: on PostgreSQL
        the first appends of many runs' steps go together); once committed, what it logged
        joins the run's log and is queued for publication. Returns the step's other result."""
        _, value = await self._commits.run_after(first, step, then=self._logged(run))
        return value

    async def finish(
        self, run: Run, entries: list[LogEntry], outcome: Outcome, *, also: Bound | None = None
    ) -> None:
        """End the run: ``entries``, the final entry and status, and ``also`` (a write that
        commits with them: the enrolment that goes with APPROVED) in one transaction, one
        statement on PostgreSQL (sent with other runs' steps); the final message carries the
        run's stages as ``processLog``."""
        first = self._final(run, entries, outcome, also)

        def step(_session: Session, appended: Appended) -> tuple[list[LogEvent], Outcome]:
            assert appended[0] is not None  # no guard
            return appended[0], outcome

        await self._commits.run_after(first, step, then=self._finished(run))

    async def finish_with(self, run: Run, work: Work) -> None:
        """``finish`` with the entries and outcome that ``work`` decides in the transaction
        (it reads and writes in it first)."""

        def step(session: Session) -> tuple[list[LogEvent], Outcome]:
            entries, outcome = work(session)
            return self._final(run, entries, outcome, None).written(session), outcome

        await self._commits.run_sync(step, then=self._finished(run))

    def _final(
        self, run: Run, entries: list[LogEntry], outcome: Outcome, also: Bound | None
    ) -> Append:
        final = events.final(outcome.status, outcome.message, outcome.details)
        result = {"message": outcome.message, "details": outcome.details}
        return self.appending(
            run, events.rows([*entries, final]), final=(outcome.status.value, result), also=also
        )

    def _logged(self, run: Run) -> Callable[[tuple[list[LogEvent], Any]], None]:
        """After a step's commit: what it logged joins the run's log and goes to publication."""

        def publish(result: tuple[list[LogEvent], Any]) -> None:
            run.logged.extend(result[0])
            self.publish(result[0])

        return publish

    def _finished(self, run: Run) -> Callable[[tuple[list[LogEvent], Outcome]], None]:
        """After the final step's commit: counted, and published with the run's stages."""

        def publish(result: tuple[list[LogEvent], Outcome]) -> None:
            logged, outcome = result
            run.logged.extend(logged)
            status, error = outcome.status.value, str(outcome.details.get("error", ""))
            metrics.OUTCOMES.labels(status, error).inc()
            self.publish(logged, [events.log_entry_view(e) for e in run.logged if e.stage])

        return publish

    def publish(
        self, logged: list[LogEvent], process_log: list[dict[str, Any]] | None = None
    ) -> None:
        """Queue written entries for publication, in order (``process_log``: the final's)."""
        for event in logged:
            self._publisher.enqueue_update(
                events.to_update(event, process_log if event.stage is None else None)
            )


def now_ms() -> int:
    return time.time_ns() // 1_000_000
