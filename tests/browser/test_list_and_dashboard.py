"""The list page, the admin dashboard and signing in, in Chromium."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import BrowserContext, Route, expect

from tests.browser.conftest import (
    PASSWORD,
    answer_late,
    demo_ids,
    hold_requests,
    process,
    screenshot,
    sign_in,
    stream_count,
    wait_for,
    wait_held,
    wait_live,
    wait_streams,
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
    # the list form retries until exactly this one row shows (a count of 1 alone was already
    # true of the APPROVED filter's page, before the unfiltered page and then the search landed)
    expect(page.locator("#rows tr .name")).to_have_text(["Amani Otieno"])


def test_list_keeps_the_newest_answer_when_answers_cross(
    app: LiveServer, context: BrowserContext
) -> None:
    """Clearing a filter and then typing a search sends two list requests; if the first answers
    last, the page must still show the search's rows (seen as a flaky test in CI)."""
    demo_ids(app)
    sign_in(context, app, "admin")
    page = context.new_page()
    page.goto(f"{app.url}/registrations?status=APPROVED")
    wait_live(page)
    held = hold_requests(
        page, r".*/api/registrations\?.*",
        lambda route, _n: "q=" not in route.request.url and "status=" not in route.request.url,
    )  # fmt: skip
    page.get_by_label("Status").select_option("")
    unfiltered = wait_held(page, held, "the unfiltered list request")
    page.get_by_label("Search").fill("Otieno")
    expect(page.locator("#rows tr .name")).to_have_text("Amani Otieno")
    answer_late(unfiltered)  # the overtaken answer arrives last
    page.wait_for_timeout(500)
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


def test_list_for_an_operator_is_live_on_one_stream(
    app: LiveServer, context: BrowserContext
) -> None:
    """An operator may not hold the unfiltered stream: the page follows its rows' ids instead,
    on one multi-registration stream that switches over when the filter changes."""
    ids = demo_ids(app)
    rid = ids["approved"]
    sign_in(context, app, "operator")
    page = context.new_page()
    page.goto(f"{app.url}/registrations")
    wait_live(page)
    badge = page.locator("#connection")
    expect(badge).to_have_text("Live")
    page.evaluate("window.__marker = 'no-reload'")
    expect(page.locator("#rows tr")).to_have_count(len(ids))
    wait_streams(app, 1)
    assert page.evaluate("window.__regstream.streams") == [",".join(map(str, sorted(ids.values())))]

    assert process(app, rid) == 202
    row = page.locator(f'#rows tr[data-id="{rid}"]')
    expect(row).to_have_attribute("data-status", "APPROVED")
    expect(row.locator(".col-status")).to_have_text("APPROVED")
    expect(row.locator(".col-stage")).to_contain_text("Status update")
    assert page.evaluate("window.__marker") == "no-reload"
    assert stream_count(app) == 1

    # Another filter, other rows: the stream switches over (the old one closes once the new one
    # is open; the badge stays Live meanwhile) and the new rows follow runs live.
    page.evaluate(
        """window.__badgeStates = [];
        new MutationObserver(() => window.__badgeStates.push(
            document.getElementById('connection').dataset.state
        )).observe(document.getElementById('connection'), {attributes: true});"""
    )
    page.get_by_label("Status").select_option("PENDING")
    expect(page.locator("#rows tr")).to_have_count(len(ids) - 1)
    other = ids["kyc_mismatch"]
    pending = sorted(i for i in ids.values() if i != rid)
    wait_for(
        lambda: page.evaluate("window.__regstream.streams") == [",".join(map(str, pending))],
        what="the stream to follow the filtered rows",
    )
    wait_streams(app, 1)
    expect(badge).to_have_text("Live")
    assert process(app, other) == 202
    expect(page.locator(f'#rows tr[data-id="{other}"]')).to_have_attribute("data-status", "FAILED")
    assert page.evaluate("window.__marker") == "no-reload"
    assert stream_count(app) == 1
    assert set(page.evaluate("window.__badgeStates")) <= {"live"}


def test_list_rereads_its_page_when_the_history_cannot_cover_a_switch_over(
    app: LiveServer, context: BrowserContext
) -> None:
    """The switched-over stream resumes from an id the history cannot cover: the server sends a
    snapshot of each followed registration with progress (issue 16: a filtered stream gets the
    registration's state, not a bare resync marker) and the page re-fetches its rows."""
    ids = demo_ids(app)
    rid = ids["approved"]
    sign_in(context, app, "operator")
    page = context.new_page()
    page.goto(f"{app.url}/registrations")
    wait_live(page)
    wait_streams(app, 1)
    assert process(app, rid) == 202  # the stream has seen an event id now
    expect(page.locator(f'#rows tr[data-id="{rid}"]')).to_have_attribute("data-status", "APPROVED")

    stale = "1000000000000000_1-0"  # an epoch Redis never had: nothing can be replayed

    def resume_from_stale(route: Route) -> None:
        url = route.request.url
        if "lastEventId=" in url:
            url = re.sub(r"lastEventId=[^&]*", f"lastEventId={stale}", url)
        route.continue_(url=url)

    page.route("**/api/registrations/updates/stream*", resume_from_stale)
    page.evaluate(
        """window.__pageFetches = 0;
        const fetchBefore = window.fetch;
        window.fetch = (url, ...rest) => {
            const u = String(url);
            if (u.includes('/api/registrations?') && u.includes('status=APPROVED')) {
                window.__pageFetches += 1;
            }
            return fetchBefore(url, ...rest);
        };"""
    )
    page.get_by_label("Status").select_option("APPROVED")
    expect(page.locator("#rows tr")).to_have_count(1)
    # One fetch for the filter, one more for the snapshot of its (processed) row.
    wait_for(
        lambda: page.evaluate("window.__pageFetches") >= 2,
        what="the page to be fetched again after the snapshot",
    )
    wait_streams(app, 1)
    expect(page.locator("#connection")).to_have_text("Live")
    expect(page.locator(f'#rows tr[data-id="{rid}"]')).to_have_attribute(
        "data-status", "APPROVED"
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


def test_dashboard_keeps_the_newest_figures_when_answers_cross(
    app: LiveServer, context: BrowserContext
) -> None:
    """The figures are asked for on a timer and after every update: an answer that arrives after
    a newer one must not put older counts back."""
    ids = demo_ids(app)
    rid = ids["completed_update"]
    sign_in(context, app, "admin")
    dashboard = context.new_page()
    dashboard.goto(f"{app.url}/admin")
    wait_live(dashboard)
    completed = dashboard.locator('#counters li[data-counter="COMPLETED"] .n')
    expect(completed).to_have_text("0")
    asked: list[int] = []

    def all_but_the_second(_route: Route, _held: int) -> bool:
        asked.append(1)
        return len(asked) != 2  # later ones are held too: only the stale answer can arrive

    held = hold_requests(dashboard, r".*/api/stats$", all_but_the_second)
    assert process(app, rid) == 202  # its updates ask for the figures again
    first = wait_held(dashboard, held, "a figures request after the updates")
    final = dashboard.locator(f'#feed li[data-registration-id="{rid}"][data-stage="final"]')
    expect(final).to_have_count(1)
    assert process(app, ids["duplicate"]) == 202  # its updates ask again: this one answers
    expect(completed).to_have_text("1")
    answer_late(  # the overtaken request answers last, with the figures from before the run
        first,
        json={"inProgress": 1, "streams": 1, "byStatus": {"COMPLETED": 0},
              "latency": {"p50": None, "p95": None, "max": None, "count": 0, "recent": []}},
    )  # fmt: skip
    dashboard.wait_for_timeout(500)
    assert completed.text_content() == "1"  # read once: nothing else can answer now


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
