"""The sandbox seen and driven from a browser (issue 22): headless Chromium (tests/browser_support.py)
against `billing serve` as `scripts/dev` runs it. The dashboard at `/sandbox/` lists what GraphQL
made, its clock and card buttons move the sandbox and the service's viewer follows, "Resend"
delivers an event again and the service answers it as a duplicate; Checkout and the portal's
cancellation (confirmation and reason) are done by clicking.

Screenshots go to the test's temporary folder; with `FRONT_DOOR_SCREENSHOTS=docs` they replace
the ones in docs/ (docs/sandbox.md shows them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.browser_support import (
    PORTAL_OPERATION,
    By,
    WebDriver,
    assert_clean,
    drain_logs,
    graphiql_answer,
    pay_a_checkout,
    wait,
)
from tests.front_door_server import SANDBOX_KEY, dev_service

VIEWER = "query { viewer { subscription { status cancelAtPeriodEnd } } }"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with dev_service(tmp_path_factory.mktemp("sandbox-dashboard")) as url:
        yield url


def sandbox(service: str, path: str) -> Any:
    response = httpx.get(f"{service}/sandbox/v1/{path}", headers=SANDBOX_KEY, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def viewer(service: str, user: str) -> dict[str, Any]:
    token = httpx.post(f"{service}/dev/token", json={"userId": user}, timeout=10).json()["token"]
    answer = httpx.post(
        f"{service}/graphql", json={"query": VIEWER}, headers={"Authorization": f"Bearer {token}"}, timeout=10
    ).json()
    assert "errors" not in answer, answer
    subscription: dict[str, Any] = answer["data"]["viewer"]["subscription"]
    return subscription


def eventually(check: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"never: {what}")


def subscribed(browser: WebDriver, service: str, user: str, shots: Path) -> str:
    """A Pro checkout made in GraphiQL and paid by clicking; the checkout session's id."""
    pay_a_checkout(browser, service, user, shots, "sandbox-checkout.png")
    (session_id,) = parse_qs(urlsplit(browser.current_url).query)["session_id"]
    eventually(lambda: viewer(service, user)["status"] == "TRIALING", f"{user} trialing")
    return session_id


def open_dashboard(browser: WebDriver, service: str) -> None:
    browser.get(f"{service}/sandbox/")
    wait(browser, lambda d: "Sandbox dashboard" in d.title, "the dashboard")


def customer_card(browser: WebDriver, user: str) -> Any:
    for card in browser.find_elements(By.CSS_SELECTOR, ".customer"):
        if f"userId: {user}" in card.text:
            return card
    raise AssertionError(f"no customer card for {user}")


def click(browser: WebDriver, scope: Any, label: str) -> None:
    buttons = [b for b in scope.find_elements(By.CSS_SELECTOR, "button") if b.text == label]
    assert buttons, f"no button {label!r}"
    buttons[0].click()
    wait(browser, lambda d: "Sandbox dashboard" in d.title and "notice=" in d.current_url, f"after {label}")


def test_a_checkout_paid_by_clicking_keeps_its_success_url_and_shows_on_the_dashboard(
    browser: WebDriver, service: str, shots: Path
) -> None:
    user = "dash_checkout"
    drain_logs(browser)
    session_id = subscribed(browser, service, user, shots)
    assert browser.current_url.endswith(f"/billing/success?session_id={session_id}")
    session = sandbox(service, f"checkout/sessions/{session_id}")
    assert session["status"] == "complete"
    assert session["success_url"].endswith("/billing/success?session_id={CHECKOUT_SESSION_ID}")

    open_dashboard(browser, service)
    card = customer_card(browser, user)
    assert "Pro" in card.text and "trialing" in card.text and "Visa ending in 4242" in card.text
    assert f"{user}@example.com" in card.text  # typed on the checkout page, kept on the customer
    assert "API calls at $0.0005 per unit" in card.text
    assert "customer.subscription.created" in browser.find_element(By.CSS_SELECTOR, "table.events").text
    browser.save_screenshot(str(shots / "sandbox-dashboard.png"))
    assert_clean(browser, service)


def test_the_clock_and_card_buttons_drive_the_sandbox_and_the_viewer_follows(
    browser: WebDriver, service: str, shots: Path
) -> None:
    user = "dash_clock"
    drain_logs(browser)
    subscribed(browser, service, user, shots)
    open_dashboard(browser, service)

    click(browser, customer_card(browser, user), "Card fails")
    assert "charges fail" in customer_card(browser, user).text
    before = browser.find_element(By.ID, "sandbox-now").text
    click(browser, customer_card(browser, user), "To trial end")
    assert browser.find_element(By.ID, "sandbox-now").text != before
    eventually(lambda: viewer(service, user)["status"] == "ACTIVE", "active when the trial ends")
    # As on Stripe, the first invoice is a draft for an hour; then its charge fails.
    click(browser, browser, "Advance 1 day")
    eventually(lambda: viewer(service, user)["status"] == "PAST_DUE", "past due after the failed charge")
    open_dashboard(browser, service)
    assert "past due" in customer_card(browser, user).text

    click(browser, customer_card(browser, user), "Card works")
    assert "charges fail" not in customer_card(browser, user).text
    click(browser, browser, "Advance 1 week")  # the dunning retry, 3 days on, succeeds
    eventually(lambda: viewer(service, user)["status"] == "ACTIVE", "active after the retry")
    card = customer_card(browser, user)
    assert "active" in card.text and "paid" in card.text
    assert_clean(browser, service)


def test_resend_delivers_an_event_again_and_the_service_answers_duplicate(
    browser: WebDriver, service: str, shots: Path
) -> None:
    drain_logs(browser)
    subscribed(browser, service, "dash_resend", shots)
    open_dashboard(browser, service)
    rows = browser.find_elements(By.CSS_SELECTOR, "table.events tr[id]")
    row = next(r for r in rows if "customer.subscription.created" in r.text and "delivered" in r.text)
    event_id = row.get_attribute("id")
    attempts = int(row.find_elements(By.CSS_SELECTOR, "td")[3].text)
    click(browser, row, "Resend")
    row = browser.find_element(By.ID, event_id)
    cells = [cell.text for cell in row.find_elements(By.CSS_SELECTOR, "td")]
    assert int(cells[3]) == attempts + 1 and cells[4] == "200", cells
    assert '"duplicate":true' in cells[5].replace(" ", ""), cells
    browser.save_screenshot(str(shots / "sandbox-dashboard-resend.png"))
    assert_clean(browser, service)


def test_the_portal_cancels_after_a_confirmation_with_a_reason(
    browser: WebDriver, service: str, shots: Path
) -> None:
    user = "dash_portal"
    drain_logs(browser)
    subscribed(browser, service, user, shots)
    portal = graphiql_answer(browser, service, user, PORTAL_OPERATION, "createPortalSession")
    browser.get(portal["createPortalSession"]["url"])
    wait(browser, lambda d: "Billing portal" in d.title, "the portal page")
    assert "Pro + Pro" not in browser.page_source
    browser.save_screenshot(str(shots / "sandbox-portal.png"))
    browser.find_element(By.XPATH, "//button[text()='Cancel subscription']").click()
    wait(browser, lambda d: "Cancel your plan" in d.title, "the confirmation step")
    browser.find_element(By.CSS_SELECTOR, "input[name='feedback'][value='too_expensive']").click()
    browser.save_screenshot(str(shots / "sandbox-portal-cancel.png"))
    assert_clean(browser, service)
    browser.find_element(By.XPATH, "//button[text()='Confirm cancellation']").click()
    wait(browser, lambda d: "notice=canceled" in d.current_url, "the portal again")
    assert "Cancels on" in browser.find_element(By.TAG_NAME, "body").text
    eventually(lambda: viewer(service, user)["cancelAtPeriodEnd"] is True, "the viewer sees the cancellation")
    customers = sandbox(service, "customers?limit=100")["data"]
    (customer,) = [c for c in customers if c["metadata"].get("userId") == user]
    (subscription,) = sandbox(service, f"subscriptions?customer={customer['id']}")["data"]
    assert subscription["cancel_at_period_end"] is True
    assert subscription["cancellation_details"]["feedback"] == "too_expensive"
    assert_clean(browser, service)


def test_the_dashboard_refuses_forms_posted_from_elsewhere(service: str) -> None:
    with httpx.Client(base_url=service, timeout=10) as client:
        page = client.get("/sandbox/")
        assert "form-action 'self'" in page.headers["content-security-policy"]
        token = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
        now = page.text.split('id="sandbox-now">', 1)[1].split("<", 1)[0]
        advance = {"advance": "day", "csrf_token": token}
        cross_site = client.post(
            "/sandbox/dashboard/clock",
            data=advance,
            headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
        )
        assert cross_site.status_code == 403
        no_token = client.post("/sandbox/dashboard/clock", data={"advance": "day"})
        assert no_token.status_code == 403
        with httpx.Client(base_url=service, timeout=10) as stranger:  # without the cookie
            assert stranger.post("/sandbox/dashboard/clock", data=advance).status_code == 403
        assert client.get("/sandbox/").text.split('id="sandbox-now">', 1)[1].split("<", 1)[0] == now
        same_site = client.post(
            "/sandbox/dashboard/clock", data=advance, headers={"Sec-Fetch-Site": "same-origin"}
        )
        assert same_site.status_code == 303
