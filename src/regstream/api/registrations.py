"""Registration requests: create, list, read, validate.

Roles (``api/auth.py``): viewer reads; operator creates and starts validations, one or many at
once (rate-limited, and each run started is written to the audit trail with who started it).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession

from regstream.api import views
from regstream.api.auth import (
    CallerAuditTrail,
    OperatorPrincipal,
    ProcessPrincipal,
    ViewerPrincipal,
)
from regstream.api.deps import AuthDep, RunnerDep, SessionDep, ShutdownPhase, ShutdownPhaseDep
from regstream.api.errors import error_response, too_many_requests
from regstream.api.schemas import (
    BulkConflict,
    BulkProcessRequest,
    BulkProcessResult,
    ErrorBody,
    ProcessAccepted,
    RegistrationCreate,
    RegistrationDetail,
    RegistrationPage,
    Storable,
)
from regstream.db import registrations
from regstream.db.tables import RegistrationRequest
from regstream.domain.enums import RegistrationStatus
from regstream.pipeline.runner import Runner

router = APIRouter(prefix="/api/registrations", tags=["registrations"])

RegistrationId = Annotated[int, Path(ge=1, le=2**53, description="registration id")]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RegistrationDetail)
async def create_registration(
    body: RegistrationCreate,
    session: SessionDep,
    _: OperatorPrincipal,
    trail: CallerAuditTrail,
) -> RegistrationDetail:
    async with session.begin():
        row = await registrations.create(
            session,
            customer_number=body.customer_number,
            account_number=body.account_number,
            first_name=body.first_name,
            last_name=body.last_name,
            date_of_birth=body.date_of_birth,
            national_id=body.national_id,
            id_type=body.id_type.value,
            phone=body.phone,
            email=body.email,
            device_id=body.device_id,
        )
        # who entered personal data, from where: committed with the row (ids only, no data)
        await trail.add(session, "registration.create", target=f"registration:{row.id}")
    await session.refresh(row)
    return views.detail_of(row, [])


@router.get("", response_model=RegistrationPage)
async def list_registrations(
    session: SessionDep,
    _: ViewerPrincipal,
    status_filter: Annotated[RegistrationStatus | None, Query(alias="status")] = None,
    q: Annotated[str | None, Query(max_length=100, description="name, CIF or id"), Storable] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    page_size: Annotated[int, Query(alias="pageSize", ge=1, le=200)] = 20,
) -> RegistrationPage:
    rows, total = await registrations.list_page(
        session,
        status=status_filter.value if status_filter else None,
        search=q,
        page=page,
        page_size=page_size,
    )
    return RegistrationPage(
        items=[views.read_of(r) for r in rows], total=total, page=page, page_size=page_size
    )


@router.get(
    "/{registration_id}",
    response_model=RegistrationDetail,
    responses={404: {"model": ErrorBody}},
)
async def get_registration(
    registration_id: RegistrationId, session: SessionDep, _: ViewerPrincipal
) -> RegistrationDetail:
    row = await registrations.get(session, registration_id=registration_id)
    if row is None:
        raise HTTPException(404, f"registration {registration_id} not found")
    log = await registrations.get_log(session, registration_id=row.id, run=row.run_count)
    return views.detail_of(row, log)


@router.post(
    "/{registration_id}/process",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ProcessAccepted,
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 503: {"model": ErrorBody}},
)
async def process_registration(
    registration_id: RegistrationId,
    request: Request,
    runner: RunnerDep,
    phase: ShutdownPhaseDep,
    _: ProcessPrincipal,
    trail: CallerAuditTrail,
) -> ProcessAccepted | JSONResponse:
    if (refusal := _refuse_while_draining(request, phase, runner)) is not None:
        return refusal
    started_by = getattr(request.state, "principal_name", None)

    async def audit_start(session: AsyncSession) -> None:  # committed with the claim
        await trail.add(session, "registration.process", target=f"registration:{registration_id}")

    submission = await runner.submit(registration_id, started_by=started_by, on_claimed=audit_start)
    if submission.outcome == "not_found":
        raise HTTPException(404, f"registration {registration_id} not found")
    if submission.outcome == "conflict":
        assert submission.registration is not None
        row = submission.registration
        return error_response(
            request,
            409,
            _why_not(row),
            registration=views.read_of(row).model_dump(by_alias=True, mode="json"),
        )
    return ProcessAccepted(registration_id=registration_id)


def _refuse_while_draining(
    request: Request, phase: ShutdownPhase, runner: Runner
) -> JSONResponse | None:
    """503 + Retry-After once shutdown started: new runs go to another instance."""
    if phase == "draining" or not runner.accepting:
        return error_response(
            request, 503, "server is shutting down; retry shortly", headers={"Retry-After": "2"}
        )
    return None


def _why_not(row: RegistrationRequest) -> str:
    if row.in_progress:
        return "validation already in progress"
    return f"registration already {row.status} and cannot be validated again"


@router.post(
    "/process",
    response_model=BulkProcessResult,
    responses={422: {"model": ErrorBody}, 429: {"model": ErrorBody}, 503: {"model": ErrorBody}},
)
async def process_many(
    body: BulkProcessRequest,
    request: Request,
    runner: RunnerDep,
    phase: ShutdownPhaseDep,
    auth: AuthDep,
    principal: OperatorPrincipal,
    trail: CallerAuditTrail,
) -> BulkProcessResult | JSONResponse:
    """Bulk validation: start every listed registration that may run now, in one transaction.
    Counts as one validation per id against ``REGSTREAM_PROCESS_RATE_PER_MINUTE``."""
    if (refusal := _refuse_while_draining(request, phase, runner)) is not None:
        return refusal
    ids = list(dict.fromkeys(body.registration_ids))
    if len(ids) > auth.process_limit.rate:
        return error_response(
            request, 429, f"at most {auth.process_limit.rate} validations a minute"
        )
    wait = await auth.process_limit.hit(f"operator:{principal.operator_id}", cost=len(ids))
    if wait:
        raise too_many_requests("too many validations started; retry later", wait)

    async def audit_starts(session: AsyncSession, accepted: list[int]) -> None:
        # one entry per run started, committed with the claims
        targets = [f"registration:{rid}" for rid in accepted]
        await trail.add_many(session, "registration.process", targets=targets)

    started_by = getattr(request.state, "principal_name", None)
    result = await runner.submit_many(ids, started_by=started_by, on_claimed=audit_starts)
    return BulkProcessResult(
        accepted=result.accepted,
        conflicts=[
            BulkConflict(
                registration_id=row.id,
                status=row.status,
                in_progress=row.in_progress,
                message=_why_not(row),
            )
            for row in result.conflicts
        ],
        not_found=result.not_found,
    )
