"""What auth needs to know about an HTTP request, read from the raw ASGI scope.

Plain functions on the scope (not Starlette's ``Request``) because the stream path is served
outside FastAPI. Forwarded headers are honoured only with ``REGSTREAM_TRUST_PROXY=true``.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

from regstream.config import Settings

Scope = MutableMapping[str, Any]  # Starlette's ``Scope``

SESSION_COOKIE = "regstream_session"
# With Secure we use the __Host- prefix: the browser then refuses the cookie unless it was set
# over HTTPS, for path "/", without a Domain, so a sibling sub-domain cannot plant or shadow it.
SECURE_SESSION_COOKIE = "__Host-regstream_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def header(scope: Scope, name: str) -> str | None:
    key = name.lower().encode("latin-1")
    for k, v in scope.get("headers", ()):
        if k == key:
            return str(v.decode("latin-1"))
    return None


def bearer_token(scope: Scope) -> str | None:
    """The bearer credential, ``""`` for a malformed Authorization header, ``None`` for none."""
    value = header(scope, "authorization")
    if value is None:
        return None
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return ""
    return credential.strip()


def session_cookie(scope: Scope) -> str | None:
    raw = header(scope, "cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return None
    for name in (SECURE_SESSION_COOKIE, SESSION_COOKIE):
        if name in jar and jar[name].value:
            return jar[name].value
    return None


def query_param(scope: Scope, name: str) -> str | None:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    values = query.get(name)
    return values[0] if values else None


def _forwarded_first(value: str | None) -> str | None:
    if not value:
        return None
    return value.split(",")[0].strip() or None


def is_https(scope: Scope, settings: Settings) -> bool:
    if settings.trust_proxy:
        proto = _forwarded_first(header(scope, "x-forwarded-proto"))
        if proto:
            return proto.lower() == "https"
    return scope.get("scheme") in ("https", "wss")


def cookie_secure(scope: Scope, settings: Settings) -> bool:
    if settings.cookie_secure == "always":
        return True
    if settings.cookie_secure == "never":
        return False
    return is_https(scope, settings)


def client_ip(scope: Scope, settings: Settings) -> str | None:
    if settings.trust_proxy:
        forwarded = _forwarded_first(header(scope, "x-forwarded-for"))
        if forwarded:
            return forwarded[:45]
    client = scope.get("client")
    return str(client[0])[:45] if client else None


def own_origin(scope: Scope, settings: Settings) -> str | None:
    """``scheme://host[:port]`` this request was addressed to."""
    host = None
    if settings.trust_proxy:
        host = _forwarded_first(header(scope, "x-forwarded-host"))
    host = host or header(scope, "host")
    if not host:
        return None
    return f"{'https' if is_https(scope, settings) else 'http'}://{host.lower()}"


def _normal_origin(value: str) -> str:
    parts = urlsplit(value.strip().lower())
    netloc = parts.netloc
    if parts.scheme == "http" and netloc.endswith(":80"):
        netloc = netloc[:-3]
    if parts.scheme == "https" and netloc.endswith(":443"):
        netloc = netloc[:-4]
    return f"{parts.scheme}://{netloc}"


def cross_site(scope: Scope, settings: Settings) -> bool:
    """Whether the browser tells us this request comes from another site.

    ``Sec-Fetch-Site`` (all current browsers) is decisive when present; else ``Origin``,
    compared with our own origin and the configured CORS origins. A request with neither header
    is not a browser's cross-site request (non-browser clients use bearer tokens anyway; a
    cookie request still needs the CSRF token).
    """
    site = header(scope, "sec-fetch-site")
    origin = header(scope, "origin")
    allowed = {_normal_origin(o) for o in settings.cors_origins}
    if origin and origin != "null" and _normal_origin(origin) in allowed:
        return False
    if site is not None:
        return site.lower() not in ("same-origin", "none")
    if origin is None:
        return False
    if origin == "null":
        return True
    mine = own_origin(scope, settings)
    return mine is None or _normal_origin(origin) != _normal_origin(mine)
