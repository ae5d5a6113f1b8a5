"""Writing a run's steps and publishing them: commit first, then publish, in commit order.

Every step of a run is one ``Recorder.commit``: its log entries (and any data change) in one
transaction of the group commit (``db/group_commit.py``: the steps of many runs commit
together, each still all-or-nothing), then, right after that commit, its entries are queued
for publication (``publish``). That hand-off is the group commit's ``then``, the one callback of
a step: it runs in the commit's worker, in commit order, even when the run's task was cancelled
meanwhile (a shutdown), so whatever was committed is published. So the database is always ahead
of Redis, the final status is stored before the final message goes out, and a failed publish
never changes an outcome (the publisher keeps it for later and never raises).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from sqlalchemy.orm import Session

from regstream import metrics
from regstream.db import registrations
from regstream.db.group_commit import GroupCommit
from regstream.db.registrations import Bound, Event, LogEvent
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
    """Commits a run's steps (``commit``, ``finish``) and publishes what they logged.

    Steps are sync functions of a ``Session`` (``GroupCommit.run_sync``): the consecutive steps
    of a batch run in one hop into SQLAlchemy's greenlet, and on SQLite in one thread."""

    def __init__(self, commits: GroupCommit, publisher: Publisher, *, lease_ms: int) -> None:
        self._commits = commits
        self._publisher = publisher
        self._lease_ms = lease_ms

    def append_unless(
        self, session: Session, run: Run, entries: list[Event], *, unless: Bound
    ) -> tuple[list[LogEvent] | None, list[tuple[Any, ...]]]:
        """``append`` only if the query ``unless`` finds no rows; else ``(None, rows)``
        (``registrations.append_events_unless_sync``; ``entries`` as ``events.rows`` makes
        them)."""
        return registrations.append_events_unless_sync(
            session, unless=unless, registration_id=run.registration_id, run_id=run.run_id,
            run=run.run, events=entries, now_ms=now_ms(), lease_ms=self._lease_ms,
        )  # fmt: skip

    def append(
        self,
        session: Session,
        run: Run,
        entries: list[LogEntry],
        *,
        final: tuple[str, dict[str, Any]] | None = None,
        also: Bound | None = None,
    ) -> list[LogEvent]:
        """Write ``entries`` in ``session`` (numbered by the database; the lease renewed)."""
        return registrations.append_events_sync(
            session, registration_id=run.registration_id, run_id=run.run_id, run=run.run,
            events=events.rows(entries), now_ms=now_ms(), lease_ms=self._lease_ms, final=final,
            also=also,
        )  # fmt: skip

    async def commit(self, run: Run, step: Callable[[Session], tuple[list[LogEvent], T]]) -> T:
        """Run ``step`` in a group-commit transaction; once committed, what it logged joins the
        run's log and is queued for publication. Returns the step's other result."""

        def publish(result: tuple[list[LogEvent], T]) -> None:
            run.logged.extend(result[0])
            self.publish(result[0])

        _, value = await self._commits.run_sync(step, then=publish)
        return value

    async def finish(self, run: Run, work: Work, *, also: Bound | None = None) -> None:
        """End the run: ``work``'s entries, the final entry and status, and ``also`` (a write
        that commits with them: the enrolment that goes with APPROVED) in one transaction; the
        final message carries the run's stages as ``processLog``."""

        def step(session: Session) -> tuple[list[LogEvent], Outcome]:
            entries, outcome = work(session)
            result = {"message": outcome.message, "details": outcome.details}
            logged = self.append(
                session, run, [*entries, events.final(outcome.status, outcome.message,
                                                      outcome.details)],
                final=(outcome.status.value, result), also=also,
            )  # fmt: skip
            return logged, outcome

        def publish(result: tuple[list[LogEvent], Outcome]) -> None:
            logged, outcome = result
            run.logged.extend(logged)
            status, error = outcome.status.value, str(outcome.details.get("error", ""))
            metrics.OUTCOMES.labels(status, error).inc()
            self.publish(logged, [events.log_entry_view(e) for e in run.logged if e.stage])

        await self._commits.run_sync(step, then=publish)

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
