"""The sandbox's hosted pages, used as a browser uses them: GET the page, POST its forms.

Checkout, the customer portal and the hosted invoice page run the same engine functions as the
API, so the webhook path keeps `billing_account` in step with what the customer did.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from billing.stripe_gateway import StripeGateway
from tests.billing_flows import (
    advance,
    checkout,
    control,
    raw_events,
    setup_catalog,
    subscribe,
    wait_for_account,
)
from tests.conftest import Service

HOUR = 3_600
SUCCESS = "http://app.test/billing/success?session_id="


async def browser() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=30, follow_redirects=False)


def forms(page: str) -> list[str]:
    """The action of every form on the page."""
    return re.findall(r'<form[^>]*action="([^"]+)"', page)


async def clock(service: Service) -> int:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{service.url}/sandbox/_control/clock")
    return int(response.json()["now"])


async def period_end(gateway: StripeGateway, subscription_id: str) -> int:
    subscription = await gateway.v1.subscriptions.retrieve_async(subscription_id)
    return int(subscription["items"].data[0].current_period_end)


@pytest.fixture
async def prices(stripe_gateway: StripeGateway) -> dict[str, str]:
    return await setup_catalog(stripe_gateway)


# Checkout --------------------------------------------------------------------------------------


async def test_the_checkout_page_shows_the_plan_and_pay_subscribes(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    _customer, session_id = await checkout(stripe_gateway, prices, "page_u1", trial_days=14)
    session = await stripe_gateway.v1.checkout.sessions.retrieve_async(session_id)
    assert session.url == f"{service.url}/sandbox/checkout/{session_id}"

    async with await browser() as client:
        shown = await client.get(session.url)
        assert shown.status_code == 200
        assert shown.headers["content-type"].startswith("text/html")
        for text in ("Starter", "$29.00", "per month", "14-day free trial", "page_u1@example.com", "$0.00"):
            assert text in shown.text, text
        actions = forms(shown.text)
        assert actions == [f"/sandbox/checkout/{session_id}/pay", f"/sandbox/checkout/{session_id}/decline"]
        assert 'href="http://app.test/pricing"' in shown.text  # Cancel goes back to cancel_url

        paid = await client.post(f"{service.url}{actions[0]}")
        assert paid.status_code == 303
        assert paid.headers["location"] == f"{SUCCESS}{session_id}"

        completed = await stripe_gateway.v1.checkout.sessions.retrieve_async(session_id)
        assert completed.status == "complete" and completed.payment_status == "no_payment_required"
        assert isinstance(completed.subscription, str)
        subscription = await stripe_gateway.v1.subscriptions.retrieve_async(completed.subscription)
        assert subscription.status == "trialing"
        row = await wait_for_account(service.database, "page_u1", status="trialing", tier="starter")
        assert row.stripe_subscription_id == subscription.id

        again = await client.get(session.url)
        assert again.status_code == 200 and "This checkout session is complete" in again.text
        twice = await client.post(f"{service.url}{actions[0]}")
        assert twice.status_code == 409 and "can no longer be completed" in twice.text
    completions = [e for e in await raw_events(service) if e["type"] == "checkout.session.completed"]
    assert len(completions) == 1


async def test_a_declined_card_stays_on_the_page_and_a_retry_pays(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    _customer, session_id = await checkout(stripe_gateway, prices, "page_u2", trial_days=None)
    url = f"{service.url}/sandbox/checkout/{session_id}"
    before = len(await raw_events(service))

    async with await browser() as client:
        declined = await client.post(f"{url}/decline")
        assert declined.status_code == 402
        assert "Your card was declined" in declined.text
        assert "$29.00" in declined.text  # still the checkout page, ready for another try
        assert f"/sandbox/checkout/{session_id}/pay" in forms(declined.text)
        session = await stripe_gateway.v1.checkout.sessions.retrieve_async(session_id)
        assert session.status == "open" and session.subscription is None
        assert len(await raw_events(service)) == before  # nothing happened

        paid = await client.post(f"{url}/pay")
    assert paid.status_code == 303 and paid.headers["location"] == f"{SUCCESS}{session_id}"
    await wait_for_account(service.database, "page_u2", status="active", tier="starter")


async def test_a_session_without_customer_asks_for_the_email(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    session = await stripe_gateway.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "line_items": [{"price": prices["pro_annual"], "quantity": 1}],
            "success_url": "http://app.test/done?cs={CHECKOUT_SESSION_ID}",
        }
    )
    assert session.url is not None
    async with await browser() as client:
        shown = await client.get(session.url)
        assert 'name="email"' in shown.text and "Pro" in shown.text and "$990.00" in shown.text
        assert "per year" in shown.text
        paid = await client.post(f"{session.url}/pay", data={"email": "walk-in@example.com"})
    assert paid.headers["location"] == f"http://app.test/done?cs={session.id}"
    completed = await stripe_gateway.v1.checkout.sessions.retrieve_async(session.id)
    assert isinstance(completed.customer, str)
    customer = await stripe_gateway.v1.customers.retrieve_async(completed.customer)
    assert customer.email == "walk-in@example.com"


async def test_the_pages_name_the_plan_once_and_the_metered_line_by_what_it_counts(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    _customer, session_id = await checkout(
        stripe_gateway, prices, "page_names", "pro_monthly", metered=("pro_api_calls_metered",)
    )
    session = await stripe_gateway.v1.checkout.sessions.retrieve_async(session_id)
    # Stripe keeps success_url as created; the redirect fills the id in.
    assert session.success_url == SUCCESS + "{CHECKOUT_SESSION_ID}"
    async with await browser() as client:
        shown = await client.get(str(session.url))
        assert "<h1>Pro</h1>" in shown.text and "Pro, Pro" not in shown.text
        assert "API calls" in shown.text and "$0.0005 per unit" in shown.text
        assert "metered usage" not in shown.text
        assert '<link rel="icon" href="/sandbox/favicon.svg"' in shown.text
        icon = await client.get(f"{service.url}/sandbox/favicon.svg")
        assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
        paid = await client.post(f"{session.url}/pay")
        assert paid.headers["location"] == f"{SUCCESS}{session_id}"
        completed = await stripe_gateway.v1.checkout.sessions.retrieve_async(session_id)
        assert completed.success_url == SUCCESS + "{CHECKOUT_SESSION_ID}"
        assert f'href="{SUCCESS}{session_id}"' in (await client.get(str(session.url))).text
        assert isinstance(completed.customer, str)
        await stripe_gateway.v1.customers.update_async(completed.customer, {"name": ""})
        shown = await client.get(await portal(stripe_gateway, completed.customer))
    assert "<h2>Pro <span" in shown.text and "Pro + Pro" not in shown.text
    assert "API calls at $0.0005 per unit" in shown.text
    assert "<p><br>" not in shown.text and "<br></p>" not in shown.text  # no empty lines


async def test_expired_and_unknown_sessions_say_so(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    _customer, session_id = await checkout(stripe_gateway, prices, "page_u3")
    await stripe_gateway.v1.checkout.sessions.expire_async(session_id)
    url = f"{service.url}/sandbox/checkout/{session_id}"
    async with await browser() as client:
        shown = await client.get(url)
        assert shown.status_code == 410 and "This checkout session has expired" in shown.text
        assert "/pay" not in shown.text
        refused = await client.post(f"{url}/pay")
        assert refused.status_code == 409 and "expired" in refused.text
        unknown = await client.get(f"{service.url}/sandbox/checkout/cs_test_nope")
        assert unknown.status_code == 404 and "cs_test_nope" in unknown.text
    session = await stripe_gateway.v1.checkout.sessions.retrieve_async(session_id)
    assert session.status == "expired" and session.subscription is None


async def test_a_session_past_its_expiry_time_cannot_be_paid(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    _customer, session_id = await checkout(stripe_gateway, prices, "page_u4")
    url = f"{service.url}/sandbox/checkout/{session_id}"
    async with httpx.AsyncClient() as client:
        await client.post(f"{service.url}/sandbox/_control/clock/advance", json={"seconds": 25 * HOUR})
        shown = await client.get(url)
    assert shown.status_code == 410 and "expired" in shown.text


# Customer portal -------------------------------------------------------------------------------


async def portal(gateway: StripeGateway, customer_id: str, **params: Any) -> str:
    session = await gateway.v1.billing_portal.sessions.create_async(
        {"customer": customer_id, "return_url": "http://app.test/account", **params}
    )
    return str(session.url)


async def test_the_portal_cancels_resumes_and_changes_the_card(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    customer_id, subscription_id = await subscribe(
        service, stripe_gateway, prices, "page_u5", trial_days=None
    )
    await wait_for_account(service.database, "page_u5", status="active")
    end = await period_end(stripe_gateway, subscription_id)
    invoice = (await stripe_gateway.v1.invoices.list_async({"customer": customer_id})).data[0]
    url = await portal(stripe_gateway, customer_id)
    path = url.removeprefix(service.url)

    async with await browser() as client:
        shown = await client.get(url)
        assert shown.status_code == 200
        for text in ("Starter", "$29.00 per month", "active", "renews then", "http://app.test/account"):
            assert text in shown.text, text
        assert f"{invoice.number}" in shown.text and f'href="{invoice.hosted_invoice_url}"' in shown.text
        assert "Visa ending in 4242" in shown.text
        assert datetime.fromtimestamp(end, UTC).strftime("%d %b %Y") in shown.text
        cancel_action = f"{path}/subscriptions/{subscription_id}/cancel"
        assert cancel_action in forms(shown.text)

        # As on Stripe, the button asks first: a post without the confirmation changes nothing.
        asked = await client.post(f"{service.url}{cancel_action}")
        assert asked.status_code == 303 and asked.headers["location"] == cancel_action
        confirmation = await client.get(f"{service.url}{cancel_action}")
        assert "Confirm cancellation" in confirmation.text and "still available until" in confirmation.text
        assert 'name="confirm" value="true"' in confirmation.text
        assert forms(confirmation.text) == [cancel_action]
        subscription = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
        assert subscription.cancel_at_period_end is False
        canceled = await client.post(f"{service.url}{cancel_action}", data={"confirm": "true"})
        assert canceled.status_code == 303 and canceled.headers["location"] == f"{path}?notice=canceled"
        subscription = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
        assert subscription.cancel_at_period_end is True and subscription.status == "active"
        await wait_for_account(service.database, "page_u5", cancel_at_period_end=True)
        after = await client.get(f"{service.url}{canceled.headers['location']}")
        assert "will be canceled at the end of the billing period" in after.text
        assert "Cancels on" in after.text
        resume_action = f"{path}/subscriptions/{subscription_id}/resume"
        assert forms(after.text)[0] == resume_action

        resumed = await client.post(f"{service.url}{resume_action}")
        assert resumed.status_code == 303
        subscription = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
        assert subscription.cancel_at_period_end is False
        await wait_for_account(service.database, "page_u5", cancel_at_period_end=False)
        updates = [e for e in await raw_events(service) if e["type"] == "customer.subscription.updated"]
        assert [e["data"]["previous_attributes"]["cancel_at_period_end"] for e in updates[-2:]] == [
            False,
            True,
        ]
        again = await client.post(f"{service.url}{resume_action}")
        assert again.status_code == 409 and "not set to cancel" in again.text

        card = await client.post(f"{service.url}{path}/payment_method", data={"fails": "true"})
        assert card.status_code == 303 and card.headers["location"] == f"{path}?notice=card_fails"
        customer = await stripe_gateway.v1.customers.retrieve_async(customer_id)
        assert customer.invoice_settings is not None
        new_card = customer.invoice_settings.default_payment_method
        subscription = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
        assert new_card is not None and subscription.default_payment_method == new_card

        await advance(service, end - await clock(service) + HOUR)
        subscription = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
        assert subscription.status == "past_due"
        await wait_for_account(service.database, "page_u5", status="past_due")
        failed = await stripe_gateway.v1.invoices.retrieve_async(str(subscription.latest_invoice))
        assert failed.status == "open" and failed.attempt_count == 1

        # The hosted invoice page: the customer pays with a card that works.
        assert failed.hosted_invoice_url is not None
        invoice_page = await client.get(failed.hosted_invoice_url)
        assert invoice_page.status_code == 200 and "open" in invoice_page.text
        assert f"{failed.number}" in invoice_page.text and "$29.00" in invoice_page.text
        pdf = await client.get(str(failed.invoice_pdf))
        assert pdf.headers["content-type"] == "application/pdf" and pdf.content.startswith(b"%PDF-")
        assert f"{failed.number}".encode() in pdf.content
        declined = await client.post(f"{failed.hosted_invoice_url}/decline")
        assert declined.status_code == 402
        assert (await stripe_gateway.v1.invoices.retrieve_async(failed.id)).status == "open"
        paid = await client.post(f"{failed.hosted_invoice_url}/pay")
        assert paid.status_code == 303
    assert (await stripe_gateway.v1.invoices.retrieve_async(failed.id)).status == "paid"
    assert (await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)).status == "active"
    await wait_for_account(service.database, "page_u5", status="active")


async def test_a_working_card_from_the_portal_makes_the_next_renewal_succeed(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    customer_id, subscription_id = await subscribe(
        service, stripe_gateway, prices, "page_u6", trial_days=None
    )
    await control(service, f"customers/{customer_id}/payment_method", {"fails": True})
    url = await portal(stripe_gateway, customer_id)
    async with await browser() as client:
        assert "charges fail" in (await client.get(url)).text
        fixed = await client.post(f"{url}/payment_method", data={"fails": "false"})
        assert fixed.status_code == 303
        assert "charges fail" not in (await client.get(url)).text
    end = await period_end(stripe_gateway, subscription_id)
    await advance(service, end - await clock(service) + HOUR)
    subscription = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    assert subscription.status == "active"
    renewal = await stripe_gateway.v1.invoices.retrieve_async(str(subscription.latest_invoice))
    assert renewal.status == "paid" and renewal.billing_reason == "subscription_cycle"


async def test_the_portal_follows_its_configuration(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    customer_id, subscription_id = await subscribe(
        service, stripe_gateway, prices, "page_u7", trial_days=None
    )
    locked = await stripe_gateway.v1.billing_portal.configurations.create_async(
        {"features": {"invoice_history": {"enabled": False}}}
    )
    url = await portal(stripe_gateway, customer_id, configuration=locked.id)
    async with await browser() as client:
        shown = await client.get(url)
        assert shown.status_code == 200 and "Starter" in shown.text
        assert forms(shown.text) == []  # no cancel, no card update
        assert "Invoice history" not in shown.text
        refused = await client.post(f"{url}/subscriptions/{subscription_id}/cancel")
        assert refused.status_code == 403 and "not enabled" in refused.text
        refused_card = await client.post(f"{url}/payment_method", data={"fails": "true"})
        assert refused_card.status_code == 403
    subscription = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    assert subscription.cancel_at_period_end is False and subscription.status == "active"

    immediate = await stripe_gateway.v1.billing_portal.configurations.create_async(
        {
            "features": {
                "subscription_cancel": {
                    "enabled": True,
                    "mode": "immediately",
                    "cancellation_reason": {"enabled": True, "options": ["too_expensive", "other"]},
                }
            }
        }
    )
    url = await portal(stripe_gateway, customer_id, configuration=immediate.id)
    async with await browser() as client:
        shown = await client.get(url)
        assert 'value="too_expensive"' not in shown.text  # the survey is on the confirmation step
        confirmation = await client.get(f"{url}/subscriptions/{subscription_id}/cancel")
        assert 'value="too_expensive"' in confirmation.text and "It&#x27;s too expensive" in confirmation.text
        assert "canceled immediately" in confirmation.text
        other = await client.post(
            f"{url}/subscriptions/sub_not_theirs/cancel", data={"feedback": "other", "confirm": "true"}
        )
        assert other.status_code == 404
        canceled = await client.post(
            f"{url}/subscriptions/{subscription_id}/cancel",
            data={"feedback": "too_expensive", "confirm": "true"},
        )
        assert canceled.status_code == 303
        assert "No current subscription" in (await client.get(url)).text
    subscription = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    assert subscription.status == "canceled"
    assert subscription.cancellation_details is not None
    assert subscription.cancellation_details.feedback == "too_expensive"
    await wait_for_account(service.database, "page_u7", status="canceled")


async def test_what_customers_typed_is_escaped(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    name = "<script>alert('x')</script> & Co"
    customer = await stripe_gateway.v1.customers.create_async(
        {"name": name, "email": "evil@example.com", "metadata": {"userId": "page_u8"}}
    )
    session = await stripe_gateway.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "customer": customer.id,
            "line_items": [{"price": prices["starter_monthly"], "quantity": 1}],
            "success_url": "http://app.test/ok",
            "cancel_url": "javascript:alert(1)",
        }
    )
    url = await portal(stripe_gateway, customer.id)
    async with await browser() as client:
        pages = [(await client.get(str(session.url))).text, (await client.get(url)).text]
    for shown in pages:
        assert "<script>" not in shown
        assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; Co" in shown
    assert "javascript:" not in pages[0]  # a dangerous cancel_url does not become a link
