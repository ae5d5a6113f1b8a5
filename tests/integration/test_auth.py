"""Sign-in, sessions, CSRF, API tokens, users and audit, against a live server (issue 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from regstream.db import accounts
from tests.conftest import SettingsFactory
from tests.support import (
    REGISTRATION,
    LiveServer,
    auth_headers,
    create_user,
    run_in_db,
    serve_app,
)

PASSWORD = "correct horse battery staple"


async def _login(client: httpx.AsyncClient, username: str, password: str = PASSWORD) -> str:
    response = await client.post(
        "/api/auth/login", json={"username": username, "password": password}
    )
    assert response.status_code == 200, response.text
    token = response.json()["csrfToken"]
    assert isinstance(token, str)
    return token


async def _audit(live: LiveServer) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=live.url, headers=auth_headers(live, "admin")) as c:
        response = await c.get("/api/audit", params={"pageSize": 200})
        assert response.status_code == 200
        return list(response.json()["items"])


# --- sign-in ----------------------------------------------------------------------------------


async def test_login_sets_a_hardened_expiring_cookie(live: LiveServer) -> None:
    user = create_user(live, "viewer", password=PASSWORD, token=False)
    async with httpx.AsyncClient(base_url=live.url) as client:
        response = await client.post(
            "/api/auth/login", json={"username": user.username, "password": PASSWORD}
        )
        assert response.status_code == 200
        cookie = response.headers["set-cookie"]
        assert cookie.startswith("regstream_session=")
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
        assert f"Max-Age={int(live.settings.session_lifetime)}" in cookie
        assert "Secure" not in cookie  # plain http, no trusted proxy
        me = await client.get("/api/auth/me")
        assert me.json()["username"] == user.username
        assert me.json()["role"] == "viewer"


async def test_login_rotates_the_session_and_revokes_the_old_one(live: LiveServer) -> None:
    user = create_user(live, "viewer", password=PASSWORD, token=False)
    async with httpx.AsyncClient(base_url=live.url) as client:
        await _login(client, user.username)
        first = client.cookies["regstream_session"]
        await _login(client, user.username)
        second = client.cookies["regstream_session"]
        assert first != second
    async with httpx.AsyncClient(base_url=live.url) as stale:
        stale.cookies.set("regstream_session", first)
        assert (await stale.get("/api/auth/me")).status_code == 401


async def test_wrong_password_is_401_and_audited_without_the_attempt(live: LiveServer) -> None:
    user = create_user(live, "viewer", password=PASSWORD, token=False)
    async with httpx.AsyncClient(base_url=live.url) as client:
        bad = await client.post(
            "/api/auth/login", json={"username": user.username, "password": "wrong password!!"}
        )
        assert bad.status_code == 401
        assert "set-cookie" not in bad.headers
        unknown = await client.post(
            "/api/auth/login", json={"username": "my-secret-pass", "password": "x" * 12}
        )
        assert unknown.status_code == 401
    entries = [e for e in await _audit(live) if e["action"] == "auth.login"]
    assert [(e["actor"], e["outcome"]) for e in entries] == [
        (None, "refused"),
        (user.username, "refused"),
    ]
    assert "my-secret-pass" not in str(entries)


async def test_form_login_redirects_to_a_local_path_only(live: LiveServer) -> None:
    user = create_user(live, "operator", password=PASSWORD, token=False)
    async with httpx.AsyncClient(base_url=live.url) as client:
        form = {"username": user.username, "password": PASSWORD, "next": "//evil.example/x"}
        response = await client.post("/api/auth/login", data=form)
        assert response.status_code == 303
        assert response.headers["location"] == "/"
        form["next"] = "/registrations/5"
        response = await client.post("/api/auth/login", data=form)
        assert response.headers["location"] == "/registrations/5"
        form["password"] = "not the password"
        response = await client.post("/api/auth/login", data=form)
        assert (response.status_code, response.headers["location"]) == (
            303,
            "/login?error=invalid",
        )


async def test_logout_revokes_the_session(live: LiveServer) -> None:
    user = create_user(live, "viewer", password=PASSWORD, token=False)
    async with httpx.AsyncClient(base_url=live.url) as client:
        csrf = await _login(client, user.username)
        cookie = client.cookies["regstream_session"]
        response = await client.post("/api/auth/logout", headers={"X-CSRF-Token": csrf})
        assert response.status_code == 204
    async with httpx.AsyncClient(base_url=live.url) as replay:
        replay.cookies.set("regstream_session", cookie)
        assert (await replay.get("/api/auth/me")).status_code == 401


async def test_secure_cookie_behind_a_trusted_tls_proxy(make_settings: SettingsFactory) -> None:
    with serve_app(make_settings(trust_proxy=True)) as live:
        user = create_user(live, "viewer", password=PASSWORD, token=False)
        async with httpx.AsyncClient(base_url=live.url) as client:
            response = await client.post(
                "/api/auth/login",
                json={"username": user.username, "password": PASSWORD},
                headers={"X-Forwarded-Proto": "https"},
            )
            cookie = response.headers["set-cookie"]
            assert cookie.startswith("__Host-regstream_session=")
            assert "Secure" in cookie


async def test_login_attempts_are_rate_limited(make_settings: SettingsFactory) -> None:
    with serve_app(make_settings(login_attempts_per_minute=2)) as live:
        async with httpx.AsyncClient(base_url=live.url) as client:
            body = {"username": "nobody", "password": "x" * 12}
            codes = [
                (await client.post("/api/auth/login", json=body)).status_code for _ in range(3)
            ]
            assert codes == [401, 401, 429]
            last = await client.post("/api/auth/login", json=body)
            assert int(last.headers["retry-after"]) >= 1
            assert last.json()["error"] == "TOO_MANY_REQUESTS"
            assert last.json()["message"] == "too many sign-in attempts; retry later"


# --- tokens, roles, disabled users ------------------------------------------------------------


async def test_token_for_disabled_user_is_refused(live: LiveServer) -> None:
    user = create_user(live, "admin", disabled=True)
    async with httpx.AsyncClient(base_url=live.url, headers=user.headers) as client:
        assert (await client.get("/api/registrations")).status_code == 401


async def test_tokens_are_stored_as_hashes_only(live: LiveServer) -> None:
    user = create_user(live, "viewer")
    assert user.token is not None and user.token.startswith("rst_")

    async def stored(session: Any) -> list[str]:
        operator = await accounts.get_by_username(session, username=user.username)
        assert operator is not None
        return [t.token_hash for t in await accounts.list_tokens(session, operator_id=operator.id)]

    hashes = run_in_db(live, stored)
    assert len(hashes) == 1 and len(hashes[0]) == 64 and user.token not in hashes[0]


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("Bearer rst_notarealtoken000000000000000", id="unknown-token"),
        pytest.param("Bearer", id="no-credential"),
        pytest.param("Basic YWRtaW46YWRtaW4=", id="basic"),
        pytest.param("Bearer " + "rst_" + "a" * 5000, id="huge"),
    ],
)
async def test_bad_bearer_values_are_401(live: LiveServer, header: str) -> None:
    async with httpx.AsyncClient(base_url=live.url) as client:
        response = await client.get("/api/registrations", headers={"Authorization": header})
        assert response.status_code == 401
        assert response.json()["error"] == "UNAUTHENTICATED"


async def test_admin_manages_users_and_tokens(live: LiveServer) -> None:
    admin = create_user(live, "admin")
    async with httpx.AsyncClient(base_url=live.url, headers=admin.headers) as client:
        created = await client.post(
            "/api/users", json={"username": "Kim.Ops", "role": "operator", "password": PASSWORD}
        )
        assert created.status_code == 201, created.text
        assert created.json()["username"] == "kim.ops"
        again = await client.post("/api/users", json={"username": "kim.ops", "role": "viewer"})
        assert again.status_code == 409
        weak = await client.post(
            "/api/users", json={"username": "weak", "role": "viewer", "password": "short"}
        )
        assert weak.status_code == 422
        token = await client.post("/api/users/kim.ops/tokens", json={"label": "ci"})
        assert token.status_code == 201
        value = token.json()["token"]
        listed = await client.get("/api/users/kim.ops/tokens")
        assert value not in listed.text
        assert listed.json()[0]["prefix"] == value[:8]
        async with httpx.AsyncClient(
            base_url=live.url, headers={"Authorization": f"Bearer {value}"}
        ) as kim:
            assert (await kim.get("/api/auth/me")).json()["role"] == "operator"
            revoke = await client.delete(f"/api/users/kim.ops/tokens/{token.json()['id']}")
            assert revoke.status_code == 204
            assert (await kim.get("/api/auth/me")).status_code == 401
        me = await client.patch(f"/api/users/{admin.username}", json={"disabled": True})
        assert me.status_code == 409
        disabled = await client.patch("/api/users/kim.ops", json={"disabled": True})
        assert disabled.json()["disabled"] is True
    actions = [e["action"] for e in await _audit(live)]
    for action in ("user.create", "token.create", "token.revoke", "user.update"):
        assert action in actions


# --- CSRF and CORS ----------------------------------------------------------------------------


async def test_cross_site_form_post_to_process_is_refused(live: LiveServer) -> None:
    operator = create_user(live, "operator", password=PASSWORD, token=False)
    async with httpx.AsyncClient(base_url=live.url, headers=auth_headers(live)) as api:
        rid = (await api.post("/api/registrations", json=REGISTRATION)).json()["id"]
    async with httpx.AsyncClient(base_url=live.url) as browser:
        csrf = await _login(browser, operator.username)
        # what an attacker's page can make a victim's browser send: the cookie goes along
        # (SameSite=Lax still sends it on a top-level POST navigation in old browsers)
        attack = await browser.post(
            f"/api/registrations/{rid}/process",
            data={"x": "1"},
            headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        )
        assert attack.status_code == 403
        assert attack.json()["error"] == "CSRF_FAILED"
        # no Origin at all (old browser, stripped by a proxy): the CSRF token is still needed
        no_token = await browser.post(f"/api/registrations/{rid}/process", data={"x": "1"})
        assert no_token.status_code == 403
        wrong = await browser.post(
            f"/api/registrations/{rid}/process", headers={"X-CSRF-Token": "guess"}
        )
        assert wrong.status_code == 403
        good = await browser.post(
            f"/api/registrations/{rid}/process",
            headers={"X-CSRF-Token": csrf, "Origin": live.url, "Sec-Fetch-Site": "same-origin"},
        )
        assert good.status_code == 202, good.text
    details = [e for e in await _audit(live) if e["action"] == "registration.process"]
    assert [(e["actor"], e["target"]) for e in details] == [
        (operator.username, f"registration:{rid}")
    ]


async def test_csrf_token_as_form_field(live: LiveServer) -> None:
    user = create_user(live, "viewer", password=PASSWORD, token=False)
    async with httpx.AsyncClient(base_url=live.url) as browser:
        csrf = await _login(browser, user.username)
        response = await browser.post("/api/auth/logout", data={"csrf_token": csrf})
        assert (response.status_code, response.headers["location"]) == (303, "/login")


async def test_cross_site_login_is_refused(live: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live.url) as client:
        response = await client.post(
            "/api/auth/login",
            data={"username": "a", "password": "b"},
            headers={"Origin": "https://evil.example"},
        )
        assert response.status_code == 403


async def test_cors_is_closed_by_default(live: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live.url) as client:
        preflight = await client.options(
            "/api/registrations",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers
        response = await client.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in response.headers


@pytest.fixture
def cors_live(make_settings: SettingsFactory) -> Iterator[LiveServer]:
    with serve_app(make_settings(cors_origins="https://ops.example")) as server:
        yield server


async def test_cors_allows_only_the_configured_origin(cors_live: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=cors_live.url) as client:
        ok = await client.options(
            "/api/registrations",
            headers={"Origin": "https://ops.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"},
        )  # fmt: skip
        assert ok.headers["access-control-allow-origin"] == "https://ops.example"
        assert "access-control-allow-credentials" not in ok.headers
        other = await client.options(
            "/api/registrations",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers


# --- limits -----------------------------------------------------------------------------------


async def test_oversized_body_is_413(make_settings: SettingsFactory) -> None:
    with serve_app(make_settings(max_body_bytes=2048)) as live:
        headers = auth_headers(live)
        async with httpx.AsyncClient(base_url=live.url, headers=headers) as client:
            big = {**REGISTRATION, "firstName": "A" * 5000}
            response = await client.post("/api/registrations", json=big)
            assert response.status_code == 413
            assert response.json()["error"] == "PAYLOAD_TOO_LARGE"

            async def chunks() -> Any:
                for _ in range(4):
                    yield b"x" * 1024

            chunked = await client.post(
                "/api/registrations", content=chunks(), headers={"Content-Type": "application/json"}
            )
            assert chunked.status_code == 413


async def test_process_is_rate_limited_with_retry_after(make_settings: SettingsFactory) -> None:
    with serve_app(make_settings(process_rate_per_minute=2)) as live:
        async with httpx.AsyncClient(base_url=live.url, headers=auth_headers(live)) as client:
            codes = [
                (await client.post("/api/registrations/999999/process")).status_code
                for _ in range(3)
            ]
            assert codes == [404, 404, 429]
            response = await client.post("/api/registrations/999999/process")
            assert response.status_code == 429
            assert 1 <= int(response.headers["retry-after"]) <= 60
            assert response.json()["error"] == "TOO_MANY_REQUESTS"
            assert response.json()["message"] == "too many validations started; retry later"


# --- the users CLI acts on the database serve uses ---------------------------------------------


def _cli(live: LiveServer, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGSTREAM_", "DATABASE_"))}
    env["REGSTREAM_DATA_DIR"] = str(live.settings.data_dir)
    return subprocess.run(
        [sys.executable, "-m", "regstream", "users", *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


async def test_users_cli_add_token_list_disable(live: LiveServer) -> None:
    added = _cli(live, "add", "ci-bot", "--role", "operator", "--token", "--password-stdin",
                 stdin=PASSWORD + "\n")  # fmt: skip
    assert added.returncode == 0, added.stderr
    lines = added.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rst_")  # the token alone, on stdout
    assert PASSWORD not in added.stdout + added.stderr
    headers = {"Authorization": f"Bearer {lines[0]}"}
    async with httpx.AsyncClient(base_url=live.url, headers=headers) as client:
        assert (await client.get("/api/auth/me")).json()["role"] == "operator"
        listed = _cli(live, "list")
        assert "ci-bot" in listed.stdout and "operator" in listed.stdout
        assert lines[0] not in listed.stdout
        weak = _cli(live, "add", "weakling", "--password-stdin", stdin="short\n")
        assert weak.returncode == 1 and "at least 10" in weak.stderr
        dup = _cli(live, "add", "ci-bot", "--password-stdin", stdin=PASSWORD + "\n")
        assert dup.returncode == 1 and "already exists" in dup.stderr
        disabled = _cli(live, "disable", "ci-bot")
        assert disabled.returncode == 0, disabled.stderr
        assert (await client.get("/api/auth/me")).status_code == 401
    async with httpx.AsyncClient(base_url=live.url) as browser:
        response = await browser.post(
            "/api/auth/login", json={"username": "ci-bot", "password": PASSWORD}
        )
        assert response.status_code == 401
