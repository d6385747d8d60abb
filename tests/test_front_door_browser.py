"""The front door in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
which `scripts/test` installs) driven by Selenium, against `billing serve` as `scripts/dev` runs
it (tests/front_door_server.py).

Every other host is unresolvable for the browser (`--host-resolver-rules`), as on a machine
without internet access; each page's network log must show requests to the service's own origin
only (and `data:` URLs), and neither the console nor a `securitypolicyviolation` listener may
report a Content-Security-Policy violation.

Screenshots go to the test's temporary folder; with `FRONT_DOOR_SCREENSHOTS=docs` they replace
the ones in docs/ (docs/front-door.md shows them).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import pytest

from graph.front_door import CHECKOUT_OPERATION, LIVE_OPERATION
from tests.front_door_server import dev_service

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service as ChromeService  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DOCS = Path(__file__).resolve().parent.parent / "docs"
WAIT_SECONDS = 30
T = TypeVar("T")

# Injected before any page script (CDP scripts are not subject to the page's CSP).
RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI);
});
"""
PORTAL_OPERATION = "mutation Portal { createPortalSession { url } }"
INVOICES_OPERATION = "query Invoices { viewer { invoices { id status hostedInvoiceUrl } } }"
RESPONSE_TEXT = (
    "var e = document.querySelector('.graphiql-response .CodeMirror');"
    "return e ? e.CodeMirror.getValue() : '';"
)


def _browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing (scripts/test installs chromium and chromium-driver)"
    return None


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with dev_service(tmp_path_factory.mktemp("front-door-browser")) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    missing = _browser_missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        # No network beyond the loopback address: every other host name is unresolvable.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=ChromeService(CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_VIOLATIONS})
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("FRONT_DOOR_SCREENSHOTS") == "docs":
        return DOCS
    return tmp_path_factory.mktemp("screenshots")


def wait(driver: WebDriver, check: Callable[[WebDriver], T], what: str) -> T:
    result: T = WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.2).until(check, message=what)
    return result


def drain_logs(driver: WebDriver) -> None:
    driver.get_log("browser")
    driver.get_log("performance")


def assert_clean(driver: WebDriver, service: str) -> list[str]:
    """Since the last drain: only the service's own origin was asked for, every HTML page came
    with a Content-Security-Policy, and no violation of one was reported (console or listener).
    Returns the URLs requested."""
    origin = urlsplit(service)
    requested: list[str] = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requested.append(message["params"]["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            requested.append(message["params"]["url"])
        elif message["method"] == "Network.responseReceived":
            response = message["params"]["response"]
            if message["params"]["type"] == "Document" and response["mimeType"] == "text/html":
                headers = {name.lower() for name in response["headers"]}
                assert "content-security-policy" in headers, f"{response['url']} has no CSP"
    for url in requested:
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob"):
            continue
        assert parts.scheme in ("http", "ws") and parts.netloc == origin.netloc, f"a request to {url}"
    console = [entry["message"] for entry in driver.get_log("browser")]
    assert not [line for line in console if "Content Security Policy" in line], console
    violations = driver.execute_script("return window.__cspViolations || []")
    assert violations == [], violations
    return requested


def open_graphiql(driver: WebDriver, service: str, query: str | None = None) -> None:
    url = f"{service}/graphql" + (f"?q={quote(query)}" if query else "")
    driver.get(url)
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".graphiql-query-editor .CodeMirror"), "editor")


def act_as(driver: WebDriver, user_id: str) -> None:
    field = driver.find_element(By.ID, "act-as-user")
    field.clear()
    field.send_keys(user_id)
    driver.find_element(By.ID, "act-as-button").click()
    status = driver.find_element(By.ID, "act-as-status")
    wait(driver, lambda d: f"acting as {user_id}" in status.text, "the token")
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".graphiql-execute-button"), "a fresh IDE")


def run_operation(driver: WebDriver) -> None:
    driver.find_element(By.CSS_SELECTOR, ".graphiql-execute-button").click()


def rest_the_pointer(driver: WebDriver) -> None:
    """Away from the buttons, so that no tooltip is in the screenshot."""
    ActionChains(driver).move_to_element(driver.find_element(By.CSS_SELECTOR, ".graphiql-response")).perform()


def response_text(driver: WebDriver) -> str:
    text: str = driver.execute_script(RESPONSE_TEXT)
    return text


def response_json(driver: WebDriver, needle: str) -> Any:
    text = wait(driver, lambda d: (t := response_text(d)) and needle in t and t, f"a response with {needle}")
    return json.loads(text)


def graphiql_answer(driver: WebDriver, service: str, user: str, operation: str, field: str) -> Any:
    """`operation` run in GraphiQL as `user`: the `data` of its answer, which must name `field`."""
    open_graphiql(driver, service, operation)
    act_as(driver, user)
    run_operation(driver)
    answer = response_json(driver, field)
    assert "errors" not in answer, answer
    return answer["data"]


def pay_a_checkout(driver: WebDriver, service: str, user: str, shots: Path) -> None:
    """In GraphiQL, a checkout for `user`; then its sandbox page, paid."""
    url = graphiql_answer(driver, service, user, CHECKOUT_OPERATION, "createCheckoutSession")[
        "createCheckoutSession"
    ]["url"]
    driver.get(url)
    pay = "form[action$='/pay'] button"
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, pay), "the pay button")
    driver.save_screenshot(str(shots / "front-door-sandbox-checkout.png"))
    assert_clean(driver, service)
    for email in driver.find_elements(By.CSS_SELECTOR, "form[action$='/pay'] input[name='email']"):
        email.send_keys(f"{user}@example.com")
    driver.find_element(By.CSS_SELECTOR, pay).click()
    wait(driver, lambda d: "/billing/success" in d.current_url, "the success URL")


def test_the_landing_page_links_everything_a_newcomer_needs(
    browser: WebDriver, service: str, shots: Path
) -> None:
    drain_logs(browser)
    browser.get(f"{service}/")
    links = {a.get_attribute("pathname") for a in browser.find_elements(By.CSS_SELECTOR, "a")}
    assert {"/graphql", "/docs", "/openapi.json", "/healthz", "/readyz"} <= links
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
