"""The React example of @regstream/client (clients/js/examples/react) in Chromium, against the
real service: the hook under StrictMode shows the Live badge, every stage, the final status, and
resumes after a server-side drop; unmounting it leaves no stream open.

The example is bundled once (esbuild) and served from the service's origin by Playwright's
router (so the session cookie authenticates the stream, as for the service's own pages).
"""

from __future__ import annotations

import json
import mimetypes
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page, Route, expect

from regstream.realtime import messages
from tests.browser.conftest import (
    call_on_server_loop,
    demo_ids,
    process,
    registration,
    sign_in,
    wait_for,
    wait_streams,
)
from tests.conftest import SettingsFactory
from tests.js_client import CLIENT_DIR, run_node
from tests.support import LiveServer, create_user, serve_app

pytestmark = pytest.mark.browser

DIST = CLIENT_DIR / "examples" / "react" / "dist"
T24_PATH = [
    ("duplicate_check", "completed"),
    ("t24_lookup", "completed"),
    ("status_update", "completed"),
]


@pytest.fixture(scope="module")
def example_dist() -> Iterator[Path]:
    built = run_node("scripts/build-example.mjs")
    assert built.returncode == 0, built.stdout + built.stderr
    yield DIST


def open_example(context: BrowserContext, live: LiveServer, dist: Path, rid: int) -> Page:
    """The example on the service's origin (Playwright answers /example/ from ``dist``), so the
    session cookie authenticates it like the service's own pages."""

    def serve(route: Route) -> None:
        name = route.request.url.split("/example/", 1)[1].split("?", 1)[0] or "index.html"
        path = dist / name
        if not path.is_file() or path.parent != dist:
            route.fulfill(status=404, body="not found")
            return
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        route.fulfill(status=200, body=path.read_bytes(), headers={"content-type": kind})

    page = context.new_page()
    page.route(f"{live.url}/example/**", serve)
    page.goto(f"{live.url}/example/?registrationId={rid}")
    return page


def stages_of(page: Page) -> list[tuple[str, str]]:
    items = page.eval_on_selector_all(
        "#stages li", "els => els.map(e => [e.dataset.stage, e.dataset.state])"
    )
    return [(str(stage), str(state)) for stage, state in items]


def test_hook_shows_live_badge_every_stage_and_final_status(
    app: LiveServer, context: BrowserContext, example_dist: Path
) -> None:
    rid = demo_ids(app)["approved"]
    sign_in(context, app, "viewer")
    page = open_example(context, app, example_dist, rid)
    expect(page.locator("#live")).to_have_text("Live")
    # StrictMode mounted, unmounted and mounted the hook again: one stream, not two
    wait_streams(app, 1)
    expect(page.locator("#status")).to_have_text("PENDING")

    assert process(app, rid) == 202
    expect(page.locator("#result")).to_have_attribute("data-status", "APPROVED")
    expect(page.locator("#status")).to_have_text("APPROVED")
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    assert stages_of(page) == T24_PATH
    # the hook's `updates`: every update of the run once, in order, without a gap
    updates = page.eval_on_selector_all(
        "#updates li",
        "els => els.map(e => [Number(e.dataset.seq), e.dataset.stage, e.dataset.stageStatus])",
    )
    seqs = [seq for seq, _, _ in updates]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), updates
    assert [(stage, state) for _, stage, state in updates] == [
        *[(stage, state) for stage, _ in T24_PATH for state in ("started", "completed")],
        ("", "final"),
    ]

    page.locator("#toggle").click()  # unmount: the subscription, its stream and lock go
    wait_streams(app, 0)
    page.locator("#toggle").click()  # mount again
    expect(page.locator("#live")).to_have_text("Live")
    wait_streams(app, 1)


def test_hook_resumes_after_a_server_side_drop(
    app: LiveServer, context: BrowserContext, example_dist: Path
) -> None:
    rid = demo_ids(app)["approved"]
    sign_in(context, app, "viewer")
    page = open_example(context, app, example_dist, rid)
    expect(page.locator("#live")).to_have_text("Live")
    wait_streams(app, 1)

    # Drop every stream server-side and ask browsers to wait 3 s before coming back; a whole
    # run happens meanwhile.
    closed = call_on_server_loop(
        app, lambda: app.services.hub.close_all(messages.retry_frame(3000))
    )
    assert closed == 1
    expect(page.locator("#live")).to_have_count(0, timeout=5000)
    assert process(app, rid) == 202
    wait_for(lambda: registration(app, rid)["status"] == "APPROVED", what="run to end")

    expect(page.locator("#live")).to_have_text("Live", timeout=10_000)
    expect(page.locator("#result")).to_have_attribute("data-status", "APPROVED")
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    assert stages_of(page) == T24_PATH


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


@pytest.fixture
def example_site(example_dist: Path) -> Iterator[str]:
    """The built example on a site of its own: a static HTTP server on another loopback port
    (another origin; loopback like the service, so Chromium's local-network checks pass)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(example_dist)))
    thread = threading.Thread(target=server.serve_forever, name="example-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def cross_origin_app(make_settings: SettingsFactory, example_site: str) -> Iterator[LiveServer]:
    with serve_app(make_settings(sse_retry_ms=1000, cors_origins=(example_site,))) as server:
        yield server


def test_hook_across_origins_with_stream_tickets(
    cross_origin_app: LiveServer, context: BrowserContext, example_site: str
) -> None:
    """Another site with an API token: REST with the Bearer token, streams with single-use
    tickets (a fresh one after a drop: the spent one would be refused)."""
    app = cross_origin_app
    rid = demo_ids(app)["approved"]
    token = create_user(app, "viewer").token
    assert token is not None
    config = json.dumps({"baseUrl": app.url, "token": token})
    context.add_init_script(f"window.REGSTREAM_EXAMPLE = {config};")
    tickets: list[str] = []
    context.on(
        "request",
        lambda request: (
            tickets.append(request.method)
            if request.url.endswith("/api/auth/stream-ticket") and request.method == "POST"
            else None
        ),
    )
    page = context.new_page()
    page.goto(f"{example_site}/?registrationId={rid}")
    expect(page.locator("#live")).to_have_text("Live")
    expect(page.locator("#status")).to_have_text("PENDING")
    wait_streams(app, 1)
    assert len(tickets) == 1

    closed = call_on_server_loop(
        app, lambda: app.services.hub.close_all(messages.retry_frame(1000))
    )
    assert closed == 1
    assert process(app, rid) == 202
    wait_for(lambda: registration(app, rid)["status"] == "APPROVED", what="run to end")
    expect(page.locator("#live")).to_have_text("Live", timeout=10_000)
    expect(page.locator("#result")).to_have_attribute("data-status", "APPROVED")
    assert stages_of(page) == T24_PATH
    assert len(tickets) == 2
