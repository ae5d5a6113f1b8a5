"""Authentication and authorisation at the HTTP edge: dependencies, routes, the stream check.

Dependencies (``Annotated`` aliases): ``CurrentPrincipal`` (any signed-in caller),
``ViewerPrincipal``/``OperatorPrincipal``/``AdminPrincipal`` (``require_role(...)``) and
``ProcessPrincipal`` (operator + the ``process`` rate limit). Each puts the caller's name in
``request.state.principal_name``.

Routes: ``/api/auth/login|logout|me|stream-ticket``, ``/api/users…`` and ``/api/audit`` (admin),
``/openapi.json`` and ``/docs`` (viewer). ``stream_authenticator`` is the stream path's check
(``Services.stream_auth``): the stream is served outside FastAPI, so it cannot use dependencies.

Credentials, in order: ``Authorization: Bearer rst_…``; else the session cookie. On the stream
path only, ``?ticket=rstk_…`` too. Design notes in ``regstream.auth`` and ``docs/security.md``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from regstream import metrics
from regstream.api.deps import Services, ServicesDep, StreamAuth, StreamDecision
from regstream.api.schemas import Storable, StorableModel
from regstream.api.stream import STREAM_PATH
from regstream.auth import credentials, http
from regstream.auth.limits import retry_after
from regstream.auth.principal import Principal, Role
from regstream.auth.runtime import AuthRuntime
from regstream.auth.tokens import digest, same
from regstream.config import Settings
from regstream.db import accounts, audit

log = logging.getLogger(__name__)

router = APIRouter(tags=["auth"])

# Declares the bearer scheme in the OpenAPI document ("Authorize" in /docs); parsing is ours.
_bearer_scheme = HTTPBearer(auto_error=False, description="API token: rst_…")
_UNAUTHENTICATED = {"WWW-Authenticate": 'Bearer realm="regstream"'}


class _Model(StorableModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class LoginRequest(_Model):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class SessionRead(_Model):
    username: str
    role: Role
    csrf_token: str | None = Field(None, description="send as X-CSRF-Token on unsafe requests")
    expires_at: int | None = Field(None, description="epoch milliseconds")


class StreamTicketCreate(_Model):
    registration_id: int | None = Field(None, ge=1, le=2**53)


class StreamTicketRead(_Model):
    ticket: str
    expires_in: float
    stream_url: str


class UserCreate(_Model):
    username: str = Field(min_length=2, max_length=63)
    role: Role
    password: str | None = Field(None, min_length=1, max_length=1024)


class UserUpdate(_Model):
    role: Role | None = None
    disabled: bool | None = None


class UserRead(_Model):
    username: str
    role: str
    disabled: bool
    has_password: bool
    created_at: str
    last_login_at: str | None


class TokenCreate(_Model):
    label: str | None = Field(None, max_length=64)
    expires_in_days: int | None = Field(None, ge=1, le=3650)


class TokenCreated(_Model):
    id: int
    prefix: str
    token: str = Field(description="shown once; store it now")


class TokenRead(_Model):
    id: int
    prefix: str
    label: str | None
    expires_at: int | None
    revoked: bool


class AuditRead(_Model):
    id: int
    at: str
    actor: str | None
    action: str
    outcome: str
    target: str | None
    client_ip: str | None
    details: dict[str, Any] | None


class AuditPage(_Model):
    items: list[AuditRead]
    total: int
    page: int
    page_size: int


# --- shared helpers ----------------------------------------------------------------------------


async def get_auth(request: Request) -> AuthRuntime:  # async: no worker thread (see deps.py)
    runtime: AuthRuntime = request.app.state.auth
    return runtime


AuthDep = Annotated[AuthRuntime, Depends(get_auth)]


async def record(
    services: Services, *, action: str, outcome: str, actor: str | None = None,
    target: str | None = None, client_ip: str | None = None, details: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """Write one audit entry; a failure is logged (type only) and never fails the request."""
    try:
        async with services.sessions.begin() as session:
            await audit.create(
                session, action=action, outcome=outcome, actor=actor, target=target,
                client_ip=client_ip, details=details,
            )  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        log.warning("could not write audit entry %s (%s)", action, type(exc).__name__)


def _target(scope: http.Scope) -> str:
    return f"{scope.get('method', '?')} {scope.get('path', '?')}"[:200]


async def _refuse_anonymous(
    services: Services, auth: AuthRuntime, scope: http.Scope, reason: str
) -> None:
    """Audit bad credentials, throttled per client address."""
    ip = http.client_ip(scope, services.settings)
    if await auth.refusal_audit_limit.hit(auth.store.digest(ip or "?")) == 0.0:
        await record(services, action="access.refused", outcome="refused", target=_target(scope),
                     client_ip=ip, details={"reason": reason})  # fmt: skip


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


# --- dependencies ------------------------------------------------------------------------------


async def current_principal(
    request: Request,
    services: ServicesDep,
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
            async with services.sessions() as session:
                principal = await credentials.from_api_token(session, bearer, at_ms=at)
        if principal is None:
            await _refuse_anonymous(services, auth, scope, "invalid API token")
            raise HTTPException(401, "invalid, expired or revoked API token", _UNAUTHENTICATED)
        return _remember(request, principal)
    session_id = http.session_cookie(scope)
    if session_id is None:
        raise HTTPException(401, "sign in or send an API token", _UNAUTHENTICATED)
    async with services.sessions() as session:
        principal = await credentials.from_session(session, session_id, at_ms=at)
    if principal is None:
        raise HTTPException(401, "your sign-in expired; sign in again", _UNAUTHENTICATED)
    if request.method in http.UNSAFE_METHODS:
        sent = await _csrf_token_sent(request)
        if not sent or principal.csrf_token is None or not same(sent, principal.csrf_token):
            await record(services, action="access.refused", outcome="refused",
                         actor=principal.username, target=_target(scope),
                         client_ip=http.client_ip(scope, services.settings),
                         details={"reason": "csrf"})  # fmt: skip
            raise HTTPException(403, "missing or wrong CSRF token (X-CSRF-Token)")
    return _remember(request, principal)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


@functools.cache
def require_role(role: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that lets only ``role`` (or a higher one) through; 403 and an audit entry
    for anyone else. ``Depends(require_role("operator"))``."""
    needed = Role(role)

    async def dependency(
        request: Request, principal: CurrentPrincipal, services: ServicesDep
    ) -> Principal:
        if not principal.allows(needed):
            await record(services, action="access.refused", outcome="refused",
                         actor=principal.username, target=_target(request.scope),
                         client_ip=http.client_ip(request.scope, services.settings),
                         details={"needed": needed.value, "role": principal.role})  # fmt: skip
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

    async def dependency(request: Request, services: ServicesDep, auth: AuthDep) -> Principal:
        try:
            principal = await current_principal(request, services, auth)
        except HTTPException as exc:
            if exc.status_code != 401:
                raise
            target = quote(_safe_next(request.url.path), safe="")
            raise HTTPException(
                303, "sign in first", {"Location": f"/login?next={target}"}
            ) from None
        return await check(request, principal, services)

    dependency.__name__ = f"require_page_{Role(role).value}"
    return dependency


async def process_slot(principal: OperatorPrincipal, auth: AuthDep) -> Principal:
    """Operator, within ``REGSTREAM_PROCESS_RATE_PER_MINUTE`` validations a minute."""
    wait = await auth.process_limit.hit(f"operator:{principal.operator_id}")
    if wait:
        raise HTTPException(
            429, "too many validations started; retry later", {"Retry-After": retry_after(wait)}
        )
    return principal


ProcessPrincipal = Annotated[Principal, Depends(process_slot)]


async def metrics_access(request: Request, services: ServicesDep, auth: AuthDep) -> None:
    """``/metrics``: admin, or anyone with ``REGSTREAM_METRICS_PUBLIC=true``."""
    if services.settings.metrics_public:
        return
    principal = await current_principal(request, services, auth)
    await require_role("admin")(request, principal, services)


# --- sign-in and session -----------------------------------------------------------------------


def _safe_next(value: str | None) -> str:
    """Only a local path: never an open redirect."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


async def _login_body(request: Request) -> tuple[LoginRequest, bool, str | None]:
    """The credentials from JSON or a form, whether it was a form, and the form's ``next``."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()
        values = {k: v for k, v in form.items() if isinstance(v, str)}
        try:
            body = LoginRequest(username=values.get("username", ""),
                                password=values.get("password", ""))  # fmt: skip
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
async def login(request: Request, services: ServicesDep, auth: AuthDep) -> Response:
    """Sign in; sets the session cookie (HttpOnly, SameSite=Lax, Secure over HTTPS)."""
    body, is_form, next_path = await _login_body(request)
    settings = services.settings
    scope = request.scope
    ip = http.client_ip(scope, settings)
    await _throttle_login(services, auth, ip, body.username)
    at = credentials.now_ms()
    # one password check at a time per address (issue 16): a spray queues behind itself
    async with auth.hashing.take(ip or "?", body.username), services.sessions.begin() as session:
        result = await credentials.sign_in(
            session, body.username, body.password, lifetime=settings.session_lifetime, at_ms=at,
            previous_session_id=http.session_cookie(scope),
        )  # fmt: skip
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
        await record(services, action="auth.login", outcome="refused",
                     actor=known.username if known else None, target="/api/auth/login",
                     client_ip=ip, details={"reason": "bad credentials"})  # fmt: skip
        if is_form:
            return RedirectResponse("/login?error=invalid", status_code=303)
        raise HTTPException(401, "wrong user name or password", _UNAUTHENTICATED)
    principal = result.principal
    await record(services, action="auth.login", outcome="ok", actor=principal.username,
                 target="/api/auth/login", client_ip=ip)  # fmt: skip
    response: Response
    if is_form:
        response = RedirectResponse(_safe_next(next_path), status_code=303)
    else:
        response = JSONResponse(_session_read(principal).model_dump(by_alias=True, mode="json"))
    _set_session_cookie(response, scope, settings, result.session_id)
    return response


async def _throttle_login(
    services: Services, auth: AuthRuntime, ip: str | None, username: str
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
                await record(services, action="auth.login", outcome="refused",
                             target="/api/auth/login", client_ip=ip,
                             details={"reason": "throttled", "limit": which})  # fmt: skip
            raise HTTPException(
                429, "too many sign-in attempts; retry later", {"Retry-After": retry_after(wait)}
            )


def _set_session_cookie(
    response: Response, scope: http.Scope, settings: Settings, session_id: str
) -> None:
    secure = http.cookie_secure(scope, settings)
    name = http.SECURE_SESSION_COOKIE if secure else http.SESSION_COOKIE
    response.set_cookie(
        name, session_id, max_age=int(settings.session_lifetime), path="/", secure=secure,
        httponly=True, samesite="lax",
    )  # fmt: skip


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
    request: Request, principal: CurrentPrincipal, services: ServicesDep, auth: AuthDep
) -> Response:
    """End this browser's session (and its open streams). With an API token: nothing to end."""
    scope = request.scope
    if principal.credential_kind == "session":
        async with services.sessions.begin() as session:
            sid = http.session_cookie(scope) or ""
            await accounts.revoke_session(
                session, session_hash=digest(sid), now_ms=credentials.now_ms()
            )
        auth.guard.revoke(services.hub, lambda p: p.credential == principal.credential)
        await record(services, action="auth.logout", outcome="ok", actor=principal.username,
                     client_ip=http.client_ip(scope, services.settings))  # fmt: skip
    content_type = request.headers.get("content-type", "")
    response: Response
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        response = RedirectResponse("/login", status_code=303)
    else:
        response = Response(status_code=204)
    _clear_session_cookies(response, scope, services.settings)
    return response


@router.get("/api/auth/me", response_model=SessionRead)
async def me(principal: CurrentPrincipal) -> SessionRead:
    """Who is signed in, the role, and the CSRF token for this session."""
    return _session_read(principal)


@router.post(
    "/api/auth/stream-ticket",
    status_code=201,
    response_model=StreamTicketRead,
    responses={403: {"description": "the unfiltered stream is for admins"}},
)
async def stream_ticket(
    body: StreamTicketCreate, principal: ViewerPrincipal, services: ServicesDep
) -> StreamTicketRead:
    """A single-use ticket for ``?ticket=`` on the stream path (EventSource without headers).

    It opens one stream, within ``expiresIn`` seconds, for the ``registrationId`` given here
    (none = the unfiltered stream, admins only); the stream then lives as long as the session or
    token that minted it.
    """
    rid = body.registration_id
    if rid is None and not principal.allows(Role.ADMIN):
        raise HTTPException(403, "the unfiltered stream is for admins; pass registrationId")
    ttl = services.settings.stream_ticket_ttl
    async with services.sessions.begin() as session:
        ticket = await credentials.mint_ticket(
            session, principal, registration_id=rid, ttl=ttl, at_ms=credentials.now_ms()
        )
    query = f"ticket={ticket}" + (f"&registrationId={rid}" if rid is not None else "")
    return StreamTicketRead(ticket=ticket, expires_in=ttl, stream_url=f"{STREAM_PATH}?{query}")


# --- user management (admin) -------------------------------------------------------------------

UserName = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


def _user_read(operator: Any) -> UserRead:
    return UserRead(
        username=operator.username, role=operator.role, disabled=operator.disabled,
        has_password=operator.password_hash is not None,
        created_at=operator.created_at.isoformat() if operator.created_at else "",
        last_login_at=operator.last_login_at.isoformat() if operator.last_login_at else None,
    )  # fmt: skip


async def _operator_or_404(session: Any, username: str) -> Any:
    operator = await accounts.get_by_username(session, username=username.lower())
    if operator is None:
        raise HTTPException(404, f"no user {username.lower()!r}")
    return operator


@router.get("/api/users", response_model=list[UserRead], tags=["users"])
async def list_users(_: AdminPrincipal, services: ServicesDep) -> list[UserRead]:
    async with services.sessions() as session:
        return [_user_read(o) for o in await accounts.list_all(session)]


@router.post("/api/users", status_code=201, response_model=UserRead, tags=["users"],
             responses={409: {"description": "the name is taken"}})  # fmt: skip
async def create_user(
    body: UserCreate, principal: AdminPrincipal, services: ServicesDep, request: Request
) -> UserRead:
    """Create a user; without ``password`` it can only use API tokens."""
    try:
        name = credentials.check_username(body.username)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    async with services.sessions.begin() as session:
        if await accounts.get_by_username(session, username=name) is not None:
            raise HTTPException(409, f"user {name!r} already exists")
        try:
            operator = await credentials.create_operator(
                session, username=name, role=body.role, password=body.password
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        read = _user_read(operator)
    await record(services, action="user.create", outcome="ok", actor=principal.username,
                 target=f"user:{name}", details={"role": body.role.value},
                 client_ip=http.client_ip(request.scope, services.settings))  # fmt: skip
    return read


@router.patch("/api/users/{username}", response_model=UserRead, tags=["users"],
              responses={404: {}, 409: {"description": "cannot lock yourself out"}})  # fmt: skip
async def update_user(
    username: UserName, body: UserUpdate, principal: AdminPrincipal, services: ServicesDep,
    auth: AuthDep, request: Request,
) -> UserRead:  # fmt: skip
    """Change a user's role or disable/enable it (disabling revokes its sessions and tokens)."""
    async with services.sessions.begin() as session:
        operator = await _operator_or_404(session, username)
        if operator.id == principal.operator_id and (
            body.disabled or (body.role is not None and body.role != Role.ADMIN)
        ):
            raise HTTPException(409, "you cannot disable or demote yourself")
        await accounts.update_operator(
            session, operator=operator, role=body.role.value if body.role else None,
            disabled=body.disabled,
        )  # fmt: skip
        if body.disabled:
            await accounts.revoke_all(session, operator_id=operator.id, now_ms=credentials.now_ms())
        read = _user_read(operator)
        operator_id = operator.id
    if body.disabled:
        auth.guard.revoke(services.hub, lambda p: p.operator_id == operator_id)
    await record(services, action="user.update", outcome="ok", actor=principal.username,
                 target=f"user:{read.username}",
                 details=body.model_dump(mode="json", exclude_none=True),
                 client_ip=http.client_ip(request.scope, services.settings))  # fmt: skip
    return read


@router.get("/api/users/{username}/tokens", response_model=list[TokenRead], tags=["users"],
            responses={404: {}})  # fmt: skip
async def list_tokens(
    username: UserName, _: AdminPrincipal, services: ServicesDep
) -> list[TokenRead]:
    async with services.sessions() as session:
        operator = await _operator_or_404(session, username)
        rows = await accounts.list_tokens(session, operator_id=operator.id)
    return [
        TokenRead(
            id=t.id,
            prefix=t.prefix,
            label=t.label,
            expires_at=t.expires_ms,
            revoked=t.revoked_ms is not None,
        )  # fmt: skip
        for t in rows
    ]


@router.post("/api/users/{username}/tokens", status_code=201, response_model=TokenCreated,
             tags=["users"], responses={404: {}})  # fmt: skip
async def create_token(
    username: UserName, body: TokenCreate, principal: AdminPrincipal, services: ServicesDep,
    request: Request,
) -> TokenCreated:  # fmt: skip
    """A new API token for the user, shown once in the answer."""
    expires = None
    if body.expires_in_days is not None:
        expires = credentials.now_ms() + body.expires_in_days * 86_400_000
    async with services.sessions.begin() as session:
        operator = await _operator_or_404(session, username)
        token, token_id = await credentials.issue_api_token(
            session, operator=operator, label=body.label, expires_ms=expires
        )
        name = operator.username
    await record(services, action="token.create", outcome="ok", actor=principal.username,
                 target=f"user:{name}", details={"tokenId": token_id},
                 client_ip=http.client_ip(request.scope, services.settings))  # fmt: skip
    return TokenCreated(id=token_id, prefix=token[:8], token=token)


@router.delete("/api/users/{username}/tokens/{token_id}", status_code=204, tags=["users"],
               responses={404: {}})  # fmt: skip
async def revoke_token(
    username: UserName, token_id: Annotated[int, Path(ge=1, le=2**53)], principal: AdminPrincipal,
    services: ServicesDep, auth: AuthDep, request: Request,
) -> Response:  # fmt: skip
    """Revoke a token; streams opened with it are closed with an ``auth`` frame."""
    async with services.sessions.begin() as session:
        operator = await _operator_or_404(session, username)
        done = await accounts.revoke_token(
            session, operator_id=operator.id, token_id=token_id, now_ms=credentials.now_ms()
        )
    if not done:
        raise HTTPException(404, f"no live token {token_id} for {operator.username!r}")
    auth.guard.revoke(services.hub, lambda p: p.credential == ("token", token_id))
    await record(services, action="token.revoke", outcome="ok", actor=principal.username,
                 target=f"user:{operator.username}", details={"tokenId": token_id},
                 client_ip=http.client_ip(request.scope, services.settings))  # fmt: skip
    return Response(status_code=204)


# --- audit (admin) -----------------------------------------------------------------------------


@router.get("/api/audit", response_model=AuditPage, tags=["audit"])
async def list_audit(
    _: AdminPrincipal,
    services: ServicesDep,
    actor: Annotated[str | None, Query(max_length=64), Storable] = None,
    action: Annotated[str | None, Query(max_length=40), Storable] = None,
    outcome: Annotated[Literal["ok", "refused"] | None, Query()] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    page_size: Annotated[int, Query(alias="pageSize", ge=1, le=200)] = 50,
) -> AuditPage:
    """The audit trail, newest first: sign-ins, runs started, refusals, user changes."""
    async with services.sessions() as session:
        rows, total = await audit.list_page(
            session, actor=actor, action=action, outcome=outcome, page=page, page_size=page_size
        )
    items = [
        AuditRead(id=r.id, at=r.at.isoformat() if r.at else "", actor=r.actor, action=r.action,
                  outcome=r.outcome, target=r.target, client_ip=r.client_ip, details=r.details)
        for r in rows
    ]  # fmt: skip
    return AuditPage(items=items, total=total, page=page, page_size=page_size)


# --- the API's own documentation (viewer) ------------------------------------------------------


@router.get("/openapi.json", include_in_schema=False)
async def openapi_document(request: Request, _: ViewerPrincipal) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def api_docs(_: ViewerPrincipal) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="regstream API")


# --- the stream path ---------------------------------------------------------------------------


def stream_authenticator(services: Services, auth: AuthRuntime) -> StreamAuth:
    """The stream endpoint's check: 401 without good credentials, 403 for the unfiltered stream
    unless admin (or a ticket for another stream), 429 over the per-user stream cap."""

    async def decide(
        scope: dict[str, Any], registration_id: int | tuple[int, ...] | None
    ) -> StreamDecision:
        at = credentials.now_ms()
        bearer = http.bearer_token(scope)
        ticket = http.query_param(scope, "ticket")
        session_id = http.session_cookie(scope)
        principal: Principal | None = None
        ticket_rid: int | None = None
        if bearer is None and ticket is None and session_id is None:
            return StreamDecision(
                401, "UNAUTHENTICATED", "sign in, or send an API token or a stream ticket",
                [(b"www-authenticate", b'Bearer realm="regstream"')],
            )  # fmt: skip
        if bearer is not None:
            if bearer:
                async with services.sessions() as session:
                    principal = await credentials.from_api_token(session, bearer, at_ms=at)
        elif ticket is not None:
            async with services.sessions.begin() as session:
                use = await credentials.from_ticket(session, ticket, at_ms=at)
            if use is not None:
                principal, ticket_rid = use.principal, use.registration_id
        else:
            assert session_id is not None
            async with services.sessions() as session:
                principal = await credentials.from_session(session, session_id, at_ms=at)
        if principal is None:
            await _refuse_anonymous(services, auth, scope, "invalid stream credentials")
            return StreamDecision(
                401, "UNAUTHENTICATED", "credentials invalid, expired, revoked or already used",
                [(b"www-authenticate", b'Bearer realm="regstream"')],
            )  # fmt: skip
        why = None
        if principal.via_ticket and ticket_rid != registration_id:
            why = "this stream ticket is for another stream"
        elif registration_id is None and not principal.allows(Role.ADMIN):
            why = "the unfiltered stream is for admins; pass registrationId"
        if why is not None:
            await record(services, action="access.refused", outcome="refused",
                         actor=principal.username, target=_target(scope),
                         client_ip=http.client_ip(scope, services.settings),
                         details={"reason": why})  # fmt: skip
            return StreamDecision(403, "FORBIDDEN", why)
        if not await auth.guard.admit(principal, services.hub):
            return StreamDecision(
                429, "TOO_MANY_REQUESTS",
                f"at most {auth.guard.per_user} open streams per user; close one",
                [(b"retry-after", b"5")],
            )  # fmt: skip
        return StreamDecision(200, principal=principal)

    return decide
