"""Browser fixtures: the system Chromium driven by Playwright (sync API) against a live app.

Never ``playwright install``: CI and this machine provide ``/usr/bin/chromium`` (override with
``CHROMIUM_PATH``). Each test gets a fresh browser context (its own cookies, storage, locks and
BroadcastChannels), so tabs of one context behave like tabs of one browser profile.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Route, sync_playwright

from regstream.demo import load_demo
from tests.conftest import SettingsFactory
from tests.support import TEST_SECRET_KEY, AuthUser, LiveServer, create_user, serve_app

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
SECRET = TEST_SECRET_KEY.encode()  # make_settings' secret_key
PASSWORD = "correct horse battery staple"
WAIT_MS = 15_000


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=30_000
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    context.on("weberror", lambda error: errors.append(str(error.error)))
    try:
        yield context
    finally:
        context.close()
    assert errors == [], f"uncaught errors in the pages: {errors}"


@pytest.fixture
def app(make_settings: SettingsFactory) -> Iterator[LiveServer]:
    """The whole app; browsers are told to retry after 1 s (the default is 5 s)."""
    with serve_app(make_settings(sse_retry_ms=1000)) as server:
        yield server


def on_server_loop(live: LiveServer, coro: Any, timeout: float = 15.0) -> Any:
    """Run a coroutine on the server's event loop (its engine and hub belong to that loop)."""
    loop: asyncio.AbstractEventLoop = live.app.state.loop
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def call_on_server_loop(live: LiveServer, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
    async def call() -> Any:
        return fn()

    return on_server_loop(live, call(), timeout)


def demo_ids(live: LiveServer) -> dict[str, int]:
    rows = on_server_loop(live, load_demo(live.services.sessions, SECRET))
    return {row.scenario: row.registration_id for row in rows}


def stream_count(live: LiveServer) -> int:
    return int(call_on_server_loop(live, lambda: len(live.services.hub)))


def hold_requests(
    page: Page, pattern: str, should_hold: Callable[[Route, int], bool]
) -> list[Route]:
    """Hold back the requests to URLs matching ``pattern`` that ``should_hold(route, how many are
    held already)`` picks (the others go on), so a test can answer them after newer ones."""
    held: list[Route] = []

    def handle(route: Route) -> None:
        if should_hold(route, len(held)):
            held.append(route)
        else:
            route.continue_()

    page.route(re.compile(pattern), handle)
    return held


def wait_held(page: Page, held: list[Route], what: str) -> Route:
    for _ in range(200):  # route handlers run inside Playwright calls: wait with one
        if held:
            return held[0]
        page.wait_for_timeout(50)
    raise AssertionError(f"{what} was not sent")


def answer_late(route: Route, **fulfil: Any) -> None:
    """Let a held request answer now (with ``fulfil``'s body if given, else the server's)."""
    try:
        if fulfil:
            route.fulfill(**fulfil)
        else:
            route.continue_()
    except Exception:  # noqa: BLE001 - the page may have cancelled it already
        pass


def wait_for(predicate: Callable[[], bool], *, timeout: float = 15.0, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_streams(live: LiveServer, expected: int, *, timeout: float = 15.0) -> None:
    wait_for(
        lambda: stream_count(live) == expected,
        timeout=timeout,
        what=f"{expected} stream(s) on the server (have {stream_count(live)})",
    )


def sign_in(context: BrowserContext, live: LiveServer, role: str) -> AuthUser:
    """A new user with ``role``, signed in in ``context`` (its session cookie is the browser's)."""
    user = create_user(live, role, password=PASSWORD)
    response = context.request.post(
        f"{live.url}/api/auth/login", data={"username": user.username, "password": PASSWORD}
    )
    assert response.status == 200, response.text()
    return user


def _operator_headers(live: LiveServer) -> dict[str, str]:
    """The test's own operator API token, made once per server."""
    headers: dict[str, str] | None = getattr(live, "_test_operator_headers", None)
    if headers is None:
        headers = create_user(live, "operator").headers
        setattr(live, "_test_operator_headers", headers)  # noqa: B010
    return headers


def process(live: LiveServer, registration_id: int) -> int:
    response = httpx.post(
        f"{live.url}/api/registrations/{registration_id}/process",
        headers=_operator_headers(live), timeout=10,
    )  # fmt: skip
    return response.status_code


def registration(live: LiveServer, registration_id: int) -> dict[str, Any]:
    response = httpx.get(
        f"{live.url}/api/registrations/{registration_id}",
        headers=_operator_headers(live), timeout=10,
    )  # fmt: skip
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def open_detail(context: BrowserContext, live: LiveServer, registration_id: int) -> Page:
    page = context.new_page()
    page.goto(f"{live.url}/registrations/{registration_id}")
    wait_live(page)
    return page


def wait_live(page: Page, timeout: float = WAIT_MS) -> None:
    page.wait_for_selector('#connection[data-state="live"]', timeout=timeout)


def stages_of(page: Page) -> list[tuple[str, str]]:
    items = page.eval_on_selector_all(
        "#stages li", "els => els.map(e => [e.dataset.stage, e.dataset.state])"
    )
    return [(str(stage), str(state)) for stage, state in items]


def screenshot(page: Page, name: str, *, full_page: bool = True) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    print(f"screenshot: {path}")
    return path
