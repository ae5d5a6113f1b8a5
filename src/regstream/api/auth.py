"""Who is calling, and may they: the authentication dependencies every route uses.

``CurrentPrincipal`` (any signed-in caller), ``ViewerPrincipal``/``OperatorPrincipal``/
``AdminPrincipal`` (``require_role(...)``), ``require_page_role(...)`` (HTML pages: a signed-out
visitor is sent to ``/login?next=…``) and ``ProcessPrincipal`` (operator + the ``process`` rate
limit). Each puts the caller in ``request.state.principal`` and its name in
``request.state.principal_name``. ``CallerAuditTrail`` is the audit trail with that caller as
the actor (``api/audit_trail.py``); refusals are audited here.

Credentials, in order: ``Authorization: Bearer rst_…``; else the session cookie, with the CSRF
token on unsafe methods. The stream path, served outside FastAPI, has its own check
(``api/stream_auth.py``). The routes: ``api/login.py``, ``tickets.py``, ``users.py``,
``tokens.py``, ``audit.py``, ``docs.py``. Design notes in ``regstream.auth`` and
``docs/security.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from regstream.api.audit_trail import AuditTrail, record
from regstream.api.deps import AuthDep, SessionsDep, SettingsDep
from regstream.api.errors import too_many_requests
from regstream.auth import credentials, http
from regstream.auth.principal import Principal, Role
from regstream.auth.runtime import AuthRuntime
from regstream.auth.tokens import same
from regstream.config import Settings

# Declares the bearer scheme in the OpenAPI document ("Authorize" in /docs); parsing is ours.
_bearer_scheme = HTTPBearer(auto_error=False, description="API token: rst_…")
UNAUTHENTICATED = {"WWW-Authenticate": 'Bearer realm="regstream"'}


async def record_refusal(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    scope: http.Scope,
    principal: Principal,
    details: dict[str, Any],
) -> None:
    """Audit a signed-in caller refused access to what the request asked for."""
    trail = AuditTrail(sessions, principal.username, http.client_ip(scope, settings))
    await trail.record("access.refused", outcome="refused", target=_target(scope), details=details)


async def record_bad_credentials(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    auth: AuthRuntime,
    scope: http.Scope,
    reason: str,
) -> None:
    """Audit bad credentials, throttled per client address."""
    ip = http.client_ip(scope, settings)
    if await auth.refusal_audit_limit.hit(auth.store.digest(ip or "?")) == 0.0:
        await record(
            sessions,
            action="access.refused",
            outcome="refused",
            target=_target(scope),
            client_ip=ip,
            details={"reason": reason},
        )


def _target(scope: http.Scope) -> str:
    return f"{scope.get('method', '?')} {scope.get('path', '?')}"[:200]


def _remember(request: Request, principal: Principal) -> Principal:
    request.state.principal = principal
    request.state.principal_name = principal.username
    return principal


async def _csrf_token_sent(request: Request) -> str | None:
    sent = request.headers.get(http.CSRF_HEADER)
    if sent is not None:
        return sent
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        try:
            form = await request.form()
        except Exception:  # noqa: BLE001 - a broken form has no token
            return None
        value = form.get(http.CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


async def current_principal(
    request: Request,
    sessions: SessionsDep,
    settings: SettingsDep,
    auth: AuthDep,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)] = None,
) -> Principal:
    cached = getattr(request.state, "principal", None)
    if isinstance(cached, Principal):
        return cached
    scope = request.scope
    at = credentials.now_ms()
    bearer = http.bearer_token(scope)
    if bearer is not None:
        principal = None
        if bearer:
            async with sessions() as session:
                principal = await credentials.from_api_token(session, bearer, at_ms=at)
        if principal is None:
            await record_bad_credentials(sessions, settings, auth, scope, "invalid API token")
            raise HTTPException(401, "invalid, expired or revoked API token", UNAUTHENTICATED)
        return _remember(request, principal)
    session_id = http.session_cookie(scope)
    if session_id is None:
        raise HTTPException(401, "sign in or send an API token", UNAUTHENTICATED)
    async with sessions() as session:
        principal = await credentials.from_session(session, session_id, at_ms=at)
    if principal is None:
        raise HTTPException(401, "your sign-in expired; sign in again", UNAUTHENTICATED)
    if request.method in http.UNSAFE_METHODS:
        sent = await _csrf_token_sent(request)
        if not sent or principal.csrf_token is None or not same(sent, principal.csrf_token):
            await record_refusal(sessions, settings, scope, principal, {"reason": "csrf"})
            raise HTTPException(403, "missing or wrong CSRF token (X-CSRF-Token)")
    return _remember(request, principal)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


async def caller_audit_trail(
    request: Request, principal: CurrentPrincipal, sessions: SessionsDep, settings: SettingsDep
) -> AuditTrail:
    return AuditTrail(sessions, principal.username, http.client_ip(request.scope, settings))


#: the audit trail with the signed-in caller as actor, and its address
CallerAuditTrail = Annotated[AuditTrail, Depends(caller_audit_trail)]


@functools.cache
def require_role(role: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that lets only ``role`` (or a higher one) through; 403 and an audit entry
    for anyone else. ``Depends(require_role("operator"))``."""
    needed = Role(role)

    async def dependency(
        request: Request,
        principal: CurrentPrincipal,
        sessions: SessionsDep,
        settings: SettingsDep,
    ) -> Principal:
        if not principal.allows(needed):
            details = {"needed": needed.value, "role": principal.role}
            await record_refusal(sessions, settings, request.scope, principal, details)
            raise HTTPException(403, f"this needs the {needed.value} role")
        return principal

    dependency.__name__ = f"require_{needed.value}"
    return dependency


ViewerPrincipal = Annotated[Principal, Depends(require_role("viewer"))]
OperatorPrincipal = Annotated[Principal, Depends(require_role("operator"))]
AdminPrincipal = Annotated[Principal, Depends(require_role("admin"))]


@functools.cache
def require_page_role(role: str) -> Callable[..., Awaitable[Principal]]:
    """Like ``require_role`` for HTML pages: a caller who is not signed in is sent to
    ``/login?next=<this page>`` (303) instead of getting a 401."""
    check = require_role(role)

    async def dependency(
        request: Request, sessions: SessionsDep, settings: SettingsDep, auth: AuthDep
    ) -> Principal:
        try:
            principal = await current_principal(request, sessions, settings, auth)
        except HTTPException as exc:
            if exc.status_code != 401:
                raise
            target = quote(safe_next(request.url.path), safe="")
            raise HTTPException(
                303, "sign in first", {"Location": f"/login?next={target}"}
            ) from None
        return await check(request, principal, sessions, settings)

    dependency.__name__ = f"require_page_{Role(role).value}"
    return dependency


def safe_next(value: str | None) -> str:
    """Only a local path: never an open redirect."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


async def process_slot(principal: OperatorPrincipal, auth: AuthDep) -> Principal:
    """Operator, within ``REGSTREAM_PROCESS_RATE_PER_MINUTE`` validations a minute."""
    wait = await auth.process_limit.hit(f"operator:{principal.operator_id}")
    if wait:
        raise too_many_requests("too many validations started; retry later", wait)
    return principal


ProcessPrincipal = Annotated[Principal, Depends(process_slot)]
