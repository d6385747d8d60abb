"""The sandbox's coupons, promotion codes and discounts, through the real SDK, as Stripe documents
them: a Checkout with a code, the subscription's discounts (expandable to Discount objects with
`source.coupon`), invoices net of them, and a repeating coupon's end."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import stripe

from billing.stripe_gateway import StripeGateway
from tests.conftest import Service
from tests.sandbox_objects import DAY, advance, control_ok, event_types, events, insert_price

HOUR = 3_600


async def _session(gateway: StripeGateway, price: str, **extra: Any) -> Any:
    customer = await gateway.v1.customers.create_async({"email": "d@example.com"})
    params: dict[str, Any] = {
        "mode": "subscription",
        "customer": customer.id,
        "line_items": [{"price": price, "quantity": 1}],
        "success_url": "https://app.test/done",
        **extra,
    }
    return await gateway.v1.checkout.sessions.create_async(params)  # type: ignore[arg-type]


async def test_coupons_and_promotion_codes_are_validated(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    gateway = stripe_gateway
    coupon = await gateway.v1.coupons.create_async(
        {"percent_off": 20, "duration": "repeating", "duration_in_months": 3}
    )
    assert (coupon.percent_off, coupon.duration, coupon.duration_in_months, coupon.valid) == (
        20,
        "repeating",
        3,
        True,
    )
    assert (await gateway.v1.coupons.retrieve_async(coupon.id)).id == coupon.id
    with pytest.raises(stripe.InvalidRequestError) as both:
        await gateway.v1.coupons.create_async({"percent_off": 10, "amount_off": 100, "currency": "usd"})
    with pytest.raises(stripe.InvalidRequestError) as months:
        await gateway.v1.coupons.create_async({"percent_off": 10, "duration": "repeating"})
    assert both.value.param == "percent_off" and months.value.param == "duration_in_months"

    code = await gateway.v1.promotion_codes.create_async(
        {"promotion": {"type": "coupon", "coupon": coupon.id}, "code": "SPRING20"}
    )
    assert (code.code, code.active, code.promotion.coupon, code.times_redeemed) == (
        "SPRING20",
        True,
        coupon.id,
        0,
    )
    listed = await gateway.v1.promotion_codes.list_async({"code": "SPRING20"})
    assert [found.id for found in listed.data] == [code.id]
    with pytest.raises(stripe.InvalidRequestError) as taken:
        await gateway.v1.promotion_codes.create_async(
            {"promotion": {"type": "coupon", "coupon": coupon.id}, "code": "SPRING20"}
        )
    assert taken.value.param == "code"

    price = await insert_price(service, unit_amount=2900)
    with pytest.raises(stripe.InvalidRequestError) as exclusive:
        await _session(gateway, price, allow_promotion_codes=True, discounts=[{"coupon": coupon.id}])
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        await _session(gateway, price, discounts=[{"promotion_code": "promo_nope"}])
    assert exclusive.value.param == "discounts" and unknown.value.param == "discounts[0][promotion_code]"


async def test_a_promotion_code_at_checkout_discounts_invoices_until_the_coupon_ends(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    gateway = stripe_gateway
    coupon = await gateway.v1.coupons.create_async(
        {"percent_off": 25, "duration": "repeating", "duration_in_months": 2}
    )
    code = await gateway.v1.promotion_codes.create_async(
        {"promotion": {"type": "coupon", "coupon": coupon.id}, "code": "TWOMONTHS"}
    )
    price = await insert_price(service, unit_amount=2900)
    session = await _session(gateway, price, allow_promotion_codes=True)
    # The hosted page takes the code the customer types (case-insensitive), as Stripe's does.
    async with httpx.AsyncClient() as client:
        page = await client.get(f"{service.url}/sandbox/checkout/{session.id}")
        assert 'name="promotion_code"' in page.text
        paid = await client.post(
            f"{service.url}/sandbox/checkout/{session.id}/pay", data={"promotion_code": "twomonths"}
        )
    assert paid.status_code == 303, paid.text
    session = await gateway.v1.checkout.sessions.retrieve_async(session.id)
    assert session.amount_total == 2175 and session.total_details.amount_discount == 725  # type: ignore[union-attr]
    assert session.discounts[0].promotion_code == code.id  # type: ignore[index]

    subscription_id = str(session.subscription)
    listed = await gateway.v1.subscriptions.list_async(
        {"customer": str(session.customer), "expand": ["data.discounts.source.coupon"]}
    )
    (subscription,) = listed.data
    (discount,) = subscription.discounts
    assert not isinstance(discount, str)
    assert discount.source.coupon.percent_off == 25  # type: ignore[union-attr]
    assert discount.promotion_code == code.id and discount.start == subscription.start_date
    assert discount.end is not None and discount.end > discount.start + 58 * DAY
    first = await gateway.v1.invoices.retrieve_async(str(subscription.latest_invoice))
    assert (first.subtotal, first.total, first.amount_paid) == (2900, 2175, 2175)
    assert [(found.amount, found.discount) for found in first.total_discount_amounts or []] == [
        (725, discount.id)
    ]
    assert first.lines.data[0].discount_amounts[0].amount == 725  # type: ignore[index]
    assert (await gateway.v1.coupons.retrieve_async(coupon.id)).times_redeemed == 1
    assert (await gateway.v1.promotion_codes.retrieve_async(code.id)).times_redeemed == 1

    async def renew() -> Any:
        current = await gateway.v1.subscriptions.retrieve_async(subscription_id)
        end = int(current["items"].data[0].current_period_end)
        now = int((await advance(service, 0))["now"])
        await advance(service, end - now + HOUR + 60)
        current = await gateway.v1.subscriptions.retrieve_async(subscription_id)
        return current, await gateway.v1.invoices.retrieve_async(str(current.latest_invoice))

    _, second = await renew()
    assert (second.total, second.amount_paid) == (2175, 2175)
    since = len(await events(service))
    after_end, third = await renew()  # made at the discount's end: no longer discounted
    assert (third.total, third.amount_paid, third.total_discount_amounts) == (2900, 2900, [])
    assert after_end.discounts == []
    assert "customer.discount.deleted" in await event_types(service, since)


async def test_a_once_coupon_discounts_the_first_paid_invoice_only(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    gateway = stripe_gateway
    coupon = await gateway.v1.coupons.create_async({"amount_off": 500, "currency": "usd", "duration": "once"})
    price = await insert_price(service, unit_amount=2900)
    session = await _session(gateway, price, discounts=[{"coupon": coupon.id}])
    await control_ok(service, f"checkout/{session.id}/complete", {"outcome": "paid"})
    session = await gateway.v1.checkout.sessions.retrieve_async(session.id)
    subscription = await gateway.v1.subscriptions.retrieve_async(str(session.subscription))
    first = await gateway.v1.invoices.retrieve_async(str(subscription.latest_invoice))
    assert (first.total, first.amount_paid) == (2400, 2400)
    await advance(
        service,
        int(subscription["items"].data[0].current_period_end)
        - int((await advance(service, 0))["now"])
        + HOUR
        + 60,
    )
    subscription = await gateway.v1.subscriptions.retrieve_async(subscription.id)
    second = await gateway.v1.invoices.retrieve_async(str(subscription.latest_invoice))
    assert second.total == 2900 and subscription.discounts == []


def _declared(cls: type) -> set[str]:
    """The attributes the SDK's class of this API version declares (Stripe's full object)."""
    return {name for name in cls.__annotations__ if not name.isupper() and name != "OBJECT_NAME"}


async def test_coupons_codes_and_discounts_have_every_field_the_sdk_declares(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    gateway = stripe_gateway
    coupon = await gateway.v1.coupons.create_async({"percent_off": 10, "duration": "forever"})
    code = await gateway.v1.promotion_codes.create_async(
        {"promotion": {"type": "coupon", "coupon": coupon.id}}
    )
    price = await insert_price(service, unit_amount=2900)
    session = await _session(gateway, price, discounts=[{"promotion_code": code.id}])
    await control_ok(service, f"checkout/{session.id}/complete", {"outcome": "paid"})
    session = await gateway.v1.checkout.sessions.retrieve_async(session.id)
    subscription = await gateway.v1.subscriptions.retrieve_async(
        str(session.subscription), {"expand": ["discounts"]}
    )
    (discount,) = subscription.discounts
    # `applies_to` and `currency_options` are includable only (sent when expanded); `deleted` only
    # on a deleted object.
    assert _declared(stripe.Coupon) - {"deleted", "applies_to", "currency_options"} <= set(coupon.to_dict())
    assert _declared(stripe.PromotionCode) <= set(code.to_dict())
    assert _declared(stripe.Discount) - {"deleted"} <= set(discount.to_dict())  # type: ignore[union-attr]
    assert discount.source.coupon == coupon.id and code.code  # type: ignore[union-attr]
