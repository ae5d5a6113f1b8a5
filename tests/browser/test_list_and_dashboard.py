"""The list page, the admin dashboard and signing in, in Chromium."""

from __future__ import annotations

import pytest
from playwright.sync_api import BrowserContext, expect

from tests.browser.conftest import (
    PASSWORD,
    demo_ids,
    process,
    screenshot,
    sign_in,
    wait_live,
)
from tests.support import LiveServer, create_user

pytestmark = pytest.mark.browser


def test_sign_in_page_returns_to_the_page_asked_for(
    app: LiveServer, context: BrowserContext
) -> None:
    rid = demo_ids(app)["approved"]
    user = create_user(app, "viewer", password=PASSWORD, token=False)
    page = context.new_page()
    page.goto(f"{app.url}/registrations/{rid}")
    page.wait_for_url("**/login?next=*")
    page.get_by_label("User name").fill(user.username)
    page.get_by_label("Password").fill("wrong password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("Wrong user name or password.")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_label("Password").press("Enter")  # keyboard only
    page.wait_for_url(f"**/registrations/{rid}")
    wait_live(page)
    expect(page.locator("#who-name")).to_have_text(user.username)
    expect(page.get_by_role("button", name="Validate Customer")).to_be_visible()


def test_list_row_follows_a_run_live(app: LiveServer, context: BrowserContext) -> None:
    ids = demo_ids(app)
    rid = ids["approved"]
    sign_in(context, app, "admin")
    page = context.new_page()
    page.goto(f"{app.url}/registrations")
    wait_live(page)
    page.evaluate("window.__marker = 'no-reload'")
    row = page.locator(f'#rows tr[data-id="{rid}"]')
    expect(row.locator(".col-status")).to_have_text("PENDING")
    expect(page.locator("#rows tr")).to_have_count(len(ids))

    assert process(app, rid) == 202
    expect(row).to_have_attribute("data-status", "APPROVED")
    expect(row.locator(".col-status")).to_have_text("APPROVED")
    expect(row.locator(".col-stage")).to_contain_text("Status update")
    assert page.evaluate("window.__marker") == "no-reload"

    # Filter and search go through the API and the URL.
    page.get_by_label("Status").select_option("APPROVED")
    expect(page.locator("#rows tr")).to_have_count(1)
    assert "status=APPROVED" in page.url
    page.get_by_label("Status").select_option("")
    page.get_by_label("Search").fill("Otieno")
    expect(page.locator("#rows tr")).to_have_count(1)
    expect(page.locator("#rows tr .name")).to_have_text("Amani Otieno")


def test_validate_selected_shows_overall_progress(app: LiveServer, context: BrowserContext) -> None:
    ids = demo_ids(app)
    sign_in(context, app, "admin")
    page = context.new_page()
    page.goto(f"{app.url}/registrations")
    wait_live(page)
    chosen = [ids["approved"], ids["kyc_mismatch"], ids["duplicate"]]
    for rid in chosen:
        page.locator(f'#rows tr[data-id="{rid}"] .pick').check()
    page.get_by_role("button", name="Validate selected (3)").click()
    bar = page.get_by_role("progressbar", name="Selected validations")
    expect(bar).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#bulk-text")).to_have_text("3 of 3 finished")
    for rid, status in zip(chosen, ["APPROVED", "FAILED", "DUPLICATE"], strict=True):
        expect(page.locator(f'#rows tr[data-id="{rid}"]')).to_have_attribute("data-status", status)


def test_list_for_an_operator_refreshes_without_the_admin_stream(
    app: LiveServer, context: BrowserContext
) -> None:
    rid = demo_ids(app)["approved"]
    sign_in(context, app, "operator")
    page = context.new_page()
    page.goto(f"{app.url}/registrations")
    badge = page.locator("#connection")
    expect(badge).to_have_attribute("data-state", "polling")
    assert process(app, rid) == 202
    expect(page.locator(f'#rows tr[data-id="{rid}"]')).to_have_attribute(
        "data-status", "APPROVED", timeout=10_000
    )


def test_dashboard_feed_shows_a_run_started_in_another_page(
    app: LiveServer, context: BrowserContext
) -> None:
    rid = demo_ids(app)["completed_update"]
    sign_in(context, app, "admin")
    dashboard = context.new_page()
    dashboard.goto(f"{app.url}/admin")
    wait_live(dashboard)
    detail = context.new_page()
    detail.goto(f"{app.url}/registrations/{rid}")
    wait_live(detail)
    detail.get_by_role("button", name="Validate Customer").click()

    final = dashboard.locator(f'#feed li[data-registration-id="{rid}"][data-stage="final"]')
    expect(final).to_have_count(1)
    expect(final).to_contain_text("COMPLETED")
    items = dashboard.locator(f'#feed li[data-registration-id="{rid}"]')
    expect(items).to_have_count(7)  # 3 stages x started/completed + the final status
    expect(dashboard.locator('#counters li[data-counter="COMPLETED"] .n')).to_have_text("1")
    expect(dashboard.locator('#counters li[data-counter="inProgress"] .n')).to_have_text("0")
    expect(dashboard.locator('#counters li[data-counter="streams"] .n')).to_have_text("1")

    # Filters: by stage, then by status.
    dashboard.get_by_label("Stage").select_option("update_user_info")
    expect(dashboard.locator("#feed li:visible")).to_have_count(2)
    dashboard.get_by_label("Stage").select_option("")
    dashboard.locator("#feed-status").select_option("COMPLETED")
    expect(dashboard.locator("#feed li:visible")).to_have_count(1)

    # Browsers report delivery latency; the dashboard shows it.
    expect(dashboard.locator("#lat-count")).not_to_have_text("0", timeout=15_000)
    expect(dashboard.locator("#lat-chart polyline")).to_have_count(1)


def test_dashboard_is_for_admins(app: LiveServer, context: BrowserContext) -> None:
    sign_in(context, app, "operator")
    page = context.new_page()
    response = page.goto(f"{app.url}/admin")
    assert response is not None and response.status == 403
    expect(page.locator("#page-error")).to_contain_text("admin")


def test_audit_page_lists_sign_ins(app: LiveServer, context: BrowserContext) -> None:
    user = sign_in(context, app, "admin")
    page = context.new_page()
    page.goto(f"{app.url}/admin/audit")
    row = page.locator("#audit-rows tr", has_text="auth.login").first
    expect(row).to_contain_text(user.username)
    expect(row).to_contain_text("ok")
    screenshot(page, "audit")
