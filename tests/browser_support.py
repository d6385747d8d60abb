"""Headless Chromium (Debian's `chromium` and `chromium-driver`, which `scripts/test` installs)
driven by Selenium, for the browser tests: the driver, and helpers that check each page's network
log and Content-Security-Policy reports and drive GraphiQL and the sandbox's checkout.

Every other host is unresolvable for the browser (`--host-resolver-rules`), as on a machine
without internet access.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import pytest

from graph.front_door import CHECKOUT_OPERATION

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
RESPONSE_TEXT = (
    "var e = document.querySelector('.graphiql-response .CodeMirror');"
    "return e ? e.CodeMirror.getValue() : '';"
)


def browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing (scripts/test installs chromium and chromium-driver)"
    return None


@contextmanager
def chromium() -> Iterator[WebDriver]:
    """A headless Chromium that reaches 127.0.0.1 only and records CSP violations; skipped (or,
    on CI, failed) when Chromium is not installed."""
    missing = browser_missing()
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


def screenshots_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docs/ with FRONT_DOOR_SCREENSHOTS=docs (the docs show them), else a temporary folder."""
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


def pay_a_checkout(
    driver: WebDriver,
    service: str,
    user: str,
    shots: Path,
    screenshot: str = "front-door-sandbox-checkout.png",
) -> None:
    """In GraphiQL, a checkout for `user`; then its sandbox page (saved as `screenshot`), paid."""
    url = graphiql_answer(driver, service, user, CHECKOUT_OPERATION, "createCheckoutSession")[
        "createCheckoutSession"
    ]["url"]
    driver.get(url)
    pay = "form[action$='/pay'] button"
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, pay), "the pay button")
    driver.save_screenshot(str(shots / screenshot))
    assert_clean(driver, service)
    for email in driver.find_elements(By.CSS_SELECTOR, "form[action$='/pay'] input[name='email']"):
        email.send_keys(f"{user}@example.com")
    driver.find_element(By.CSS_SELECTOR, pay).click()
    wait(driver, lambda d: "/billing/success" in d.current_url, "the success URL")
