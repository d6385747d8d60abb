"""The sandbox's lifecycle ends in the right database state through the real webhook route."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from billing.notifier import NotificationKind
from billing.plans import plan_of_price
from billing.stripe_objects import stripe_time
from db.models import invoice_table
from tests.billing_flows import (
    advance,
    advance_past_renewal,
    advance_to,
    card_fails,
    eventually,
    period_end,
    subscribe,
    wait_for_account,
)
from tests.live import Live, LiveOptions, Recorder

DAY = 86_400


@pytest.fixture(params=["ordered", "shuffled_duplicated"])
def delivery_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def live_options(recorder: Recorder, delivery_mode: str) -> LiveOptions:
    return LiveOptions(notifier=recorder, delivery=delivery_mode)


async def test_checkout_with_a_trial_ends_trialing_then_active(live: Live, recorder: Recorder) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    customer_id, subscription_id = await subscribe(service, gateway, prices, "u1", "pro_monthly")
    stripe_sub = await gateway.v1.subscriptions.retrieve_async(subscription_id)
    item = stripe_sub["items"].data[0]

    row = await wait_for_account(service.database, "u1", status="trialing")
    assert (row.tier, row.interval, row.stripe_customer_id) == ("pro", "monthly", customer_id)
    assert row.stripe_subscription_id == subscription_id
    assert row.stripe_price_id == prices["pro_monthly"]
    assert row.trial_end == stripe_time(stripe_sub.trial_end)
    assert row.current_period_end == stripe_time(item["current_period_end"])
    assert row.trial_end.tzinfo is not None
    assert row.trial_used is True

    await advance(service, 15 * DAY)  # trial -> paid
    row = await wait_for_account(service.database, "u1", status="active")
    assert row.tier == "pro"
    ending = await recorder.wait_for(NotificationKind.TRIAL_ENDING)
    assert (ending.user_id, ending.stripe_customer_id) == ("u1", customer_id)

    async def paid_invoices() -> list[Any]:
        async with service.database.read() as conn:
            rows = (
                await conn.execute(
                    select(invoice_table).where(invoice_table.c.stripe_customer_id == customer_id)
                )
            ).all()
        return [row for row in rows if row.status == "paid" and row.amount_paid == 9900]

    invoices = await eventually(paid_invoices, what="the first paid Pro invoice is stored")
    assert all(invoice.stripe_subscription_id == subscription_id for invoice in invoices)


async def test_a_failing_card_goes_past_due_then_canceled(live: Live, recorder: Recorder) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    customer_id, subscription_id = await subscribe(
        service, gateway, prices, "u2", "starter_monthly", trial_days=None
    )
    await wait_for_account(service.database, "u2", status="active")
    await card_fails(service, customer_id)

    await advance_past_renewal(service, gateway, subscription_id)
    await wait_for_account(service.database, "u2", status="past_due", tier="starter")
    await recorder.wait_for(NotificationKind.PAYMENT_FAILED)

    await advance(service, 30 * DAY)  # every retry fails
    await wait_for_account(service.database, "u2", status="canceled")
    await recorder.wait_for(NotificationKind.SUBSCRIPTION_CANCELED)


async def test_cancel_at_period_end_then_canceled(live: Live) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    _, subscription_id = await subscribe(service, gateway, prices, "u3", "starter_annual", trial_days=None)
    await wait_for_account(service.database, "u3", status="active", interval="annual")

    await gateway.v1.subscriptions.update_async(subscription_id, {"cancel_at_period_end": True})
    await wait_for_account(service.database, "u3", status="active", cancel_at_period_end=True)

    await advance_to(service, await period_end(gateway, subscription_id) + 60)
    row = await wait_for_account(service.database, "u3", status="canceled")
    final = await gateway.v1.subscriptions.retrieve_async(subscription_id)
    assert row.canceled_at == stripe_time(final.canceled_at)
    assert plan_of_price(final["items"].data[0].price) == ("starter", "annual")
