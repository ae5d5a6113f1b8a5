"""The registration detail page in Chromium: Validate → live stages → progress → banner."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import BrowserContext, expect

from regstream.core_banking.simulator.server import RunningSimulator
from tests.browser.conftest import (
    demo_ids,
    open_detail,
    process,
    registration,
    sign_in,
    stages_of,
)
from tests.conftest import SettingsFactory
from tests.support import LiveServer, serve_app

pytestmark = pytest.mark.browser

T24_PATH = [
    ("duplicate_check", "completed"),
    ("t24_lookup", "completed"),
    ("status_update", "completed"),
]
UPDATE_PATH = [
    ("duplicate_check", "completed"),
    ("update_user_info", "completed"),
    ("status_update", "completed"),
]

CASES = [
    pytest.param(
        "approved", "APPROVED", T24_PATH, ["Accounts found: 2"], True, id="approved"
    ),
    pytest.param(
        "completed_update", "COMPLETED", UPDATE_PATH,
        ["Updated fields: deviceId, email"], True, id="completed",
    ),
    pytest.param("duplicate", "DUPLICATE", UPDATE_PATH, ["Existing user: #"], True, id="duplicate"),
    pytest.param(
        "kyc_mismatch", "FAILED",
        [("duplicate_check", "completed"), ("t24_lookup", "failed"),
         ("status_update", "completed")],
        ["Error code: KYC_MISMATCH", "Mismatched fields: dateOfBirth"], False, id="failed",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("scenario", "status", "stages", "details", "final_disabled"), CASES)
def test_validate_shows_every_stage_live(
    app: LiveServer,
    context: BrowserContext,
    scenario: str,
    status: str,
    stages: list[tuple[str, str]],
    details: list[str],
    final_disabled: bool,
) -> None:
    rid = demo_ids(app)[scenario]
    sign_in(context, app, "operator")
    page = open_detail(context, app, rid)
    seen: list[list[tuple[str, str]]] = []
    page.expose_function("__stagesChanged", lambda items: seen.append([tuple(i) for i in items]))
    page.evaluate(
        """() => {
        window.__marker = 'no-reload';
        const rows = () => [...document.querySelectorAll('#stages li')]
            .map(e => [e.dataset.stage, e.dataset.state]);
        new MutationObserver(() => window.__stagesChanged(rows()))
            .observe(document.getElementById('stages'), {childList: true, subtree: true});
    }"""
    )
    button = page.get_by_role("button", name="Validate Customer")
    expect(button).to_be_enabled()
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "0")

    button.click()

    banner = page.locator("#result")
    expect(banner).to_have_attribute("data-status", status)
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    assert stages_of(page) == stages
    for text in details:
        expect(banner).to_contain_text(text)
    assert page.evaluate("window.__marker") == "no-reload"
    # The stages appeared one by one, in order: every observed list is a prefix of the final one
    # (with the last stage possibly still "started").
    names = [name for name, _ in stages]
    observed = [[name for name, _ in items] for items in seen if items]
    assert observed, "no stage was ever rendered live"
    for items in observed:
        assert items == names[: len(items)], items
    assert any(items[-1][1] == "started" for items in seen if items)
    # The page state came back from the API (seq matches the stored row).
    stored = registration(app, rid)
    expect(page.locator("#detail")).to_have_attribute("data-status", stored["status"])
    expect(page.locator("#status")).to_have_text(status)
    if final_disabled:
        expect(page.get_by_role("button", name="Validate Customer")).to_be_disabled()
    else:
        expect(page.get_by_role("button", name="Validate Customer again")).to_be_enabled()


def test_masked_applicant_data_only(app: LiveServer, context: BrowserContext) -> None:
    rid = demo_ids(app)["approved"]
    sign_in(context, app, "viewer")
    page = open_detail(context, app, rid)
    applicant = page.locator("#applicant")
    expect(applicant.locator('[data-field="phone"]')).to_have_text("+254*******01")
    expect(applicant.locator('[data-field="nationalId"]')).to_have_text("****0001")
    expect(applicant.locator('[data-field="customerNumber"]')).to_have_text("****00")
    html = page.content()
    for canary in ("+254700000001", "30000001", "demo.approved@example.test"):
        assert canary not in html


def test_opening_mid_run_shows_stages_so_far_then_continues(
    make_settings: SettingsFactory, context: BrowserContext, t24_private: RunningSimulator
) -> None:
    sim = t24_private
    httpx.post(f"{sim.control_url}/config", json={"latency_ms": 1500}, timeout=5)
    settings = make_settings(t24_base_url=sim.base_url, sse_retry_ms=1000)
    with serve_app(settings) as live:
        rid = demo_ids(live)["approved"]
        sign_in(context, live, "viewer")
        assert process(live, rid) == 202
        page = context.new_page()
        page.goto(f"{live.url}/registrations/{rid}")
        expect(page.locator('#stages li[data-stage="t24_lookup"]')).to_have_attribute(
            "data-state", "started"
        )
        assert stages_of(page)[0] == ("duplicate_check", "completed")
        expect(page.locator("#validate")).to_be_disabled()
        expect(page.locator("#result")).to_have_attribute("data-status", "APPROVED", timeout=20_000)
        assert stages_of(page) == T24_PATH
        expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
