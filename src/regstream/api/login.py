"""Sign-in and sign-out: ``POST /api/auth/login``, ``POST /api/auth/logout``, ``GET /api/auth/me``.

Browsers sign in with JSON or the login form and get the session cookie (HttpOnly,
SameSite=Lax, ``__Host-`` and Secure over HTTPS) and a CSRF token; API clients send a token
instead (``api/tokens.py``). Sign-in is throttled per client address and per address and name
before any password hashing, and one password check runs at a time per address (issue 16).
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import Field, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from regstream import metrics
from regstream.api.audit_trail import record
from regstream.api.auth import UNAUTHENTICATED, CallerAuditTrail, CurrentPrincipal, safe_next
from regstream.api.deps import AuthDep, HubDep, SessionsDep, SettingsDep
from regstream.api.errors import too_many_requests
from regstream.api.schemas import CamelModel
from regstream.auth import credentials, http
from regstream.auth.principal import Principal, Role
from regstream.auth.runtime import AuthRuntime
from regstream.auth.tokens import digest
from regstream.config import Settings
from regstream.db import accounts

router = APIRouter(tags=["auth"])


class LoginRequest(CamelModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class SessionRead(CamelModel):
    username: str
    role: Role
    csrf_token: str | None = Field(None, description="send as X-CSRF-Token on unsafe requests")
    expires_at: int | None = Field(None, description="epoch milliseconds")


async def _login_body(request: Request) -> tuple[LoginRequest, bool, str | None]:
    """The credentials from JSON or a form, whether it was a form, and the form's ``next``."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()
        values = {k: v for k, v in form.items() if isinstance(v, str)}
        try:
            body = LoginRequest(
                username=values.get("username", ""), password=values.get("password", "")
            )
        except ValidationError:
            raise HTTPException(422, "username and password are required") from None
        return body, True, values.get("next")
    if not content_type.startswith("application/json"):
        raise HTTPException(415, "send JSON or a form")
    try:
        return LoginRequest.model_validate_json(await request.body()), False, None
    except ValidationError:
        raise HTTPException(422, "username and password are required") from None


_LOGIN_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["username", "password"],
                "properties": {
                    "username": {"type": "string", "minLength": 1, "maxLength": 64},
                    "password": {"type": "string", "minLength": 1, "maxLength": 1024},
                },
                "additionalProperties": False,
            }
        },
        "application/x-www-form-urlencoded": {
            "schema": {
                "type": "object",
                "required": ["username", "password"],
                "properties": {
                    "username": {"type": "string", "maxLength": 64},
                    "password": {"type": "string", "maxLength": 1024},
                    "next": {"type": "string", "description": "local path to go to"},
                },
            }
        },
    },
}


@router.post(
    "/api/auth/login",
    response_model=SessionRead,
    openapi_extra={"requestBody": _LOGIN_BODY},
    responses={303: {"description": "form sign-in: redirect"}, 401: {}, 429: {}},
)
async def login(
    request: Request, sessions: SessionsDep, settings: SettingsDep, auth: AuthDep
) -> Response:
    """Sign in; sets the session cookie (HttpOnly, SameSite=Lax, Secure over HTTPS)."""
    body, is_form, next_path = await _login_body(request)
    scope = request.scope
    ip = http.client_ip(scope, settings)
    await _throttle_login(sessions, auth, ip, body.username)
    at = credentials.now_ms()
    # one password check at a time per address (issue 16): a spray queues behind itself
    async with auth.hashing.take(ip or "?", body.username), sessions.begin() as session:
        result = await credentials.sign_in(
            session,
            body.username,
            body.password,
            lifetime=settings.session_lifetime,
            at_ms=at,
            previous_session_id=http.session_cookie(scope),
        )
        known = None
        if result is None:
            try:
                name = credentials.check_username(body.username)
                known = await accounts.get_by_username(session, username=name)
            except ValueError:
                known = None
        else:
            operator = await accounts.get(session, operator_id=result.principal.operator_id)
            if operator is not None:
                operator.last_login_at = datetime.now(UTC)
    if result is None:
        await auth.hashing.failed(ip or "?", body.username)
        # The attempted name is recorded only if it is a real account: people type passwords
        # into the name field, and those must not land in the audit log.
        await record(
            sessions,
            action="auth.login",
            outcome="refused",
            actor=known.username if known else None,
            target="/api/auth/login",
            client_ip=ip,
            details={"reason": "bad credentials"},
        )
        if is_form:
            return RedirectResponse("/login?error=invalid", status_code=303)
        raise HTTPException(401, "wrong user name or password", UNAUTHENTICATED)
    principal = result.principal
    await record(
        sessions,
        action="auth.login",
        outcome="ok",
        actor=principal.username,
        target="/api/auth/login",
        client_ip=ip,
    )
    response: Response
    if is_form:
        response = RedirectResponse(safe_next(next_path), status_code=303)
    else:
        response = JSONResponse(_session_read(principal).model_dump(by_alias=True, mode="json"))
    _set_session_cookie(response, scope, settings, result.session_id)
    return response


async def _throttle_login(
    sessions: async_sessionmaker[AsyncSession], auth: AuthRuntime, ip: str | None, username: str
) -> None:
    """429 before any password hashing: per client address (any names), then per address and
    name. A throttled address writes one audit entry per minute, not one per attempt."""
    store = auth.store
    address = store.digest(ip or "?")
    pair = store.digest(ip or "?", username.strip().lower()[:64])
    for limit, key, which in (
        (auth.login_address_limit, address, "address"),
        (auth.login_limit, pair, "address+name"),
    ):
        wait = await limit.hit(key)
        if wait:
            metrics.LOGIN_THROTTLED.labels(which).inc()
            if await auth.throttle_audit_limit.hit(address) == 0.0:
                await record(
                    sessions,
                    action="auth.login",
                    outcome="refused",
                    target="/api/auth/login",
                    client_ip=ip,
                    details={"reason": "throttled", "limit": which},
                )
            raise too_many_requests("too many sign-in attempts; retry later", wait)


def _set_session_cookie(
    response: Response, scope: http.Scope, settings: Settings, session_id: str
) -> None:
    secure = http.cookie_secure(scope, settings)
    name = http.SECURE_SESSION_COOKIE if secure else http.SESSION_COOKIE
    response.set_cookie(
        name,
        session_id,
        max_age=int(settings.session_lifetime),
        path="/",
        secure=secure,
        httponly=True,
        samesite="lax",
    )


def _clear_session_cookies(response: Response, scope: http.Scope, settings: Settings) -> None:
    secure = http.cookie_secure(scope, settings)
    response.delete_cookie(http.SESSION_COOKIE, path="/", httponly=True, samesite="lax")
    if secure:
        response.delete_cookie(
            http.SECURE_SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="lax"
        )


def _session_read(principal: Principal) -> SessionRead:
    return SessionRead(
        username=principal.username, role=principal.role, csrf_token=principal.csrf_token,
        expires_at=principal.expires_ms,
    )  # fmt: skip


@router.post(
    "/api/auth/logout",
    status_code=204,
    responses={303: {"description": "form sign-out: redirect to the login page"}},
)
async def logout(
    request: Request,
    principal: CurrentPrincipal,
    sessions: SessionsDep,
    settings: SettingsDep,
    hub: HubDep,
    auth: AuthDep,
    trail: CallerAuditTrail,
) -> Response:
    """End this browser's session (and its open streams). With an API token: nothing to end."""
    scope = request.scope
    if principal.credential_kind == "session":
        async with sessions.begin() as session:
            sid = http.session_cookie(scope) or ""
            await accounts.revoke_session(
                session, session_hash=digest(sid), now_ms=credentials.now_ms()
            )
        auth.guard.revoke(hub, lambda p: p.credential == principal.credential)
        await trail.record("auth.logout")
    content_type = request.headers.get("content-type", "")
    response: Response
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        response = RedirectResponse("/login", status_code=303)
    else:
        response = Response(status_code=204)
    _clear_session_cookies(response, scope, settings)
    return response


@router.get("/api/auth/me", response_model=SessionRead)
async def me(principal: CurrentPrincipal) -> SessionRead:
    """Who is signed in, the role, and the CSRF token for this session."""
    return _session_read(principal)
