"""The sandbox's Checkout, subscriptions, schedules and invoices answer the real SDK as Stripe does."""

from __future__ import annotations

from typing import Any

import pytest
import stripe

from billing.stripe_gateway import StripeGateway
from stripe_sandbox import engine
from tests.conftest import Service
from tests.sandbox_objects import (
    DAY,
    advance,
    clock,
    control,
    control_ok,
    event_types,
    events,
    insert_price,
    open_session,
    subscribe,
)
from tests.stripe_shapes import missing_keys

HOUR = 3_600


async def test_a_checkout_session_is_open_with_its_url_and_success_url(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    customer = await stripe_gateway.v1.customers.create_async({"email": "a@example.com"})
    session = await open_session(stripe_gateway, price, customer_id=customer.id)

    assert session.id.startswith("cs_test_")
    assert session.status == "open"
    assert session.payment_status == "unpaid"
    assert session.subscription is None
    assert session.url == f"{service.url}/sandbox/checkout/{session.id}"
    # Kept as created, as on Stripe: the hosted page fills the id in when it redirects.
    assert session.success_url == "https://app.test/done?session={CHECKOUT_SESSION_ID}"
    assert session.amount_total == 2900
    assert missing_keys(session, "checkout.session") == []
    fetched = await stripe_gateway.v1.checkout.sessions.retrieve_async(session.id)
    assert fetched.id == session.id


async def test_checkout_validates_line_items(service: Service, stripe_gateway: StripeGateway) -> None:
    licensed = await insert_price(service, unit_amount=2900)
    metered = await insert_price(service, unit_amount=2, usage_type="metered", meter="mtr_test")
    with pytest.raises(stripe.InvalidRequestError) as missing_quantity:
        await open_session(stripe_gateway, licensed, quantity=None)
    with pytest.raises(stripe.InvalidRequestError) as metered_quantity:
        await open_session(stripe_gateway, metered, quantity=3)
    with pytest.raises(stripe.InvalidRequestError) as unknown_price:
        await open_session(stripe_gateway, "price_nope")

    assert missing_quantity.value.param == "line_items[0][quantity]"
    assert metered_quantity.value.param == "line_items[0][quantity]"
    assert unknown_price.value.http_status == 404
    assert unknown_price.value.code == "resource_missing"


async def test_paid_checkout_without_trial_creates_an_active_subscription_with_a_paid_invoice(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    customer = await stripe_gateway.v1.customers.create_async({"email": "a@example.com"})
    session = await stripe_gateway.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "customer": customer.id,
            "customer_update": {"address": "auto", "name": "auto"},
            "line_items": [{"price": price, "quantity": 1}],
            "subscription_data": {"metadata": {"userId": "u1"}},
            "allow_promotion_codes": True,
            "automatic_tax": {"enabled": True},
            "billing_address_collection": "required",
            "client_reference_id": "u1",
            "metadata": {"userId": "u1"},
            "success_url": "https://app.test/ok?cs={CHECKOUT_SESSION_ID}",
            "cancel_url": "https://app.test/cancel",
        }
    )
    before = len(await events(service))

    await control_ok(service, f"checkout/{session.id}/complete", {"outcome": "paid"})

    done = await stripe_gateway.v1.checkout.sessions.retrieve_async(session.id, {"expand": ["subscription"]})
    subscription = done.subscription
    assert isinstance(subscription, stripe.Subscription)
    assert (done.status, done.payment_status, done.client_reference_id) == ("complete", "paid", "u1")
    assert subscription.status == "active"
    assert subscription.customer == customer.id
    assert subscription.metadata.to_dict() == {"userId": "u1"}
    assert subscription.automatic_tax.enabled is True
    item = subscription["items"].data[0]
    assert item.price.id == price
    assert item.price.unit_amount == 2900
    assert item.current_period_end - item.current_period_start >= 28 * DAY
    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(subscription.latest_invoice))
    assert (invoice.status, invoice.amount_paid, invoice.amount_due, invoice.billing_reason) == (
        "paid",
        2900,
        2900,
        "subscription_create",
    )
    assert invoice.parent is not None and invoice.parent.subscription_details is not None
    assert invoice.parent.subscription_details.subscription == subscription.id
    assert invoice.hosted_invoice_url == f"{service.url}/sandbox/invoices/{invoice.id}"
    assert await event_types(service, before) == [
        "payment_method.attached",
        "customer.subscription.created",
        "invoice.created",
        "invoice.finalized",
        "invoice.paid",
        "invoice.payment_succeeded",
        "checkout.session.completed",
    ]


async def test_paid_checkout_with_a_trial_is_trialing_with_a_zero_paid_invoice(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    session = await open_session(stripe_gateway, price, trial_days=14)
    assert session.amount_total == 0

    result = await control_ok(
        service, f"checkout/{session.id}/complete", {"outcome": "paid", "email": "new@example.com"}
    )

    subscription = await stripe_gateway.v1.subscriptions.retrieve_async(result["subscription"]["id"])
    assert subscription.status == "trialing"
    assert subscription.trial_end is not None and subscription.trial_start is not None
    assert subscription.trial_end - subscription.trial_start == 14 * DAY
    assert subscription["items"].data[0].current_period_end == subscription.trial_end
    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(subscription.latest_invoice))
    assert (invoice.status, invoice.total, invoice.amount_paid) == ("paid", 0, 0)
    assert invoice.lines.data[0].description == "Trial period for Pro"
    session_after = await stripe_gateway.v1.checkout.sessions.retrieve_async(session.id)
    assert session_after.payment_status == "no_payment_required"
    customer = await stripe_gateway.v1.customers.retrieve_async(str(subscription.customer))
    assert customer.email == "new@example.com"
    types = await event_types(service)
    assert types[0] == "customer.created"
    assert "customer.subscription.trial_will_end" not in types


async def test_a_declined_checkout_stays_open_and_emits_nothing(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    session = await open_session(stripe_gateway, price)
    before = len(await events(service))

    result = await control_ok(service, f"checkout/{session.id}/complete", {"outcome": "declined"})

    assert result["outcome"] == "declined"
    fetched = await stripe_gateway.v1.checkout.sessions.retrieve_async(session.id)
    assert (fetched.status, fetched.subscription) == ("open", None)
    assert await event_types(service, before) == []
    assert (await stripe_gateway.v1.subscriptions.list_async({"status": "all"})).data == []


async def test_sessions_list_by_customer_and_status_and_expire(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    customer = await stripe_gateway.v1.customers.create_async({})
    mine = await open_session(stripe_gateway, price, customer_id=customer.id)
    await open_session(stripe_gateway, price)

    expired = await stripe_gateway.v1.checkout.sessions.expire_async(mine.id)
    with pytest.raises(stripe.InvalidRequestError):
        await stripe_gateway.v1.checkout.sessions.expire_async(mine.id)
    completing = await control(service, f"checkout/{mine.id}/complete", {"outcome": "paid"})

    assert expired.status == "expired"
    assert completing.status_code == 400
    by_customer = await stripe_gateway.v1.checkout.sessions.list_async({"customer": customer.id})
    still_open = await stripe_gateway.v1.checkout.sessions.list_async({"status": "open"})
    assert [s.id for s in by_customer.data] == [mine.id]
    assert mine.id not in [s.id for s in still_open.data] and len(still_open.data) == 1
    assert "checkout.session.expired" in await event_types(service)


async def test_an_open_session_expires_after_24_hours_of_sandbox_time(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    session = await open_session(stripe_gateway, price)

    summary = await advance(service, DAY + 60)

    fetched = await stripe_gateway.v1.checkout.sessions.retrieve_async(session.id)
    assert fetched.status == "expired"
    assert [e["type"] for e in summary["events"]] == ["checkout.session.expired"]


async def test_shapes_match_stripes_examples(service: Service, stripe_gateway: StripeGateway) -> None:
    price = await insert_price(service, unit_amount=2900)
    _customer, subscription_id = await subscribe(service, stripe_gateway, price)
    subscription = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(subscription.latest_invoice))
    schedule = await stripe_gateway.v1.subscription_schedules.create_async(
        {"from_subscription": subscription_id}
    )

    assert missing_keys(subscription, "subscription") == []
    assert missing_keys(subscription["items"].data[0], "subscription_item") == []
    assert missing_keys(invoice, "invoice") == []
    assert missing_keys(invoice.lines.data[0], "line_item") == []
    assert missing_keys(schedule, "subscription_schedule") == []
    assert "current_period_end" not in subscription.to_dict()  # on items since 2025-03-31.basil


async def test_subscriptions_list_by_customer_status_and_price(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    pro = await insert_price(service, unit_amount=2900)
    team = await insert_price(service, unit_amount=9900, product_name="Team")
    customer_a, sub_a = await subscribe(service, stripe_gateway, pro)
    _customer_b, sub_b = await subscribe(service, stripe_gateway, team)
    await stripe_gateway.v1.subscriptions.cancel_async(sub_b)

    by_customer = await stripe_gateway.v1.subscriptions.list_async({"customer": customer_a})
    default = await stripe_gateway.v1.subscriptions.list_async()
    everything = await stripe_gateway.v1.subscriptions.list_async({"status": "all"})
    by_price = await stripe_gateway.v1.subscriptions.list_async({"price": team, "status": "all"})
    canceled = await stripe_gateway.v1.subscriptions.list_async({"status": "canceled"})

    assert [s.id for s in by_customer.data] == [sub_a]
    assert [s.id for s in default.data] == [sub_a]
    assert [s.id for s in everything.data] == [sub_b, sub_a]
    assert [s.id for s in by_price.data] == [sub_b]
    assert [s.id for s in canceled.data] == [sub_b]


async def test_cancel_now_ends_the_subscription_with_a_deleted_event(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    _customer, subscription_id = await subscribe(service, stripe_gateway, price)
    before = len(await events(service))

    canceled = await stripe_gateway.v1.subscriptions.cancel_async(
        subscription_id, {"cancellation_details": {"feedback": "too_expensive"}}
    )

    assert canceled.status == "canceled"
    assert canceled.ended_at is not None and canceled.canceled_at == canceled.ended_at
    assert canceled.cancellation_details is not None
    assert canceled.cancellation_details.reason == "cancellation_requested"
    assert canceled.cancellation_details.feedback == "too_expensive"
    assert await event_types(service, before) == ["customer.subscription.deleted"]
    with pytest.raises(stripe.InvalidRequestError):
        await stripe_gateway.v1.subscriptions.update_async(subscription_id, {"items": [{"price": price}]})


async def test_cancel_at_period_end_is_an_update_with_previous_attributes(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    _customer, subscription_id = await subscribe(service, stripe_gateway, price)

    updated = await stripe_gateway.v1.subscriptions.update_async(
        subscription_id, {"cancel_at_period_end": True}
    )

    period_end = updated["items"].data[0].current_period_end
    assert (updated.status, updated.cancel_at_period_end, updated.cancel_at) == ("active", True, period_end)
    last = (await events(service))[-1]
    assert last["type"] == "customer.subscription.updated"
    assert last["data"]["previous_attributes"]["cancel_at_period_end"] is False
    assert last["data"]["previous_attributes"]["cancel_at"] is None

    resumed = await stripe_gateway.v1.subscriptions.update_async(
        subscription_id, {"cancel_at_period_end": False}
    )
    assert (resumed.cancel_at_period_end, resumed.cancel_at, resumed.canceled_at) == (False, None, None)


async def test_a_scheduled_subscription_refuses_cancellation_updates_and_cancel_cancels_the_schedule(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    _customer, subscription_id = await subscribe(service, stripe_gateway, price)
    schedule = await stripe_gateway.v1.subscription_schedules.create_async(
        {"from_subscription": subscription_id}
    )

    with pytest.raises(stripe.InvalidRequestError) as refused:
        await stripe_gateway.v1.subscriptions.update_async(subscription_id, {"cancel_at_period_end": True})
    await stripe_gateway.v1.subscriptions.cancel_async(subscription_id)

    assert "managed by the subscription schedule" in str(refused.value.user_message)
    after = await stripe_gateway.v1.subscription_schedules.retrieve_async(schedule.id)
    assert after.status == "canceled"
    assert "subscription_schedule.canceled" in await event_types(service)


async def test_invoices_list_by_customer_subscription_and_status(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    customer_a, sub_a = await subscribe(service, stripe_gateway, price)
    _customer_b, _sub_b = await subscribe(service, stripe_gateway, price)

    by_customer = await stripe_gateway.v1.invoices.list_async({"customer": customer_a})
    by_subscription = await stripe_gateway.v1.invoices.list_async({"subscription": sub_a})
    paid = await stripe_gateway.v1.invoices.list_async({"status": "paid"})
    drafts = await stripe_gateway.v1.invoices.list_async({"status": "draft"})

    assert len(by_customer.data) == 1 and by_customer.data[0].customer == customer_a
    assert [i.id for i in by_subscription.data] == [i.id for i in by_customer.data]
    assert len(paid.data) == 2
    assert drafts.data == []


async def test_resume_answers_400_for_a_subscription_that_is_not_paused(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    _customer, subscription_id = await subscribe(service, stripe_gateway, price)

    with pytest.raises(stripe.InvalidRequestError) as caught:
        await stripe_gateway.v1.subscriptions.resume_async(subscription_id)

    assert caught.value.http_status == 400


async def test_a_paused_subscription_resumes_with_a_new_period_and_a_paid_invoice(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    _customer, subscription_id = await subscribe(service, stripe_gateway, price)
    store = service.app.state.sandbox.store
    async with store.transaction() as tx:  # as after a trial that ended without a card
        paused = await tx.get("subscription", subscription_id)
        paused["status"] = "paused"
        await tx.save(paused)
    await advance(service, 40 * DAY)

    resumed = await stripe_gateway.v1.subscriptions.resume_async(subscription_id)

    now = (await advance(service, 0))["now"]
    item = resumed["items"].data[0]
    assert resumed.status == "active"
    assert abs(item.current_period_start - now) < 5
    assert resumed.billing_cycle_anchor == item.current_period_start
    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(resumed.latest_invoice))
    assert (invoice.status, invoice.amount_paid) == ("paid", 2900)
    assert "customer.subscription.resumed" in await event_types(service)


# Billing mode and mixed intervals -------------------------------------------------------------


def priced_lines(invoice: Any) -> list[tuple[str, int]]:
    return [
        (line.pricing.price_details.price, line.amount)
        for line in invoice.lines.data
        if line.pricing is not None and line.pricing.price_details is not None
    ]


async def annual_plan_with_metered_usage(service: Service, gateway: StripeGateway) -> tuple[str, str, str]:
    """A $290/year price and a 2-cent monthly metered price on a meter; (annual, metered, event name)."""
    annual = await insert_price(service, unit_amount=29000, interval="year", product_name="Pro")
    meter = await gateway.v1.billing.meters.create_async(
        {
            "display_name": "API calls",
            "event_name": "mixed_api_calls",
            "default_aggregation": {"formula": "sum"},
        }
    )
    metered = await insert_price(
        service, unit_amount=2, usage_type="metered", meter=meter.id, product_name="API calls"
    )
    return annual, metered, meter.event_name


async def test_classic_billing_mode_refuses_mixed_intervals_as_stripe_does(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    annual = await insert_price(service, unit_amount=29000, interval="year")
    monthly = await insert_price(service, unit_amount=2900)
    metered = await insert_price(service, unit_amount=2, usage_type="metered", meter="mtr_test")

    with pytest.raises(stripe.InvalidRequestError) as at_checkout:
        await open_session(stripe_gateway, annual, metered=(metered,), billing_mode="classic")
    with pytest.raises(stripe.InvalidRequestError) as unknown_mode:
        await open_session(stripe_gateway, annual, billing_mode="hybrid")
    _customer, subscription_id = await subscribe(service, stripe_gateway, monthly, billing_mode="classic")
    with pytest.raises(stripe.InvalidRequestError) as on_update:
        await stripe_gateway.v1.subscriptions.update_async(subscription_id, {"items": [{"price": annual}]})

    assert (at_checkout.value.http_status, at_checkout.value.param) == (400, "line_items")
    assert "Currency and interval fields must match" in str(at_checkout.value.user_message)
    assert unknown_mode.value.param == "subscription_data[billing_mode][type]"
    assert (on_update.value.http_status, on_update.value.param) == (400, "items")
    classic = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    assert classic.billing_mode.type == "classic"
    assert [item.price.id for item in classic["items"].data] == [monthly]  # nothing changed
    # Flexible, this API version's default, takes the same prices.
    assert (await open_session(stripe_gateway, annual, metered=(metered,))).status == "open"
    # A classic subscription mixes intervals once migrated to flexible (there is no way back).
    migrated = await stripe_gateway.v1.subscriptions.migrate_async(
        subscription_id, {"billing_mode": {"type": "flexible"}}
    )
    assert migrated.billing_mode.type == "flexible"
    mixed = await stripe_gateway.v1.subscriptions.update_async(
        subscription_id, {"items": [{"price": annual}], "proration_behavior": "none"}
    )
    periods = {item.price.id: item.current_period_end for item in mixed["items"].data}
    anchor = mixed.billing_cycle_anchor
    assert periods == {
        monthly: classic["items"].data[0].current_period_end,  # the monthly item keeps its period
        annual: engine.add_intervals(anchor, "year", 1, 1),  # the new one gets its own, on the anchor
    }


async def test_a_flexible_subscription_bills_the_annual_plan_yearly_and_metered_usage_monthly(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    annual, metered, event_name = await annual_plan_with_metered_usage(service, stripe_gateway)
    customer_id, subscription_id = await subscribe(service, stripe_gateway, annual, metered=(metered,))

    async def use(value: int) -> None:
        await stripe_gateway.v1.billing.meter_events.create_async(
            {
                "event_name": event_name,
                "payload": {"stripe_customer_id": customer_id, "value": str(value)},
                "timestamp": await clock(service) - 60,
            }
        )

    async def cycle_invoices() -> list[Any]:
        found = await stripe_gateway.v1.invoices.list_async({"subscription": subscription_id, "limit": 100})
        return sorted(
            (invoice for invoice in found.data if invoice.billing_reason == "subscription_cycle"),
            key=lambda invoice: invoice.created,
        )

    async def periods() -> dict[str, tuple[int, int]]:
        subscription = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
        return {
            item.price.id: (item.current_period_start, item.current_period_end)
            for item in subscription["items"].data
        }

    subscription = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    start = subscription.billing_cycle_anchor
    month_end = engine.add_intervals(start, "month", 1, 1)
    year_end = engine.add_intervals(start, "year", 1, 1)
    assert subscription.billing_mode.type == "flexible"
    assert await periods() == {annual: (start, year_end), metered: (start, month_end)}
    first = await stripe_gateway.v1.invoices.retrieve_async(str(subscription.latest_invoice))
    assert priced_lines(first) == [(annual, 29000)]  # usage is billed in arrears

    await advance(service, DAY)
    await use(1500)
    preview = await stripe_gateway.v1.invoices.create_preview_async({"subscription": subscription_id})
    # The next invoice is this month's usage; the plan renews in a year.
    assert priced_lines(preview) == [(metered, 3000)]
    assert (preview.period_start, preview.period_end, preview.total) == (start, month_end, 3000)

    await advance(service, month_end + HOUR + 60 - await clock(service))  # charged an hour after the month
    (monthly,) = await cycle_invoices()
    assert priced_lines(monthly) == [(metered, 3000)]  # the annual plan is not billed again
    assert (monthly.status, monthly.amount_paid) == ("paid", 3000)
    assert (monthly.period_start, monthly.period_end) == (start, month_end)
    second_month_end = engine.add_intervals(start, "month", 1, 2)
    assert await periods() == {annual: (start, year_end), metered: (month_end, second_month_end)}

    await use(500)
    preview = await stripe_gateway.v1.invoices.create_preview_async({"subscription": subscription_id})
    assert priced_lines(preview) == [(metered, 1000)]

    await advance(service, year_end + HOUR + 60 - await clock(service))
    invoices = await cycle_invoices()
    assert len(invoices) == 12  # one a month; the twelfth renews the plan as well
    assert [priced_lines(invoice) for invoice in invoices[1:11]] == [[(metered, 1000)]] + [[(metered, 0)]] * 9
    assert priced_lines(invoices[-1]) == [(metered, 0), (annual, 29000)]
    assert (invoices[-1].status, invoices[-1].amount_paid) == ("paid", 29000)
    next_year_end = engine.add_intervals(start, "year", 1, 2)
    after_year = engine.add_intervals(start, "month", 1, 13)
    assert await periods() == {annual: (year_end, next_year_end), metered: (year_end, after_year)}


async def test_cancel_at_period_end_of_a_mixed_interval_subscription_is_the_earliest_item_period_end(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    annual, metered, _event_name = await annual_plan_with_metered_usage(service, stripe_gateway)
    _customer, subscription_id = await subscribe(service, stripe_gateway, annual, metered=(metered,))
    start = (await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)).billing_cycle_anchor

    at_period_end = await stripe_gateway.v1.subscriptions.update_async(
        subscription_id, {"cancel_at_period_end": True}
    )
    at_max = await stripe_gateway.v1.subscriptions.update_async(
        subscription_id, {"cancel_at": "max_period_end"}
    )

    # As Stripe documents for mixed intervals: the earliest item period end (the month's).
    assert (at_period_end.cancel_at, at_period_end.cancel_at_period_end) == (
        engine.add_intervals(start, "month", 1, 1),
        True,
    )
    assert (at_max.cancel_at, at_max.cancel_at_period_end) == (
        engine.add_intervals(start, "year", 1, 1),
        False,
    )
