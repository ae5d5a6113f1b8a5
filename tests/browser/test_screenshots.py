"""Screenshots for people to look at (test-artifacts/screenshots/, paths printed): the detail
page in the middle of a slow run and after it, on a phone, and the admin dashboard."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from regstream.core_banking.simulator.server import RunningSimulator
from tests.browser.conftest import demo_ids, screenshot, sign_in, wait_for, wait_live
from tests.conftest import SettingsFactory
from tests.support import serve_app

pytestmark = pytest.mark.browser


def wait_bar(page: Page, fraction: float) -> None:
    """Let the progress bar's 0.3 s width transition reach ``fraction`` of the track."""
    script = (
        "document.querySelector('#progress .bar').getBoundingClientRect().width >= "
        f"document.querySelector('#progress').getBoundingClientRect().width * {fraction}"
    )
    wait_for(lambda: bool(page.evaluate(script)), timeout=5, what=f"the bar at {fraction:.0%}")


def test_screenshots_of_a_slow_run_and_the_dashboard(
    make_settings: SettingsFactory, t24_private: RunningSimulator, context: BrowserContext
) -> None:
    response = httpx.post(f"{t24_private.control_url}/config", json={"latency_ms": 1500}, timeout=5)
    assert response.status_code < 300, response.text
    with serve_app(make_settings(t24_base_url=t24_private.base_url, sse_retry_ms=1000)) as live:
        ids = demo_ids(live)
        sign_in(context, live, "admin")
        dashboard = context.new_page()
        dashboard.goto(f"{live.url}/admin")
        wait_live(dashboard)

        page = context.new_page()
        page.goto(f"{live.url}/registrations/{ids['approved']}")
        wait_live(page)
        page.get_by_role("button", name="Validate Customer").click()
        expect(page.locator('#stages li[data-stage="t24_lookup"]')).to_have_attribute(
            "data-state", "started"
        )
        wait_bar(page, 0.3)
        screenshot(page, "detail-mid-run")
        expect(page.locator("#result")).to_have_attribute("data-status", "APPROVED", timeout=30_000)
        wait_bar(page, 0.99)
        screenshot(page, "detail-approved")

        phone = context.new_page()
        phone.set_viewport_size({"width": 390, "height": 844})
        phone.goto(f"{live.url}/registrations/{ids['kyc_mismatch']}")
        wait_live(phone)
        phone.get_by_role("button", name="Validate Customer").click()
        expect(phone.locator("#result")).to_have_attribute("data-status", "FAILED", timeout=30_000)
        wait_bar(phone, 0.99)
        screenshot(phone, "detail-failed-phone")

        expect(dashboard.locator('#counters li[data-counter="APPROVED"] .n')).to_have_text("1")
        expect(dashboard.locator('#counters li[data-counter="FAILED"] .n')).to_have_text("1")
        expect(dashboard.locator("#lat-count")).not_to_have_text("0", timeout=15_000)
        screenshot(dashboard, "dashboard")

        listing = context.new_page()
        listing.goto(f"{live.url}/registrations")
        wait_live(listing)
        expect(listing.locator(f'#rows tr[data-id="{ids["approved"]}"]')).to_have_attribute(
            "data-status", "APPROVED"
        )
        screenshot(listing, "registrations")
