"""The admin console in a real browser: headless Chromium (tests/browser_support.py) against
`billing serve` as `scripts/dev` runs it, with `ADMIN_USER_IDS` naming one operator.

A customer subscribes through GraphQL and the sandbox's checkout page, then the operator signs in
with "act as a test user", reads the same MRR as `billingMetrics`, finds the account by email,
syncs it, and replays a failed event by clicking. A non-operator sees no figure on any page; a
POST without its anti-forgery token changes nothing; no page asks another origin for anything.

Screenshots go to the test's temporary folder; with `FRONT_DOOR_SCREENSHOTS=docs` they replace
the ones in docs/ (docs/operations.md shows them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select

from billing.revenue import MetricsInterval, bucket_start
from db.engine import Database
from db.models import account_table, event_table
from tests.browser_support import By, WebDriver, assert_clean, drain_logs, wait
from tests.front_door_server import SANDBOX_KEY, dev_service

OPERATOR = "ops_admin"
PAYER = "console_payer"
PAYER_EMAIL = "console.payer@example.com"
PAGES = ["/admin", "/admin/accounts", f"/admin/accounts/{PAYER}", "/admin/operations"]
FIGURES = ("MRR now", "ARR now", "Subscribers by status", "Ledger", "Stripe events", "USD")
METRICS = "query($from: DateTime!, $to: DateTime!) { billingMetrics(from: $from, to: $to) { mrr arr } }"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    folder = tmp_path_factory.mktemp("admin-console-browser")
    with dev_service(folder, ADMIN_USER_IDS=OPERATOR) as url:
        yield url, f"sqlite+aiosqlite:///{folder / 'billing.db'}"


@pytest.fixture(scope="module")
def service(served: tuple[str, str]) -> str:
    return served[0]


def eventually(check: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"never: {what}")


def token(service: str, user: str, email: str | None = None) -> str:
    body: dict[str, Any] = {"userId": user, **({"email": email} if email else {})}
    found: str = httpx.post(f"{service}/dev/token", json=body, timeout=10).json()["token"]
    return found


def graphql(service: str, bearer: str, query: str, variables: dict[str, Any] | None = None) -> Any:
    answer = httpx.post(
        f"{service}/graphql",
        json={"query": query, "variables": variables or {}},
        headers={"Authorization": f"Bearer {bearer}"},
        timeout=30,
    ).json()
    assert "errors" not in answer, answer
    return answer["data"]


def in_database(url: str, work: Callable[[Database], Any]) -> Any:
    async def run() -> Any:
        database = Database.from_url(url)
        try:
            return await work(database)
        finally:
            await database.dispose()

    return asyncio.run(run())


def account_row(url: str, user: str) -> Any:
    async def read(database: Database) -> Any:
        async with database.read() as conn:
            query = select(account_table).where(account_table.c.user_id == user)
            return (await conn.execute(query)).mappings().first()

    return in_database(url, read)


def event_row(url: str, event_id: str) -> Any:
    async def read(database: Database) -> Any:
        async with database.read() as conn:
            query = select(event_table.c.status, event_table.c.attempts).where(event_table.c.id == event_id)
            return (await conn.execute(query)).one()

    return in_database(url, read)


def failed_event(url: str, event_id: str, event_type: str, obj: dict[str, Any]) -> None:
    """A Stripe event that failed for good in the inbox, as the worker leaves one after its retries."""
    now = datetime.now(UTC)
    payload = {"id": event_id, "object": "event", "type": event_type, "created": int(now.timestamp())}

    async def write(database: Database) -> None:
        async with database.write() as conn:
            await conn.execute(
                insert(event_table).values(
                    id=event_id,
                    type=event_type,
                    stripe_created=now,
                    received_at=now,
                    status="failed",
                    attempts=8,
                    last_error="Stripe unavailable: connection reset (after 8 attempts)",
                    payload={**payload, "data": {"object": obj}},
                )
            )

    in_database(url, write)


def sign_in_as(browser: WebDriver, service: str, user: str) -> None:
    browser.delete_all_cookies()
    browser.get(f"{service}/admin/sign-in")
    field = browser.find_element(By.ID, "act-as-user")
    field.send_keys(user)
    browser.find_element(By.ID, "act-as-button").click()
    wait(
        browser,
        lambda d: "/admin/sign-in" not in d.current_url or d.find_elements(By.CSS_SELECTOR, ".error"),
        "an answer",
    )


def page_text(browser: WebDriver) -> str:
    text: str = browser.find_element(By.TAG_NAME, "body").text
    return text


def test_a_non_operator_is_refused_on_every_page(browser: WebDriver, service: str) -> None:
    drain_logs(browser)
    sign_in_as(browser, service, "plain_user")
    assert "plain_user is not an operator" in page_text(browser)
    assert not [c for c in browser.get_cookies() if c["name"] == "billing_admin"]
    for path in PAGES:
        browser.get(f"{service}{path}")
        text = page_text(browser)
        assert "Operators only" in text, path
        assert not [figure for figure in FIGURES if figure in text], path
        assert not browser.find_elements(By.CSS_SELECTOR, "img.chart"), path
    assert_clean(browser, service)


def test_the_operator_signs_in_and_the_overview_mrr_is_billing_metrics(
    browser: WebDriver, service: str, served: tuple[str, str], shots: Path
) -> None:
    database_url = served[1]
    # A customer pays a Pro checkout (with the sandbox's trial), and the trial is ended at Stripe.
    payer = token(service, PAYER, PAYER_EMAIL)
    checkout = graphql(
        service, payer, "mutation { createCheckoutSession(tier: PRO, interval: MONTHLY) { url } }"
    )
    browser.get(checkout["createCheckoutSession"]["url"])
    pay = "form[action$='/pay'] button"
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, pay), "the pay button")
    browser.find_element(By.CSS_SELECTOR, pay).click()
    wait(browser, lambda d: "/billing/success" in d.current_url, "the success URL")
    eventually(lambda: (account_row(database_url, PAYER) or {}).get("status") == "trialing", "trialing")
    subscription = account_row(database_url, PAYER)["stripe_subscription_id"]
    ended = httpx.post(
        f"{service}/sandbox/v1/subscriptions/{subscription}",
        data={"trial_end": "now"},
        headers=SANDBOX_KEY,
        timeout=10,
    )
    assert ended.status_code == 200, ended.text
    operator = token(service, OPERATOR)

    def metrics() -> dict[str, int]:
        now = datetime.now(UTC)
        start = bucket_start(now - timedelta(days=90), MetricsInterval.DAY)
        found: dict[str, int] = graphql(
            service, operator, METRICS, {"from": start.isoformat(), "to": now.isoformat()}
        )["billingMetrics"]
        return found

    eventually(lambda: metrics()["mrr"] > 0, "the paying customer's MRR")

    drain_logs(browser)
    sign_in_as(browser, service, OPERATOR)
    assert browser.current_url == f"{service}/admin"
    session = next(c for c in browser.get_cookies() if c["name"] == "billing_admin")
    assert session["httpOnly"] and session["sameSite"] == "Strict" and session["path"] == "/admin"
    numbers = metrics()
    assert browser.find_element(By.ID, "mrr").text == f"{numbers['mrr'] / 100:,.2f} USD"
    assert browser.find_element(By.ID, "arr").text == f"{numbers['arr'] / 100:,.2f} USD"
    charts = browser.find_elements(By.CSS_SELECTOR, "img.chart")
    assert len(charts) == 2
    for chart in charts:  # drawn: the SVG loaded and has a size
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", chart) > 0
    assert (
        "active"
        in browser.find_element(By.XPATH, "//h2[contains(., 'Subscribers')]/following-sibling::table[1]").text
    )
    browser.save_screenshot(str(shots / "admin-overview.png"))
    requested = assert_clean(browser, service)
    assert any(url.endswith("/admin/charts/mrr.svg") for url in requested)


def test_find_an_account_by_email_and_see_its_ledger_then_sync_it(
    browser: WebDriver, service: str, shots: Path
) -> None:
    drain_logs(browser)
    browser.get(f"{service}/admin/accounts")
    browser.find_element(By.ID, "q").send_keys(PAYER_EMAIL.upper())
    browser.find_element(By.ID, "search-button").click()
    wait(browser, lambda d: d.current_url.endswith(f"/admin/accounts/{PAYER}"), "the account page")
    assert browser.find_element(By.ID, "account-status").text == "active"
    ledger = browser.find_element(By.CSS_SELECTOR, "table.ledger").text
    assert '"trialing" → "active"' in ledger and "customer.subscription" in ledger
    events = browser.find_element(By.CSS_SELECTOR, "table.events").text
    assert "customer.subscription.updated" in events and "processed" in events
    browser.save_screenshot(str(shots / "admin-account.png"))
    buttons = [
        b
        for b in browser.find_elements(By.CSS_SELECTOR, "button")
        if b.text == "Sync this account from Stripe"
    ]
    buttons[0].click()
    wait(browser, lambda d: "notice=" in d.current_url, "the sync's answer")
    assert f"{PAYER} was already up to date" in browser.find_element(By.CSS_SELECTOR, ".notice").text
    assert_clean(browser, service)


def test_replay_a_failed_event_by_clicking_and_a_post_without_its_token_changes_nothing(
    browser: WebDriver, service: str, served: tuple[str, str], shots: Path
) -> None:
    database_url = served[1]
    account = account_row(database_url, PAYER)
    subscription = {
        "id": account["stripe_subscription_id"],
        "object": "subscription",
        "customer": account["stripe_customer_id"],
    }
    failed_event(database_url, "evt_console_failed", "customer.subscription.updated", subscription)
    failed_event(database_url, "evt_console_forged", "customer.subscription.updated", subscription)
    drain_logs(browser)
    browser.get(f"{service}/admin/operations")
    stuck = browser.find_element(By.CSS_SELECTOR, "table.events").text
    assert "evt_console_failed" in stuck and "connection reset" in stuck
    browser.save_screenshot(str(shots / "admin-operations.png"))

    # The anti-forgery field taken out of one form (a forged POST): refused, nothing changed.
    browser.execute_script(
        "document.querySelector(\"form[action$='/evt_console_forged/replay'] input[name=csrf_token]\").remove()"
    )
    browser.find_element(By.CSS_SELECTOR, "form[action$='/evt_console_forged/replay'] button").click()
    wait(browser, lambda d: "Operators only" in page_text(d), "the refusal")
    assert "anti-forgery token is missing" in page_text(browser)
    assert tuple(event_row(database_url, "evt_console_forged")) == ("failed", 8)

    browser.get(f"{service}/admin/operations")
    browser.find_element(By.CSS_SELECTOR, "form[action$='/evt_console_failed/replay'] button").click()
    wait(browser, lambda d: "notice=replayed" in d.current_url, "the replay's answer")
    assert "Event evt_console_failed replayed: processed." in page_text(browser)
    assert "evt_console_failed" not in browser.find_element(By.CSS_SELECTOR, "main").text.split("replayed")[1]
    assert tuple(event_row(database_url, "evt_console_failed")) == ("processed", 1)
    assert_clean(browser, service)


def test_signing_out_clears_the_session(browser: WebDriver, service: str) -> None:
    drain_logs(browser)
    browser.get(f"{service}/admin")
    browser.find_element(By.CSS_SELECTOR, "form[action$='/admin/sign-out'] button").click()
    wait(browser, lambda d: "/admin/sign-in" in d.current_url, "the sign-in page")
    assert not [c for c in browser.get_cookies() if c["name"] == "billing_admin"]
    browser.get(f"{service}/admin")
    assert "Operators only" in page_text(browser)
    assert_clean(browser, service)
