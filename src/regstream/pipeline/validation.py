"""One validation, step by step: duplicate check, then update of an enrolled user or T24 lookup,
then the status (``stages`` decides each step; ``persist.Recorder`` commits and publishes it).

A validation that reaches T24 takes two transactions after its claim: the duplicate check with
its log entries, and the outcome with its log entries and data change. Data changes that decide
the outcome (enrolling a user, updating an enrolled user) commit in the same transaction as the
final status: a crash can never leave a person enrolled without the APPROVED status, nor apply
an update twice. A run resumed after a crash (``recovery``) skips a T24 lookup its log shows
completed.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import fields
from typing import Any

from sqlalchemy import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from regstream import metrics
from regstream.core_banking.client import CoreBanking
from regstream.core_banking.errors import CoreBankingError
from regstream.db import users
from regstream.db.registrations import Appended, LogEvent
from regstream.db.tables import RegistrationRequest
from regstream.domain.enums import RegistrationStatus, Stage
from regstream.domain.errors import ERROR_MESSAGES, ErrorCode, ValidationFailure
from regstream.domain.models import Applicant
from regstream.domain.pii import NationalIdKeys
from regstream.pipeline import events, stages
from regstream.pipeline.events import LogEntry
from regstream.pipeline.persist import Outcome, Recorder, Run

log = logging.getLogger(__name__)


class Validator:
    """Runs a claimed registration's stages (``validate``) and records each step."""

    def __init__(self, recorder: Recorder, core: CoreBanking, keys: NationalIdKeys) -> None:
        self._recorder = recorder
        self._core = core
        self._keys = keys  # national-id HMAC keys: the current one, then any being rotated out

    async def validate(
        self, run: Run, applicant: Applicant, *, accounts_found: int | None = None
    ) -> None:
        """The run's stages, to its final status. ``accounts_found``: a resumed run's completed
        T24 lookup (its result is in the log): only the status is left to set."""
        nid_hashes = self._keys.hashes(applicant.id_type, applicant.national_id)
        nid_hash = nid_hashes[0]  # what a new enrolment stores
        stage = Stage.DUPLICATE_CHECK
        started = time.perf_counter()
        try:
            if accounts_found is not None:
                stage = Stage.STATUS_UPDATE
                await self._approve(run, applicant, nid_hash, accounts_found, announce=True)
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
            await self.fail(run, stage, failure.code, details)
        except CoreBankingError as error:
            _observe(stage, "failed", started)
            log.info("registration %d: core banking error %s", run.registration_id, error.code)
            details = {"error": error.code.value, "retryable": error.retryable}
            await self.fail(run, stage, error.code, details)

    async def _duplicate_check(
        self, run: Run, applicant: Applicant, nid_hashes: tuple[str, ...]
    ) -> bool:
        """One transaction: the check, "started" logged with its result. True: the applicant
        is enrolled already (same CIF)."""

        # Most applicants match no one: the query and that result's log entries are one
        # statement (one round trip to PostgreSQL, shared with other runs' steps); the rows, if
        # any, are decided here.
        query = users.matching(
            customer_number=applicant.customer_number, phone=applicant.phone,
            national_id_hashes=nid_hashes,
        )  # fmt: skip
        first = self._recorder.appending(run, _NO_DUPLICATE, unless=query)

        def step(session: Session, appended: Appended) -> tuple[list[LogEvent], bool]:
            logged, rows = appended
            if logged is not None:
                return logged, False
            matches = [users.Match(*row) for row in rows]
            existing = stages.duplicate_check(matches, applicant, nid_hashes).existing
            assert existing is not None  # a match on the phone or id alone raised above
            entries = [
                events.started(Stage.DUPLICATE_CHECK),
                events.completed(
                    Stage.DUPLICATE_CHECK, "Existing user found", {"existingUserId": existing.id}
                ),
                events.started(Stage.UPDATE_USER_INFO),
            ]
            return self._recorder.append(session, run, entries), True

        return await self._recorder.commit_after(run, first, step)

    async def _update_existing(
        self, run: Run, applicant: Applicant, nid_hashes: tuple[str, ...]
    ) -> None:
        def work(session: Session) -> tuple[list[LogEntry], Outcome]:
            user = users.find(session, customer_number=applicant.customer_number)
            if user is None:  # removed meanwhile: treat as a plain failure, re-validation works
                raise ValidationFailure(ErrorCode.INTERNAL_ERROR)
            updated = stages.update_user_info(session, user, applicant, nid_hashes)
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
            done = events.completed(
                Stage.UPDATE_USER_INFO, message, {"updatedFields": updated} if updated else None
            )
            return [done, *events.status_set(outcome.status)], outcome

        await self._recorder.finish_with(run, work)

    async def _approve(
        self, run: Run, applicant: Applicant, nid_hash: str, count: int, *, announce: bool
    ) -> bool:
        """Enrol and approve in one transaction with the T24 result's log entries (``announce``:
        resuming after a crash, the lookup's result is already logged). False: someone enrolled
        the same person meanwhile, and the run ended FAILED."""
        before = [events.started(Stage.STATUS_UPDATE)]
        if not announce:
            lookup = events.completed(
                Stage.T24_LOOKUP, f"Found {count} accounts", {"accountsFound": count}
            )
            before.insert(0, lookup)

        enrolment = users.enrolment_of(
            applicant, national_id_hash=nid_hash, registration_id=run.registration_id
        )
        outcome = Outcome(
            RegistrationStatus.APPROVED,
            f"Customer validated successfully. Found {count} accounts.",
            {"accountsFound": count},
        )
        approved = events.completed(Stage.STATUS_UPDATE, "Status set to APPROVED")
        try:  # enrolled with APPROVED
            await self._recorder.finish(run, [*before, approved], outcome, also=enrolment)
            return True
        except IntegrityError:
            # Someone enrolled the same person between our duplicate check and now; the
            # transaction (with the lookup's log entries) rolled back, so log them with the failure.
            code = ErrorCode.ID_ALREADY_ENROLLED
            details = {"error": code.value, "retryable": ValidationFailure(code).retryable}
            await self.fail(run, Stage.STATUS_UPDATE, code, details, before=before)
            return False

    async def fail(
        self,
        run: Run,
        stage: Stage,
        code: ErrorCode,
        details: dict[str, Any],
        *,
        before: list[LogEntry] | None = None,
    ) -> None:
        """End the run FAILED at ``stage``: that stage's ``failed`` entry, then (when it was
        not ``status_update`` itself) the ``status_update`` stage, then the final entry."""
        message = ERROR_MESSAGES[code]
        entries = list(before or ())
        if not entries and not any(e.stage == stage.value for e in run.logged):
            # a stage that failed inside its own transaction logged nothing: say it started
            entries.append(events.started(stage))
        entries.append(events.failed(stage, code))
        if stage is not Stage.STATUS_UPDATE:
            entries.extend(events.status_set(RegistrationStatus.FAILED))
        await self._recorder.finish(
            run, entries, Outcome(RegistrationStatus.FAILED, message, details)
        )

    async def fail_unexpected(self, run: Run, exc: BaseException) -> None:
        """The last resort: FAILED ``INTERNAL_ERROR`` (retryable)."""
        # Log where it happened, never the exception text: driver errors quote SQL parameters,
        # which are personal data.
        frames = "".join(traceback.format_tb(exc.__traceback__)[-5:])
        log.error(
            "registration %d: unexpected %s\n%s", run.registration_id, type(exc).__name__, frames
        )
        try:
            await self.fail(
                run, Stage.STATUS_UPDATE, ErrorCode.INTERNAL_ERROR,
                {"error": ErrorCode.INTERNAL_ERROR.value, "retryable": True},
            )  # fmt: skip
        except Exception as again:  # noqa: BLE001 - the lease will expire and recovery resumes it
            log.error(
                "registration %d: could not record failure (%s)",
                run.registration_id,
                type(again).__name__,
            )


def applicant_of(row: RegistrationRequest | Row[Any]) -> Applicant:
    """The applicant of a registration row (its columns have the ``Applicant``'s names)."""
    return Applicant(**{name: getattr(row, name) for name in _APPLICANT_FIELDS})


_APPLICANT_FIELDS = tuple(f.name for f in fields(Applicant))

#: ``NO_DUPLICATE`` as the data layer takes it (``Recorder.appending``), built once
_NO_DUPLICATE = events.rows(events.NO_DUPLICATE)


def _observe(stage: Stage, result: str, started: float) -> None:
    metrics.STAGE_DURATION.labels(stage.value, result).observe(time.perf_counter() - started)
