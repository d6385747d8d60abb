"""Plan changes are prorated to the cent, previews equal what the change then charges, and a
declined charge with `error_if_incomplete` changes nothing.

Every subscription here starts on the 5th of a 30-day month, so its first period is exactly 30
days, and changes are made at day 10 (`proration_date`), leaving 20/30 of the period:
    2900 x 20/30 = 1933.33 -> 1933     9900 x 20/30 = 6600     8700 x 20/30 = 5800
"""

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
    card_fails,
    clock,
    event_types,
    events,
    insert_price,
    move_to_thirty_day_month,
    subscribe,
)

HOUR = 3_600


async def day_ten(service: Service, gateway: StripeGateway, price: str) -> tuple[str, Any]:
    """A subscription to `price` in a 30-day period, with the clock just past its day 10."""
    await move_to_thirty_day_month(service)
    customer_id, subscription_id = await subscribe(service, gateway, price)
    item = (await gateway.v1.subscriptions.retrieve_async(subscription_id))["items"].data[0]
    assert item.current_period_end - item.current_period_start == 30 * DAY
    await advance(service, item.current_period_start + 10 * DAY + 30 - await clock(service))
    return customer_id, item


def amounts(invoice: Any) -> list[int]:
    return [line.amount for line in invoice.lines.data]


def prorations(invoice: Any) -> list[bool]:
    return [line.parent.subscription_item_details.proration for line in invoice.lines.data]


def test_proration_is_per_second_and_rounded_half_up_per_line() -> None:
    start, end = 0, 30 * DAY
    assert engine.prorated(2900, start, end, 10 * DAY) == 1933
    assert engine.prorated(9900, start, end, 10 * DAY) == 6600
    assert engine.prorated(1, 0, 2, 1) == 1
    assert engine.prorated(2900, start, end, end) == 0
    assert engine.prorated(2900, start, end, start) == 2900


async def test_an_upgrade_with_create_prorations_leaves_pending_items_for_the_next_invoice(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    pro = await insert_price(service, unit_amount=2900, product_name="Pro")
    team = await insert_price(service, unit_amount=9900, product_name="Team")
    _customer, item = await day_ten(service, stripe_gateway, pro)
    proration_date = item.current_period_start + 10 * DAY
    change: dict[str, Any] = {
        "items": [{"id": item.id, "price": team}],
        "proration_behavior": "create_prorations",
        "proration_date": proration_date,
    }
    preview = await stripe_gateway.v1.invoices.create_preview_async(
        {"subscription": item.subscription, "subscription_details": change}
    )
    before = len(await events(service))

    updated = await stripe_gateway.v1.subscriptions.update_async(item.subscription, change)

    assert updated["items"].data[0].id == item.id
    assert updated["items"].data[0].price.id == team
    assert updated["items"].data[0].current_period_end == item.current_period_end
    recent = (await events(service))[before:]
    created = [e["data"]["object"] for e in recent if e["type"] == "invoiceitem.created"]
    assert [ii["amount"] for ii in created] == [-1933, 6600]
    assert [e["type"] for e in recent][-1] == "customer.subscription.updated"
    assert "items" in recent[-1]["data"]["previous_attributes"]
    assert len((await stripe_gateway.v1.invoices.list_async({"subscription": item.subscription})).data) == 1

    assert amounts(preview) == [-1933, 6600, 9900]
    assert prorations(preview) == [True, True, False]
    assert preview.lines.data[0].description.startswith("Unused time on Pro after")
    assert preview.lines.data[1].description.startswith("Remaining time on Team after")
    assert preview.total == 14567

    await advance(service, item.current_period_end + 2 * HOUR - await clock(service))

    renewed = await stripe_gateway.v1.subscriptions.retrieve_async(item.subscription)
    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(renewed.latest_invoice))
    assert amounts(invoice) == amounts(preview)
    assert (invoice.total, invoice.amount_paid, invoice.status) == (14567, 14567, "paid")


async def test_always_invoice_bills_the_proration_now_as_previewed(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    pro = await insert_price(service, unit_amount=2900, product_name="Pro")
    team = await insert_price(service, unit_amount=9900, product_name="Team")
    _customer, item = await day_ten(service, stripe_gateway, pro)
    change: dict[str, Any] = {
        "items": [{"id": item.id, "price": team}],
        "proration_behavior": "always_invoice",
        "proration_date": item.current_period_start + 10 * DAY,
    }
    preview = await stripe_gateway.v1.invoices.create_preview_async(
        {"subscription": item.subscription, "subscription_details": change}
    )

    updated = await stripe_gateway.v1.subscriptions.update_async(item.subscription, change)

    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(updated.latest_invoice))
    assert amounts(invoice) == [-1933, 6600]
    assert prorations(invoice) == [True, True]
    assert (invoice.total, invoice.amount_paid, invoice.status) == (4667, 4667, "paid")
    assert invoice.billing_reason == "subscription_update"
    assert amounts(preview) == amounts(invoice)
    assert (preview.total, preview.amount_due) == (invoice.total, invoice.amount_due)
    assert updated["items"].data[0].current_period_end == item.current_period_end


async def test_a_quantity_change_prorates_the_difference(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    pro = await insert_price(service, unit_amount=2900, product_name="Pro")
    _customer, item = await day_ten(service, stripe_gateway, pro)

    updated = await stripe_gateway.v1.subscriptions.update_async(
        item.subscription,
        {
            "items": [{"id": item.id, "quantity": 3}],
            "proration_behavior": "always_invoice",
            "proration_date": item.current_period_start + 10 * DAY,
        },
    )

    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(updated.latest_invoice))
    assert amounts(invoice) == [-1933, 5800]
    assert invoice.lines.data[1].description.startswith("Remaining time on 3 \u00d7 Pro after")
    assert updated["items"].data[0].quantity == 3


async def test_a_monthly_to_annual_switch_resets_the_anchor_and_charges_the_year_less_the_credit(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    monthly = await insert_price(service, unit_amount=2900, product_name="Pro")
    annual = await insert_price(service, unit_amount=29000, interval="year", product_name="Pro")
    _customer, item = await day_ten(service, stripe_gateway, monthly)
    change: dict[str, Any] = {
        "items": [{"id": item.id, "price": annual}],
        "proration_behavior": "create_prorations",
        "proration_date": item.current_period_start + 10 * DAY,
    }
    preview = await stripe_gateway.v1.invoices.create_preview_async(
        {"subscription": item.subscription, "subscription_details": change}
    )

    updated = await stripe_gateway.v1.subscriptions.update_async(item.subscription, change)

    now = await clock(service)
    new_item = updated["items"].data[0]
    assert abs(updated.billing_cycle_anchor - now) < 5
    assert new_item.current_period_start == updated.billing_cycle_anchor
    assert new_item.current_period_end == engine.add_intervals(new_item.current_period_start, "year", 1, 1)
    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(updated.latest_invoice))
    assert amounts(invoice) == [-1933, 29000]
    assert prorations(invoice) == [True, False]
    assert (invoice.total, invoice.amount_paid, invoice.status) == (27067, 27067, "paid")
    assert amounts(preview) == amounts(invoice)
    assert preview.total == invoice.total


async def test_a_downgrade_billed_now_leaves_a_credit_balance_that_pays_the_next_invoice(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    pro = await insert_price(service, unit_amount=2900, product_name="Pro")
    team = await insert_price(service, unit_amount=9900, product_name="Team")
    customer_id, item = await day_ten(service, stripe_gateway, team)

    updated = await stripe_gateway.v1.subscriptions.update_async(
        item.subscription,
        {
            "items": [{"id": item.id, "price": pro}],
            "proration_behavior": "always_invoice",
            "proration_date": item.current_period_start + 10 * DAY,
        },
    )

    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(updated.latest_invoice))
    assert amounts(invoice) == [-6600, 1933]
    assert (invoice.total, invoice.amount_due, invoice.ending_balance, invoice.status) == (
        -4667,
        0,
        -4667,
        "paid",
    )
    assert (await stripe_gateway.v1.customers.retrieve_async(customer_id)).balance == -4667

    await advance(service, item.current_period_end + 2 * HOUR - await clock(service))

    renewal = await stripe_gateway.v1.invoices.retrieve_async(
        str((await stripe_gateway.v1.subscriptions.retrieve_async(item.subscription)).latest_invoice)
    )
    assert (renewal.total, renewal.starting_balance, renewal.amount_due, renewal.status) == (
        2900,
        -4667,
        0,
        "paid",
    )
    assert (await stripe_gateway.v1.customers.retrieve_async(customer_id)).balance == -1767


async def test_error_if_incomplete_with_a_failing_card_is_402_and_changes_nothing(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    pro = await insert_price(service, unit_amount=2900, product_name="Pro")
    team = await insert_price(service, unit_amount=9900, product_name="Team")
    customer_id, item = await day_ten(service, stripe_gateway, pro)
    await card_fails(service, customer_id)
    before = await stripe_gateway.v1.subscriptions.retrieve_async(item.subscription)
    seen = len(await events(service))

    with pytest.raises(stripe.CardError) as declined:
        await stripe_gateway.v1.subscriptions.update_async(
            item.subscription,
            {
                "items": [{"id": item.id, "price": team}],
                "proration_behavior": "always_invoice",
                "payment_behavior": "error_if_incomplete",
            },
        )

    assert declined.value.http_status == 402
    assert declined.value.code == "card_declined"
    after = await stripe_gateway.v1.subscriptions.retrieve_async(item.subscription)
    assert after.to_dict() == before.to_dict()
    assert len((await stripe_gateway.v1.invoices.list_async({"subscription": item.subscription})).data) == 1
    assert await event_types(service, seen) == []


async def test_allow_incomplete_with_a_failing_card_applies_the_change_and_goes_past_due(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    pro = await insert_price(service, unit_amount=2900, product_name="Pro")
    team = await insert_price(service, unit_amount=9900, product_name="Team")
    customer_id, item = await day_ten(service, stripe_gateway, pro)
    await card_fails(service, customer_id)

    updated = await stripe_gateway.v1.subscriptions.update_async(
        item.subscription,
        {"items": [{"id": item.id, "price": team}], "proration_behavior": "always_invoice"},
    )

    assert updated.status == "past_due"
    assert updated["items"].data[0].price.id == team
    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(updated.latest_invoice))
    assert (invoice.status, invoice.attempt_count) == ("open", 1)
    assert invoice.next_payment_attempt is not None
    assert "invoice.payment_failed" in await event_types(service)


async def test_no_proration_during_a_trial_and_none_drops_prorations(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    pro = await insert_price(service, unit_amount=2900, product_name="Pro")
    team = await insert_price(service, unit_amount=9900, product_name="Team")
    _a, trialing = await subscribe(service, stripe_gateway, pro, trial_days=14)
    _b, active = await subscribe(service, stripe_gateway, pro)
    await advance(service, 3 * DAY)
    seen = len(await events(service))

    for subscription_id, behavior in ((trialing, "always_invoice"), (active, "none")):
        item = (await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id))["items"].data[0]
        updated = await stripe_gateway.v1.subscriptions.update_async(
            subscription_id, {"items": [{"id": item.id, "price": team}], "proration_behavior": behavior}
        )
        assert updated["items"].data[0].price.id == team

    assert "invoiceitem.created" not in await event_types(service, seen)
    assert "invoice.created" not in await event_types(service, seen)
    trial = await stripe_gateway.v1.subscriptions.retrieve_async(trialing)
    assert trial.status == "trialing"


async def test_plan_changes_are_validated(service: Service, stripe_gateway: StripeGateway) -> None:
    pro = await insert_price(service, unit_amount=2900)
    euro = await insert_price(service, unit_amount=2900, currency="eur")
    _customer, subscription_id = await subscribe(service, stripe_gateway, pro)
    item = (await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id))["items"].data[0]

    with pytest.raises(stripe.InvalidRequestError) as duplicate:
        await stripe_gateway.v1.subscriptions.update_async(subscription_id, {"items": [{"price": pro}]})
    with pytest.raises(stripe.InvalidRequestError) as mixed:
        await stripe_gateway.v1.subscriptions.update_async(subscription_id, {"items": [{"price": euro}]})
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await stripe_gateway.v1.subscriptions.update_async(
            subscription_id, {"items": [{"id": "si_nope", "price": pro}]}
        )
    with pytest.raises(stripe.InvalidRequestError) as outside:
        await stripe_gateway.v1.subscriptions.update_async(
            subscription_id,
            {"items": [{"id": item.id, "quantity": 2}], "proration_date": item.current_period_end + DAY},
        )

    assert "same price" in str(duplicate.value.user_message)
    assert "must match" in str(mixed.value.user_message)
    assert missing.value.http_status == 404
    assert outside.value.param == "proration_date"


async def test_billing_cycle_anchor_now_credits_unused_time_and_bills_a_new_full_period(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    pro = await insert_price(service, unit_amount=2900, product_name="Pro")
    _customer, item = await day_ten(service, stripe_gateway, pro)

    updated = await stripe_gateway.v1.subscriptions.update_async(
        item.subscription,
        {"billing_cycle_anchor": {"type": "now"}, "proration_date": item.current_period_start + 10 * DAY},
    )

    new_item = updated["items"].data[0]
    assert new_item.current_period_start == updated.billing_cycle_anchor > item.current_period_start
    assert new_item.current_period_end == engine.add_intervals(new_item.current_period_start, "month", 1, 1)
    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(updated.latest_invoice))
    assert amounts(invoice) == [-1933, 2900]
    assert (invoice.total, invoice.amount_paid) == (967, 967)


async def test_canceling_now_with_prorate_and_invoice_now_credits_the_unused_time(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    pro = await insert_price(service, unit_amount=2900, product_name="Pro")
    customer_id, item = await day_ten(service, stripe_gateway, pro)
    await advance(service, item.current_period_start + 20 * DAY - await clock(service))  # 10 days left

    canceled = await stripe_gateway.v1.subscriptions.cancel_async(
        item.subscription, {"prorate": True, "invoice_now": True}
    )

    assert canceled.status == "canceled"
    final = await stripe_gateway.v1.invoices.retrieve_async(str(canceled.latest_invoice))
    assert len(final.lines.data) == 1 and final.lines.data[0].parent.subscription_item_details.proration
    credit = final.lines.data[0].amount
    ended_at = int(canceled.ended_at or 0)
    expected = -engine.prorated(2900, item.current_period_start, item.current_period_end, ended_at)
    assert credit == expected and -967 <= credit <= -966  # 2900 x 10/30, give or take a second
    assert (final.amount_due, final.status) == (0, "paid")
    assert (await stripe_gateway.v1.customers.retrieve_async(customer_id)).balance == credit


async def test_a_preview_without_changes_is_the_next_renewal(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    pro = await insert_price(service, unit_amount=2900, product_name="Pro")
    customer_id, subscription_id = await subscribe(service, stripe_gateway, pro)
    item = (await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id))["items"].data[0]

    by_subscription = await stripe_gateway.v1.invoices.create_preview_async({"subscription": subscription_id})
    by_customer = await stripe_gateway.v1.invoices.create_preview_async({"customer": customer_id})

    for preview in (by_subscription, by_customer):
        assert amounts(preview) == [2900]
        assert preview.lines.data[0].period.start == item.current_period_end
        assert preview.lines.data[0].id.startswith("il_tmp_")
        assert preview.status == "draft"
    assert len((await stripe_gateway.v1.invoices.list_async({"customer": customer_id})).data) == 1
