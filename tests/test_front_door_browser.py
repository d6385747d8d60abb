"""The front door in a real browser: headless Chromium driven by Selenium (tests/browser_support.py),
against `billing serve` as `scripts/dev` runs it (tests/front_door_server.py).

Each page's network log must show requests to the service's own origin only (and `data:` URLs),
and neither the console nor a `securitypolicyviolation` listener may report a
Content-Security-Policy violation.

Screenshots go to the test's temporary folder; with `FRONT_DOOR_SCREENSHOTS=docs` they replace
the ones in docs/ (docs/front-door.md shows them).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from graph.front_door import LIVE_OPERATION
from tests.browser_support import (
    PORTAL_OPERATION,
    By,
    WebDriver,
    act_as,
    assert_clean,
    drain_logs,
    graphiql_answer,
    open_graphiql,
    pay_a_checkout,
    response_json,
    response_text,
    rest_the_pointer,
    run_operation,
    wait,
)
from tests.front_door_server import dev_service

INVOICES_OPERATION = "query Invoices { viewer { invoices { id status hostedInvoiceUrl } } }"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with dev_service(tmp_path_factory.mktemp("front-door-browser")) as url:
        yield url


def test_the_landing_page_links_everything_a_newcomer_needs(
    browser: WebDriver, service: str, shots: Path
) -> None:
    drain_logs(browser)
    browser.get(f"{service}/")
    links = {a.get_attribute("pathname") for a in browser.find_elements(By.CSS_SELECTOR, "a")}
    assert {"/graphql", "/docs", "/openapi.json", "/admin", "/healthz", "/readyz", "/sandbox/"} <= links
    assert "Next steps" in browser.find_element(By.TAG_NAME, "body").text
    browser.save_screenshot(str(shots / "front-door-landing.png"))
    assert_clean(browser, service)


def test_graphiql_renders_its_editor_from_the_service_alone(browser: WebDriver, service: str) -> None:
    drain_logs(browser)
    open_graphiql(browser, service)
    editor = browser.execute_script(
        "return document.querySelector('.graphiql-query-editor .CodeMirror').CodeMirror.getValue()"
    )
    assert "viewer" in editor and "plans" in editor  # the example operation
    requested = assert_clean(browser, service)
    assert any(url.endswith("/static/vendor/graphiql/graphiql.min.js") for url in requested)


def test_graphiql_opens_signed_in_as_the_default_test_user(browser: WebDriver, service: str) -> None:
    drain_logs(browser)
    open_graphiql(browser, service)
    status = browser.find_element(By.ID, "act-as-status")
    wait(browser, lambda d: "acting as demo_user" in status.text, "the automatic token")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".graphiql-execute-button"), "a fresh IDE")
    run_operation(browser)  # nothing clicked but the play button
    answer = response_json(browser, "demo_user")
    assert "errors" not in answer, answer
    assert answer["data"]["viewer"]["id"] == "demo_user"
    assert_clean(browser, service)


def test_act_as_a_test_user_then_the_example_shows_the_viewer(
    browser: WebDriver, service: str, shots: Path
) -> None:
    drain_logs(browser)
    open_graphiql(browser, service)
    act_as(browser, "demo_user")
    run_operation(browser)
    answer = response_json(browser, "demo_user")
    assert "errors" not in answer, answer
    data = answer["data"]
    assert data["viewer"]["id"] == "demo_user"
    assert data["viewer"]["subscription"]["status"] == "NONE"
    assert data["access"]["allowed"] is False and len(data["plans"]) >= 4
    rest_the_pointer(browser)
    browser.save_screenshot(str(shots / "front-door-graphiql.png"))
    assert_clean(browser, service)


def test_a_subscription_in_graphiql_streams_the_checkout_that_follows(
    browser: WebDriver, service: str, shots: Path
) -> None:
    user = "live_user"
    drain_logs(browser)
    live_tab = browser.current_window_handle
    open_graphiql(browser, service, LIVE_OPERATION)
    act_as(browser, user)
    run_operation(browser)
    first = response_json(browser, "billingStateChanged")
    assert first["data"]["billingStateChanged"]["status"] == "NONE"
    assert_clean(browser, service)

    browser.switch_to.new_window("tab")  # a second tab: the checkout, as the user would
    pay_a_checkout(browser, service, user, shots)
    browser.close()

    browser.switch_to.window(live_tab)
    wait(browser, lambda d: '"TRIALING"' in response_text(d), "the live update")
    rest_the_pointer(browser)
    browser.save_screenshot(str(shots / "front-door-live-update.png"))
    assert_clean(browser, service)


def test_the_api_docs_render_the_rest_routes(browser: WebDriver, service: str, shots: Path) -> None:
    drain_logs(browser)
    browser.get(f"{service}/docs")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 10, "the operations")
    text = browser.find_element(By.ID, "swagger-ui").text
    for path in ("/webhooks/stripe", "/healthz", "/readyz", "/dev/token", "/sandbox/_control/clock/advance"):
        assert path in text, path
    browser.save_screenshot(str(shots / "front-door-api-docs.png"))
    assert_clean(browser, service)


def test_the_sandbox_portal_and_invoice_pages(browser: WebDriver, service: str, shots: Path) -> None:
    user = "portal_user"
    drain_logs(browser)
    pay_a_checkout(browser, service, user, shots)
    portal = graphiql_answer(browser, service, user, PORTAL_OPERATION, "createPortalSession")
    browser.get(portal["createPortalSession"]["url"])
    wait(browser, lambda d: "Billing portal" in d.title, "the portal page")
    browser.save_screenshot(str(shots / "front-door-sandbox-portal.png"))
    assert_clean(browser, service)

    invoice_url = None
    for _attempt in range(20):  # the trial's invoice reaches Stripe's list with the webhook
        invoices = graphiql_answer(browser, service, user, INVOICES_OPERATION, "invoices")
        urls = [i["hostedInvoiceUrl"] for i in invoices["viewer"]["invoices"] if i["hostedInvoiceUrl"]]
        if urls:
            invoice_url = urls[0]
            break
        time.sleep(0.5)
    assert invoice_url is not None, "no hosted invoice"
    browser.get(invoice_url)
    wait(browser, lambda d: "Invoice" in d.title, "the invoice page")
    browser.save_screenshot(str(shots / "front-door-sandbox-invoice.png"))
    assert_clean(browser, service)
