"""Every route, every identity: the expected 200-ish/401/403 (issue 4).

The cases are generated from the app's own route list (plus the stream path, which is served
outside FastAPI), and every route must appear in ``RULES``: a new route fails this test until
someone decides who may call it, and then the test checks that the route really enforces it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi.routing import iter_route_contexts
from pydantic import SecretStr
from starlette.routing import Mount

from regstream.api.stream import STREAM_PATH
from regstream.app import create_app
from regstream.config import Settings
from tests.support import AuthUser, LiveServer, create_user, serve_app

# who may call what: "public", "signed-in" (any role), "viewer" < "operator" < "admin";
# "page:<role>" is an HTML page (not signed in: a redirect to /login rather than a 401)
RULES: dict[tuple[str, str], str] = {
    ("POST", "/api/auth/login"): "public",
    ("POST", "/api/auth/logout"): "signed-in",
    ("GET", "/api/auth/me"): "signed-in",
    ("POST", "/api/auth/stream-ticket"): "viewer",
    ("GET", "/api/users"): "admin",
    ("POST", "/api/users"): "admin",
    ("PATCH", "/api/users/{username}"): "admin",
    ("GET", "/api/users/{username}/tokens"): "admin",
    ("POST", "/api/users/{username}/tokens"): "admin",
    ("DELETE", "/api/users/{username}/tokens/{token_id}"): "admin",
    ("GET", "/api/audit"): "admin",
    ("GET", "/openapi.json"): "viewer",
    ("GET", "/docs"): "viewer",
    ("GET", "/api/schema/stream.json"): "viewer",
    ("POST", "/api/registrations"): "operator",
    ("GET", "/api/registrations"): "viewer",
    ("GET", "/api/registrations/{registration_id}"): "viewer",
    ("POST", "/api/registrations/{registration_id}/process"): "operator",
    ("POST", "/api/registrations/process"): "operator",
    ("GET", STREAM_PATH + "?registrationId=1"): "viewer",
    ("GET", STREAM_PATH): "admin",
    ("GET", "/healthz"): "public",
    ("GET", "/readyz"): "public",
    ("GET", "/metrics"): "admin",
    # the dashboard API and the pages (web helper's routes)
    ("GET", "/api/stats"): "admin",
    ("GET", "/api/metrics/latency"): "admin",
    ("POST", "/api/metrics/latency"): "viewer",
    ("GET", "/"): "public",  # a redirect to /registrations, no data
    ("GET", "/login"): "public",
    ("GET", "/registrations"): "page:viewer",
    ("GET", "/registrations/{registration_id}"): "page:viewer",
    ("GET", "/admin"): "page:admin",
    ("GET", "/admin/audit"): "page:admin",
}
BODIES: dict[tuple[str, str], object] = {
    ("POST", "/api/auth/stream-ticket"): {"registrationId": 1},  # unfiltered is admin-only
    ("POST", "/api/registrations/process"): {"registrationIds": [999999]},
}
PUBLIC_MOUNTS = {"/static"}  # CSS and JS files: no data
RANK = {"viewer": 1, "operator": 2, "admin": 3}
IDENTITIES = ["anonymous", "disabled-admin", "viewer", "operator", "admin"]


def _routes() -> list[tuple[str, str]]:
    app = create_app(Settings(secret_key=SecretStr("x" * 32)))
    found: list[tuple[str, str]] = []
    for context in iter_route_contexts(app.api.routes):
        route = context.original_route
        if isinstance(route, Mount):
            assert route.path in PUBLIC_MOUNTS, f"mount {route.path} needs a decision here"
            continue
        for method in sorted((context.methods or set()) - {"HEAD"}):
            found.append((method, str(context.path_format)))
    found += [("GET", STREAM_PATH + "?registrationId=1"), ("GET", STREAM_PATH)]
    return found


ROUTES = _routes()


def test_every_route_has_an_access_rule() -> None:
    missing = [f"{m} {p}" for m, p in ROUTES if (m, p) not in RULES]
    assert missing == [], f"decide who may call these routes (add them to RULES): {missing}"
    stale = [f"{m} {p}" for m, p in RULES if (m, p) not in ROUTES]
    assert stale == [], f"RULES lists routes the app no longer has: {stale}"


@dataclass
class World:
    live: LiveServer
    users: dict[str, AuthUser]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # module-scoped: one server for all cases (the function-scoped fixtures cannot be used)
    from regstream.core_banking.simulator import SimulatorConfig
    from regstream.core_banking.simulator.server import serve_in_thread
    from regstream.realtime.embedded import EmbeddedRedis
    from tests.support import free_port

    tmp = tmp_path_factory.mktemp("access")
    redis = EmbeddedRedis(directory=tmp / "redis", port=free_port())
    redis.start()
    try:
        with serve_in_thread(SimulatorConfig(latency_ms=0)) as sim:
            settings = Settings(
                data_dir=tmp / "var", redis_url=SecretStr(redis.url), t24_base_url=sim.base_url,
                secret_key=SecretStr("k" * 32), process_rate_per_minute=1000,
            )  # fmt: skip
            with serve_app(settings) as live:
                users = {role: create_user(live, role) for role in ("viewer", "operator", "admin")}
                users["disabled-admin"] = create_user(live, "admin", disabled=True)
                yield World(live, users)
    finally:
        redis.stop()


def _url(path: str, world: World) -> str:
    return (
        path.replace("{registration_id}", "1")
        .replace("{username}", world.users["viewer"].username)
        .replace("{token_id}", "999999")
    )


def _expected(rule: str, identity: str) -> str:
    """``allowed``, ``401``, ``redirect`` (to /login) or ``403``."""
    kind, _, role = rule.partition(":")
    page = kind == "page"
    needed = role if page else rule
    if needed == "public":
        return "allowed"
    if identity in ("anonymous", "disabled-admin"):
        return "redirect" if page else "401"
    if needed == "signed-in" or RANK[identity] >= RANK[needed]:
        return "allowed"
    return "403"


CASES = [
    pytest.param(method, path, identity, id=f"{method} {path} as {identity}")
    for method, path in ROUTES
    if (method, path) in RULES
    for identity in IDENTITIES
]


@pytest.mark.parametrize(("method", "path", "identity"), CASES)
def test_route_access(world: World, method: str, path: str, identity: str) -> None:
    rule = RULES[(method, path)]
    headers = {} if identity == "anonymous" else world.users[identity].headers
    url = world.live.url + _url(path, world)
    with httpx.Client(timeout=httpx.Timeout(10, read=5)) as client:
        body = None if method in ("GET", "DELETE") else BODIES.get((method, path), {})
        with client.stream(method, url, headers=headers, json=body) as response:
            status = response.status_code
            location = response.headers.get("location", "")
    expected = _expected(rule, identity)
    if expected == "allowed":
        assert status not in (401, 403), f"{identity} refused ({status}) on {method} {path}"
        assert status < 500
    elif expected == "401":
        assert status == 401, f"{identity} got {status} on {method} {path}, expected 401"
    elif expected == "redirect":
        assert status in (401, 303, 307), f"{identity} got {status} on page {path}"
        if status != 401:
            assert location.startswith("/login"), location
    else:
        assert status == 403, f"{identity} got {status} on {method} {path}, expected 403"
