"""Resuming runs: after a crash (another instance's run taken over), and through a database outage.

Each instance beats (``pipeline/fleet.py``); the runs of an instance whose heartbeat is older
than ``REGSTREAM_HEARTBEAT_TIMEOUT`` (or that stopped) are taken by the others under a new run id
(``runner``'s take loop) and resumed here: the run's log is read back, a T24 lookup that completed
before the crash is not repeated (its result is in the process log), one that was cut off is
retried. What the run's previous holder committed may never have reached Redis (it died while
Redis was down): it is queued again ahead of this run's updates, so they go out in order; the
publish script skips what Redis has seen (``pipeline/catch_up.py``). A runner whose run was taken
cannot write anything more (``RunLost``). The lease stays as a backstop: renewed at every step and
every half lease for every run the instance holds (``Runner.renew_leases``), it only expires for a
run a live instance lost track of, which the take loop then resumes too.
"""

from __future__ import annotations

import asyncio
import logging
import random

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from regstream.db import registrations
from regstream.db.engine import unavailable as database_unavailable
from regstream.db.registrations import RunLost
from regstream.pipeline import events
from regstream.pipeline.persist import Recorder, Run
from regstream.pipeline.validation import Validator, applicant_of

log = logging.getLogger(__name__)


async def run_through_outages(
    run: Run,
    *,
    resume: bool,
    sessions: async_sessionmaker[AsyncSession],
    validator: Validator,
    recorder: Recorder,
    lease_ms: int,
) -> None:
    """``resume_run``; when the database cannot answer (down, cut off, past its timeouts), wait
    for it and resume the run from its process log (a completed T24 lookup is not repeated)
    instead of failing it — failing needs the database too, so the run stayed IN PROGRESS until
    its lease expired (issue 16). Gives up after a lease's length: the lease backstop (another
    instance, or this one) takes it from there."""
    waited, delay = 0.0, 0.5
    while True:
        try:
            await resume_run(run, resume=resume, sessions=sessions, validator=validator,
                             recorder=recorder)  # fmt: skip
            return
        except (RunLost, asyncio.CancelledError):
            raise
        except Exception as exc:
            if not database_unavailable(exc) or waited >= lease_ms / 1000:
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


async def resume_run(
    run: Run,
    *,
    resume: bool,
    sessions: async_sessionmaker[AsyncSession],
    validator: Validator,
    recorder: Recorder,
) -> None:
    """Validate ``run``; with ``resume`` (or no applicant known yet), from its process log."""
    applicant = run.applicant
    accounts_found = None
    if resume or applicant is None:
        async with sessions() as session:
            row = await registrations.get(session, registration_id=run.registration_id)
            if row is None:
                return
            applicant = applicant_of(row)
            entries = await registrations.get_log(session, registration_id=row.id, run=run.run)
        run.logged = [registrations.to_log_event(e) for e in entries]
        accounts_found = events.completed_lookup(entries)
        if resume:
            # the previous holder's committed entries first, in order (module docstring)
            recorder.publish(run.logged)
    await validator.validate(run, applicant, accounts_found=accounts_found)
