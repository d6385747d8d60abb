"""The sandbox clock: trials end, subscriptions renew, payments fail and are retried, schedules apply."""

from __future__ import annotations

from dataclasses import replace
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
    control,
    control_ok,
    event_types,
    events,
    insert_price,
    subscribe,
)

HOUR = 3_600


async def period_end(gateway: StripeGateway, subscription_id: str) -> int:
    subscription = await gateway.v1.subscriptions.retrieve_async(subscription_id)
    return int(subscription["items"].data[0].current_period_end)


async def advance_to(service: Service, moment: int) -> dict[str, Any]:
    return await advance(service, max(0, moment - await clock(service)))


async def test_advancing_the_clock_moves_sandbox_time(service: Service) -> None:
    before = await clock(service)

    summary = await advance(service, 5 * DAY)

    assert summary["advanced_by"] == 5 * DAY
    assert summary["now"] - before >= 5 * DAY
    assert await clock(service) >= before + 5 * DAY
    assert (await control(service, "clock/advance", {"seconds": -1})).status_code == 400


async def test_a_trial_warns_three_days_ahead_then_becomes_active_with_a_paid_invoice(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    _customer, subscription_id = await subscribe(service, stripe_gateway, price, trial_days=14)
    trial = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    assert trial.trial_end is not None
    trial_end = int(trial.trial_end)

    early = await advance_to(service, trial_end - 3 * DAY - 60)
    notice = await advance(service, 120)
    at_end = await advance_to(service, trial_end + 60)
    ending = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    paid = await advance(service, 2 * HOUR)

    assert [e["type"] for e in early["events"]] == []
    assert [e["type"] for e in notice["events"]] == ["customer.subscription.trial_will_end"]
    assert [e["type"] for e in at_end["events"]] == ["invoice.created", "customer.subscription.updated"]
    assert ending.status == "active"
    item = ending["items"].data[0]
    assert item.current_period_start == trial_end
    assert item.current_period_end - trial_end >= 28 * DAY
    assert [e["type"] for e in paid["events"]] == [
        "invoice.finalized",
        "invoice.paid",
        "invoice.payment_succeeded",
    ]
    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(ending.latest_invoice))
    assert (invoice.status, invoice.amount_paid, invoice.billing_reason) == (
        "paid",
        2900,
        "subscription_cycle",
    )
    assert invoice.status_transitions.finalized_at == trial_end + HOUR
    updated = next(e for e in await events(service) if e["type"] == "customer.subscription.updated")
    assert updated["data"]["previous_attributes"]["status"] == "trialing"


async def test_a_renewal_starts_the_next_period_with_a_paid_invoice(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    _customer, subscription_id = await subscribe(service, stripe_gateway, price)
    first = (await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id))["items"].data[0]
    first_start, first_end = first.current_period_start, first.current_period_end

    await advance_to(service, first_end + 2 * HOUR)

    renewed = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    item = renewed["items"].data[0]
    assert renewed.status == "active"
    assert item.current_period_start == first_end
    assert item.current_period_end > first_end + 27 * DAY
    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(renewed.latest_invoice))
    assert (invoice.status, invoice.amount_paid, invoice.billing_reason) == (
        "paid",
        2900,
        "subscription_cycle",
    )
    assert (invoice.period_start, invoice.period_end) == (
        first_start,
        first_end,
    )  # the period billed in arrears
    assert invoice.lines.data[0].period.start == first_end
    assert invoice.lines.data[0].period.end == item.current_period_end
    assert len((await stripe_gateway.v1.invoices.list_async({"subscription": subscription_id})).data) == 2


async def test_a_failed_renewal_is_past_due_retried_on_schedule_then_canceled(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    customer_id, subscription_id = await subscribe(service, stripe_gateway, price)
    await card_fails(service, customer_id)
    end = await period_end(stripe_gateway, subscription_id)
    first_attempt = end + HOUR

    await advance_to(service, first_attempt + 60)

    past_due = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(past_due.latest_invoice))
    assert past_due.status == "past_due"
    assert (invoice.status, invoice.attempt_count, invoice.amount_remaining) == ("open", 1, 2900)
    assert invoice.next_payment_attempt == first_attempt + 3 * DAY

    await advance_to(service, first_attempt + 3 * DAY + 60)
    second = await stripe_gateway.v1.invoices.retrieve_async(invoice.id)
    assert (second.attempt_count, second.next_payment_attempt) == (2, first_attempt + 5 * DAY)
    await advance_to(service, first_attempt + 5 * DAY + 60)
    third = await stripe_gateway.v1.invoices.retrieve_async(invoice.id)
    assert (third.attempt_count, third.next_payment_attempt) == (3, first_attempt + 7 * DAY)
    assert (await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)).status == "past_due"
    await advance_to(service, first_attempt + 7 * DAY + 60)

    ended = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    last = await stripe_gateway.v1.invoices.retrieve_async(invoice.id)
    assert ended.status == "canceled"
    assert ended.ended_at == first_attempt + 7 * DAY
    assert ended.cancellation_details is not None
    assert ended.cancellation_details.reason == "payment_failed"
    assert (last.status, last.attempt_count, last.next_payment_attempt) == ("open", 4, None)
    failures = [e for e in await events(service) if e["type"] == "invoice.payment_failed"]
    assert [e["created"] - first_attempt for e in failures] == [0, 3 * DAY, 5 * DAY, 7 * DAY]
    types = await event_types(service)
    assert types[-2:] == ["invoice.payment_failed", "customer.subscription.deleted"]


async def test_with_the_unpaid_setting_exhausted_retries_leave_the_subscription_unpaid(
    service: Service, stripe_gateway: StripeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = service.app.state.sandbox
    monkeypatch.setattr(sandbox, "config", replace(sandbox.config, dunning_final_action="unpaid"))
    price = await insert_price(service, unit_amount=2900)
    customer_id, subscription_id = await subscribe(service, stripe_gateway, price)
    await card_fails(service, customer_id)
    end = await period_end(stripe_gateway, subscription_id)

    await advance_to(service, end + HOUR + 7 * DAY + 60)

    unpaid = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    assert unpaid.status == "unpaid"
    types = await event_types(service)
    assert types.count("invoice.payment_failed") == 4
    assert "customer.subscription.deleted" not in types
    # An unpaid subscription keeps renewing, but Stripe no longer attempts its invoices.
    next_end = await period_end(stripe_gateway, subscription_id)
    await advance_to(service, next_end + 2 * HOUR)
    renewal = await stripe_gateway.v1.invoices.retrieve_async(
        str((await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)).latest_invoice)
    )
    assert (renewal.status, renewal.attempt_count) == ("open", 0)
    assert (await event_types(service)).count("invoice.payment_failed") == 4


async def test_a_successful_retry_pays_the_invoice_and_returns_to_active(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    customer_id, subscription_id = await subscribe(service, stripe_gateway, price)
    await card_fails(service, customer_id)
    end = await period_end(stripe_gateway, subscription_id)
    await advance_to(service, end + 2 * HOUR)
    assert (await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)).status == "past_due"
    before = len(await events(service))

    await card_fails(service, customer_id, fails=False)
    await advance_to(service, end + HOUR + 3 * DAY + 60)

    active = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(active.latest_invoice))
    assert active.status == "active"
    assert (invoice.status, invoice.attempt_count, invoice.amount_paid) == ("paid", 2, 2900)
    recent = (await events(service))[before:]
    assert [e["type"] for e in recent] == [
        "invoice.paid",
        "invoice.payment_succeeded",
        "customer.subscription.updated",
    ]
    assert recent[-1]["data"]["previous_attributes"] == {"status": "past_due"}


async def test_cancel_at_period_end_cancels_at_the_period_end(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    price = await insert_price(service, unit_amount=2900)
    _customer, subscription_id = await subscribe(service, stripe_gateway, price)
    await stripe_gateway.v1.subscriptions.update_async(subscription_id, {"cancel_at_period_end": True})
    end = await period_end(stripe_gateway, subscription_id)

    await advance_to(service, end - 60)
    still = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    summary = await advance(service, 2 * HOUR)

    assert still.status == "active"
    ended = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    assert (ended.status, ended.ended_at) == ("canceled", end)
    assert [e["type"] for e in summary["events"]] == ["customer.subscription.deleted"]
    assert len((await stripe_gateway.v1.invoices.list_async({"subscription": subscription_id})).data) == 1


async def test_a_schedule_downgrade_applies_at_the_period_end_then_releases(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    team = await insert_price(service, unit_amount=9900, product_name="Team")
    pro = await insert_price(service, unit_amount=2900, product_name="Pro")
    _customer, subscription_id = await subscribe(service, stripe_gateway, team)
    schedule = await stripe_gateway.v1.subscription_schedules.create_async(
        {"from_subscription": subscription_id}
    )
    phase = schedule.phases[0]
    updated = await stripe_gateway.v1.subscription_schedules.update_async(
        schedule.id,
        {
            "phases": [
                {
                    "items": [{"price": team, "quantity": 1}],
                    "start_date": phase.start_date,
                    "end_date": phase.end_date,
                },
                {"items": [{"price": pro, "quantity": 1}]},
            ]
        },
    )
    assert [p.items[0].price for p in updated.phases] == [team, pro]
    assert updated.phases[1].start_date == phase.end_date
    unchanged = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    assert unchanged["items"].data[0].price.id == team
    assert unchanged.schedule == schedule.id

    summary = await advance_to(service, phase.end_date + 2 * HOUR)

    downgraded = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    assert downgraded["items"].data[0].price.id == pro
    assert downgraded["items"].data[0].current_period_start == phase.end_date
    renewal = await stripe_gateway.v1.invoices.retrieve_async(str(downgraded.latest_invoice))
    assert (renewal.status, renewal.amount_paid) == ("paid", 2900)
    assert [line.amount for line in renewal.lines.data] == [2900]  # no proration at the boundary
    types = [e["type"] for e in summary["events"]]
    assert types[:2] == ["customer.subscription.updated", "subscription_schedule.updated"]
    current = await stripe_gateway.v1.subscription_schedules.retrieve_async(schedule.id)
    assert current.current_phase is not None
    assert current.current_phase.start_date == phase.end_date

    await advance_to(service, updated.phases[1].end_date + 60)

    released = await stripe_gateway.v1.subscription_schedules.retrieve_async(schedule.id)
    assert (released.status, released.released_subscription, released.subscription) == (
        "released",
        subscription_id,
        None,
    )
    after = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    assert (after.status, after.schedule) == ("active", None)
    assert "subscription_schedule.released" in await event_types(service)


async def test_releasing_and_canceling_a_schedule(service: Service, stripe_gateway: StripeGateway) -> None:
    price = await insert_price(service, unit_amount=2900)
    _a, kept = await subscribe(service, stripe_gateway, price)
    _b, ended = await subscribe(service, stripe_gateway, price)
    to_release = await stripe_gateway.v1.subscription_schedules.create_async({"from_subscription": kept})
    to_cancel = await stripe_gateway.v1.subscription_schedules.create_async({"from_subscription": ended})

    released = await stripe_gateway.v1.subscription_schedules.release_async(to_release.id)
    canceled = await stripe_gateway.v1.subscription_schedules.cancel_async(to_cancel.id, {"prorate": False})

    assert (released.status, released.released_subscription) == ("released", kept)
    assert (await stripe_gateway.v1.subscriptions.retrieve_async(kept)).schedule is None
    assert canceled.status == "canceled"
    assert (await stripe_gateway.v1.subscriptions.retrieve_async(ended)).status == "canceled"
    with pytest.raises(stripe.InvalidRequestError):
        await stripe_gateway.v1.subscription_schedules.release_async(to_release.id)


async def test_metered_usage_is_billed_in_arrears_at_the_period_end(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    meter = await stripe_gateway.v1.billing.meters.create_async(
        {"display_name": "API calls", "event_name": "api_call", "default_aggregation": {"formula": "sum"}}
    )
    metered = await stripe_gateway.v1.prices.create_async(
        {
            "currency": "usd",
            "unit_amount": 2,
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
            "product_data": {"name": "API calls"},
        }
    )
    base = await insert_price(service, unit_amount=2900)
    customer = await stripe_gateway.v1.customers.create_async({"email": "m@example.com"})
    session = await stripe_gateway.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "customer": customer.id,
            "line_items": [{"price": base, "quantity": 1}, {"price": metered.id}],
            "success_url": "https://app.test/ok",
        }
    )
    result = await control_ok(service, f"checkout/{session.id}/complete", {"outcome": "paid"})
    subscription_id = result["subscription"]["id"]
    assert result["invoice"]["amount_paid"] == 2900
    for value in ("1000", "234"):
        await stripe_gateway.v1.billing.meter_events.create_async(
            {"event_name": "api_call", "payload": {"stripe_customer_id": customer.id, "value": value}}
        )
    end = await period_end(stripe_gateway, subscription_id)

    await advance_to(service, end + 2 * HOUR)

    renewed = await stripe_gateway.v1.subscriptions.retrieve_async(subscription_id)
    invoice = await stripe_gateway.v1.invoices.retrieve_async(str(renewed.latest_invoice))
    by_price = {
        line.pricing.price_details.price: line.amount
        for line in invoice.lines.data
        if line.pricing is not None and line.pricing.price_details is not None
    }
    assert by_price == {metered.id: 1234 * 2, base: 2900}
    usage_line = next(line for line in invoice.lines.data if line.amount == 2468)
    assert usage_line.period.end == end
    assert (invoice.status, invoice.amount_paid) == ("paid", 2900 + 2468)


def test_periods_keep_the_anchor_day_and_clamp_to_month_ends() -> None:
    jan_31 = 1_769_860_800  # 2026-01-31 12:00 UTC
    feb_28 = engine.add_intervals(jan_31, "month", 1, 1)
    mar_31 = engine.add_intervals(jan_31, "month", 1, 2)

    assert feb_28 - jan_31 == 28 * DAY
    assert mar_31 - jan_31 == 59 * DAY
    assert engine.next_boundary(jan_31, "month", 1, feb_28) == mar_31
    assert engine.next_boundary(jan_31, "year", 1, jan_31) == engine.add_intervals(jan_31, "month", 1, 12)
