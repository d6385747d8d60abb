"""previewPlanChange and changePlan over HTTP with real user tokens, against the Stripe sandbox.

Upgrades are charged at once, to the cent as previewed; downgrades wait for the period end in a
subscription schedule and show as `pendingChange`; a declined card or a Stripe outage changes
nothing, in Stripe or in the database.
"""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest

from billing.stripe_objects import stripe_time
from stripe_sandbox import engine
from tests.billing_flows import advance, card_fails, subscribe, wait_for_account
from tests.graphql_support import error_codes
from tests.live import CHANGE, PREVIEW, SUBSCRIPTION, Live, iso, item_of

DAY = 86_400
HOUR = 3_600


def prorated(amount: int, start: int, end: int, at: int) -> int:
    """The per-second proration Stripe makes, rounded half up to the cent."""
    return int((Decimal(amount) * (end - at) / (end - start)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def seconds(value: str) -> int:
    return int(datetime.fromisoformat(value).timestamp())


# Upgrades ---------------------------------------------------------------------------------------


async def test_an_upgrade_mid_period_is_charged_to_the_cent_as_previewed(live: Live) -> None:
    _customer, subscription_id = await live.subscribe("u1", "starter_monthly")
    await advance(live.service, 10 * DAY)
    before = item_of(await live.subscription(subscription_id))
    start, end = before.current_period_start, before.current_period_end

    preview = await live.preview("u1", "PRO", "MONTHLY")

    assert (preview["tier"], preview["interval"], preview["immediate"], preview["currency"]) == (
        "PRO",
        "MONTHLY",
        True,
        "usd",
    )
    at = seconds(preview["effectiveAt"])
    assert start + 10 * DAY <= at < start + 10 * DAY + 120  # the sandbox's clock, not ours
    credit, charge = -prorated(2900, start, end, at), prorated(9900, start, end, at)
    assert [(line["amount"], line["proration"]) for line in preview["lines"]] == [
        (credit, True),
        (charge, True),
    ]
    assert preview["lines"][0]["description"].startswith("Unused time on Starter")
    assert preview["lines"][1]["description"].startswith("Remaining time on Pro")
    assert [line["periodStart"] for line in preview["lines"]] == [iso(at), iso(at)]
    assert preview["amountDue"] == credit + charge
    assert (preview["nextInvoiceAmount"], preview["nextInvoiceAt"]) == (9900, iso(end))
    assert len(await live.quotes()) == 1

    # An hour later (Stripe's clock) the change still charges what the preview showed.
    await advance(live.service, HOUR)
    assert (await live.preview("u1", "PRO", "MONTHLY"))["amountDue"] == preview["amountDue"]
    changed = await live.change("u1", "PRO", "MONTHLY")

    assert (changed["status"], changed["tier"], changed["interval"]) == ("ACTIVE", "PRO", "MONTHLY")
    assert changed["priceId"] == live.prices["pro_monthly"]
    assert changed["currentPeriodEnd"] == iso(end)  # same billing cycle
    assert changed["pendingChange"] is None
    after = await live.subscription(subscription_id)
    assert item_of(after).price.id == live.prices["pro_monthly"]
    invoice = await live.gateway.v1.invoices.retrieve_async(str(after.latest_invoice))
    assert invoice.billing_reason == "subscription_update"
    assert (invoice.status, invoice.amount_paid, invoice.total) == (
        "paid",
        preview["amountDue"],
        credit + charge,
    )
    assert [line.amount for line in invoice.lines.data] == [credit, charge]
    row = await wait_for_account(live.service.database, "u1", tier="pro")
    assert row.stripe_price_id == live.prices["pro_monthly"]
    assert await live.quotes() == []  # used up
    assert (await live.viewer("u1"))["tier"] == "PRO"


async def test_monthly_to_annual_resets_the_billing_cycle_and_charges_the_year_less_the_credit(
    live: Live,
) -> None:
    _customer, subscription_id = await live.subscribe("u2", "starter_monthly")
    await advance(live.service, 10 * DAY)
    before = item_of(await live.subscription(subscription_id))
    start, end = before.current_period_start, before.current_period_end

    preview = await live.preview("u2", "STARTER", "ANNUAL")

    at = seconds(preview["effectiveAt"])
    credit = -prorated(2900, start, end, at)
    assert [(line["amount"], line["proration"]) for line in preview["lines"]] == [
        (credit, True),
        (29000, False),
    ]
    assert preview["amountDue"] == 29000 + credit
    year_start = seconds(preview["lines"][1]["periodStart"])
    assert abs(year_start - at) < 60
    assert preview["nextInvoiceAt"] == preview["lines"][1]["periodEnd"]
    assert seconds(preview["nextInvoiceAt"]) - year_start in (365 * DAY, 366 * DAY)
    assert preview["nextInvoiceAmount"] == 29000

    changed = await live.change("u2", "STARTER", "ANNUAL")

    assert (changed["tier"], changed["interval"], changed["status"]) == ("STARTER", "ANNUAL", "ACTIVE")
    after = await live.subscription(subscription_id)
    new_item = item_of(after)
    assert after.billing_cycle_anchor == new_item.current_period_start > start  # the anchor moved to now
    assert changed["currentPeriodStart"] == iso(new_item.current_period_start)
    assert changed["currentPeriodEnd"] == iso(new_item.current_period_end)
    invoice = await live.gateway.v1.invoices.retrieve_async(str(after.latest_invoice))
    assert (invoice.status, invoice.amount_paid) == ("paid", preview["amountDue"])
    assert [line.amount for line in invoice.lines.data] == [credit, 29000]


async def test_a_declined_card_changes_nothing_in_stripe_or_the_database(live: Live) -> None:
    customer_id, subscription_id = await live.subscribe("u3", "starter_monthly")
    await advance(live.service, 5 * DAY)
    await live.preview("u3", "PRO", "MONTHLY")
    await card_fails(live.service, customer_id)
    await live.settle()
    stripe_before = (await live.subscription(subscription_id)).to_dict()
    state_before = await live.state("u3")

    result = await live.graphql("u3", CHANGE, {"tier": "PRO", "interval": "MONTHLY"})

    assert error_codes(result) == ["CARD_DECLINED"]
    assert result["data"] is None
    assert (await live.subscription(subscription_id)).to_dict() == stripe_before
    invoices = await live.gateway.v1.invoices.list_async({"subscription": subscription_id})
    assert len(invoices.data) == 1  # only the first one
    assert await live.state("u3") == state_before
    assert (await live.viewer("u3"))["tier"] == "STARTER"

    await card_fails(live.service, customer_id, fails=False)  # a working card: the same change goes through
    assert (await live.change("u3", "PRO", "MONTHLY"))["tier"] == "PRO"


# Downgrades -------------------------------------------------------------------------------------


async def test_a_downgrade_waits_for_the_period_end(live: Live) -> None:
    _customer, subscription_id = await live.subscribe("u4", "pro_monthly")
    await advance(live.service, 5 * DAY)
    end = item_of(await live.subscription(subscription_id)).current_period_end

    preview = await live.preview("u4", "STARTER", "MONTHLY")

    assert (preview["immediate"], preview["amountDue"], preview["effectiveAt"]) == (False, 0, iso(end))
    assert (preview["nextInvoiceAmount"], preview["nextInvoiceAt"]) == (2900, iso(end))
    # Starter's price for the next period, and its metered usage (none yet), billed in arrears.
    assert [(line["amount"], line["proration"]) for line in preview["lines"]] == [(2900, False), (0, False)]
    assert preview["lines"][0]["periodStart"] == iso(end)
    assert await live.quotes() == []  # nothing is prorated: nothing to keep

    changed = await live.change("u4", "STARTER", "MONTHLY")

    assert (changed["tier"], changed["status"], changed["priceId"]) == (
        "PRO",
        "ACTIVE",
        live.prices["pro_monthly"],
    )
    assert changed["pendingChange"] == {"tier": "STARTER", "interval": "MONTHLY", "effectiveAt": iso(end)}
    assert (await live.viewer("u4"))["pendingChange"] == changed["pendingChange"]
    stripe_sub = await live.subscription(subscription_id)
    assert item_of(stripe_sub).price.id == live.prices["pro_monthly"]  # still paying for Pro
    assert stripe_sub.schedule is not None
    row = await wait_for_account(live.service.database, "u4", pending_tier="starter")
    assert row.stripe_schedule_id == stripe_sub.schedule
    assert len((await live.gateway.v1.invoices.list_async({"subscription": subscription_id})).data) == 1

    await advance(live.service, end - (await advance(live.service, 0))["now"] + 2 * HOUR)

    row = await wait_for_account(live.service.database, "u4", tier="starter", pending_tier=None)
    assert row.pending_change_at is None
    viewer = await live.viewer("u4")
    assert (viewer["tier"], viewer["status"], viewer["pendingChange"]) == ("STARTER", "ACTIVE", None)
    renewed = await live.subscription(subscription_id)
    assert item_of(renewed).price.id == live.prices["starter_monthly"]
    renewal = await live.gateway.v1.invoices.retrieve_async(str(renewed.latest_invoice))
    assert (renewal.status, renewal.amount_paid) == ("paid", 2900)


async def test_a_second_change_replaces_the_pending_one_and_the_current_plan_drops_it(live: Live) -> None:
    _customer, subscription_id = await live.subscribe("u5", "pro_monthly")
    end = item_of(await live.subscription(subscription_id)).current_period_end
    first = await live.change("u5", "STARTER", "MONTHLY")
    schedule_id = (await live.subscription(subscription_id)).schedule

    replaced = await live.change("u5", "STARTER", "ANNUAL")

    assert first["pendingChange"]["interval"] == "MONTHLY"
    assert replaced["pendingChange"] == {"tier": "STARTER", "interval": "ANNUAL", "effectiveAt": iso(end)}
    assert (await live.subscription(subscription_id)).schedule == schedule_id  # the same schedule
    schedule = await live.gateway.v1.subscription_schedules.retrieve_async(str(schedule_id))
    assert [phase["items"][0]["price"] for phase in schedule.phases] == [
        live.prices["pro_monthly"],
        live.prices["starter_annual"],
    ]
    preview = await live.preview("u5", "PRO", "MONTHLY")  # the current plan: drops the pending change
    assert (preview["amountDue"], preview["nextInvoiceAmount"], preview["nextInvoiceAt"]) == (
        0,
        9900,
        iso(end),
    )

    kept = await live.change("u5", "PRO", "MONTHLY")

    assert (kept["tier"], kept["interval"], kept["pendingChange"]) == ("PRO", "MONTHLY", None)
    assert (await live.subscription(subscription_id)).schedule is None
    released = await live.gateway.v1.subscription_schedules.retrieve_async(str(schedule_id))
    assert released.status == "released"
    row = await wait_for_account(live.service.database, "u5", pending_tier=None)
    assert row.stripe_schedule_id is None
    result = await live.graphql("u5", CHANGE, {"tier": "PRO", "interval": "MONTHLY"})
    assert error_codes(result) == ["INVALID_PLAN"]  # now there is nothing to drop


async def test_an_annual_to_monthly_downgrade_is_previewed_at_the_new_price(live: Live) -> None:
    _customer, subscription_id = await live.subscribe("u6", "pro_annual")
    end = item_of(await live.subscription(subscription_id)).current_period_end

    preview = await live.preview("u6", "PRO", "MONTHLY")
    changed = await live.change("u6", "PRO", "MONTHLY")

    assert (preview["immediate"], preview["amountDue"], preview["nextInvoiceAmount"]) == (False, 0, 9900)
    assert preview["nextInvoiceAt"] == preview["effectiveAt"] == iso(end)
    assert [(line["amount"], line["periodStart"]) for line in preview["lines"]] == [(9900, iso(end))]
    assert (changed["interval"], changed["pendingChange"]) == (
        "ANNUAL",
        {"tier": "PRO", "interval": "MONTHLY", "effectiveAt": iso(end)},
    )


async def test_an_upgrade_replaces_a_pending_downgrade(live: Live) -> None:
    _customer, subscription_id = await live.subscribe("u7", "pro_monthly")
    await live.change("u7", "STARTER", "MONTHLY")
    schedule_id = (await live.subscription(subscription_id)).schedule

    changed = await live.change("u7", "PRO", "ANNUAL")

    assert (changed["tier"], changed["interval"], changed["pendingChange"]) == ("PRO", "ANNUAL", None)
    after = await live.subscription(subscription_id)
    assert (after.schedule, item_of(after).price.id) == (None, live.prices["pro_annual"])
    assert (
        await live.gateway.v1.subscription_schedules.retrieve_async(str(schedule_id))
    ).status == "released"


async def test_metered_items_follow_the_tier(live: Live) -> None:
    _customer, subscription_id = await live.subscribe("u10", "starter_monthly")
    await live.gateway.v1.subscriptions.update_async(
        subscription_id, {"items": [{"price": live.prices["starter_api_calls_metered"]}]}
    )

    def prices(subscription: Any) -> set[str]:
        return {item.price.id for item in subscription["items"].data}

    preview = await live.preview("u10", "PRO", "MONTHLY")
    await live.change("u10", "PRO", "MONTHLY")
    upgraded = await live.subscription(subscription_id)
    assert prices(upgraded) == {live.prices["pro_monthly"], live.prices["pro_api_calls_metered"]}
    invoice = await live.gateway.v1.invoices.retrieve_async(str(upgraded.latest_invoice))
    assert invoice.amount_paid == preview["amountDue"]  # metered items are not prorated

    await live.change("u10", "PRO", "ANNUAL")  # the annual plan keeps its monthly metered item
    assert prices(await live.subscription(subscription_id)) == {
        live.prices["pro_annual"],
        live.prices["pro_api_calls_metered"],
    }

    changed = await live.change("u10", "STARTER", "MONTHLY")  # at the period end, with the metered price
    assert changed["pendingChange"]["tier"] == "STARTER"
    schedule_id = str((await live.subscription(subscription_id)).schedule)
    schedule = await live.gateway.v1.subscription_schedules.retrieve_async(schedule_id)
    assert [{item["price"] for item in phase["items"]} for phase in schedule.phases] == [
        {live.prices["pro_annual"], live.prices["pro_api_calls_metered"]},
        {live.prices["starter_monthly"], live.prices["starter_api_calls_metered"]},
    ]


async def test_monthly_to_annual_keeps_the_metered_item_and_the_account_keeps_the_years_period(
    live: Live,
) -> None:
    metered = live.prices["pro_api_calls_metered"]
    _customer, subscription_id = await subscribe(
        live.service,
        live.gateway,
        live.prices,
        "u11",
        "pro_monthly",
        trial_days=None,
        metered=("pro_api_calls_metered",),
    )
    await wait_for_account(live.service.database, "u11", status="active", tier="pro", interval="monthly")
    await advance(live.service, 10 * DAY)

    changed = await live.change("u11", "PRO", "ANNUAL")

    after = await live.subscription(subscription_id)
    periods = {
        item.price.id: (item.current_period_start, item.current_period_end) for item in after["items"].data
    }
    assert set(periods) == {live.prices["pro_annual"], metered}
    year_start, year_end = periods[live.prices["pro_annual"]]
    assert year_end == engine.add_intervals(year_start, "year", 1, 1)
    assert periods[metered] == (year_start, engine.add_intervals(year_start, "month", 1, 1))
    assert (changed["interval"], changed["currentPeriodStart"], changed["currentPeriodEnd"]) == (
        "ANNUAL",
        iso(year_start),
        iso(year_end),
    )
    await live.settle()  # every webhook of the change applied: the account still has the year
    row = await wait_for_account(live.service.database, "u11", interval="annual")
    assert (row.current_period_start, row.current_period_end) == (
        stripe_time(year_start),
        stripe_time(year_end),
    )

    # A downgrade at the period end is previewed from the plan's price (Stripe's upcoming
    # invoice of this subscription is the month's usage, due long before the plan renews).
    preview = await live.preview("u11", "STARTER", "ANNUAL")
    assert (preview["immediate"], preview["amountDue"], preview["nextInvoiceAmount"]) == (False, 0, 29000)
    assert preview["nextInvoiceAt"] == preview["effectiveAt"] == iso(year_end)

    # Cancelling at the period end keeps the year that was paid for: Stripe's
    # cancel_at_period_end would end a mixed-interval subscription with the month.
    result = await live.graphql("u11", f"mutation {{ cancelSubscription {{ {SUBSCRIPTION} }} }}")
    assert "errors" not in result, result
    canceled = result["data"]["cancelSubscription"]
    assert (canceled["status"], canceled["cancelAtPeriodEnd"], canceled["currentPeriodEnd"]) == (
        "ACTIVE",
        True,
        iso(year_end),
    )
    assert (await live.subscription(subscription_id)).cancel_at == year_end
    resumed = await live.graphql("u11", f"mutation {{ resumeSubscription {{ {SUBSCRIPTION} }} }}")
    assert resumed["data"]["resumeSubscription"]["cancelAtPeriodEnd"] is False
    assert (await live.subscription(subscription_id)).cancel_at is None


async def test_an_annual_plans_downgrade_waits_for_the_years_end_while_usage_is_billed_monthly(
    live: Live,
) -> None:
    _customer, subscription_id = await subscribe(
        live.service,
        live.gateway,
        live.prices,
        "u12",
        "pro_annual",
        trial_days=None,
        metered=("pro_api_calls_metered",),
    )
    await wait_for_account(live.service.database, "u12", status="active", interval="annual")
    before = await live.subscription(subscription_id)
    year_end = max(item.current_period_end for item in before["items"].data)

    changed = await live.change("u12", "STARTER", "MONTHLY")
    assert changed["pendingChange"] == {
        "tier": "STARTER",
        "interval": "MONTHLY",
        "effectiveAt": iso(year_end),
    }

    now = (await advance(live.service, 0))["now"]
    await advance(live.service, year_end + 2 * HOUR - now)
    await live.settle()

    after = await live.subscription(subscription_id)
    assert {item.price.id for item in after["items"].data} == {
        live.prices["starter_monthly"],
        live.prices["starter_api_calls_metered"],
    }
    row = await wait_for_account(live.service.database, "u12", tier="starter", interval="monthly")
    assert row.pending_tier is None
    invoices = await live.gateway.v1.invoices.list_async({"subscription": subscription_id, "limit": 100})
    billed = [
        line.pricing.price_details.price
        for invoice in invoices.data
        for line in invoice.lines.data
        if line.pricing is not None and line.pricing.price_details is not None
    ]
    assert billed.count(live.prices["pro_annual"]) == 1  # the year, paid once, at checkout
    assert billed.count(live.prices["pro_api_calls_metered"]) == 12  # each month's usage
    assert billed.count(live.prices["starter_monthly"]) == 1  # the new plan's first month


# Refusals ---------------------------------------------------------------------------------------


async def test_refusals_have_their_codes(live: Live) -> None:
    for query, variables in (
        (PREVIEW, {"tier": "PRO", "interval": "MONTHLY"}),
        (CHANGE, {"tier": "PRO", "interval": "MONTHLY"}),
    ):
        assert error_codes(await live.graphql("nobody", query, variables)) == ["NO_SUBSCRIPTION"]
        assert error_codes(await live.graphql(None, query, variables)) == ["UNAUTHENTICATED"]
    await live.subscribe("u8", "starter_monthly")
    for query in (PREVIEW, CHANGE):
        same = await live.graphql("u8", query, {"tier": "STARTER", "interval": "MONTHLY"})
        none = await live.graphql("u8", query, {"tier": "NONE", "interval": "MONTHLY"})
        assert (error_codes(same), error_codes(none)) == (["INVALID_PLAN"], ["INVALID_PLAN"])
    await live.graphql("u8", "mutation { cancelSubscription(atPeriodEnd: false) { status } }")
    await wait_for_account(live.service.database, "u8", status="canceled")
    canceled = await live.graphql("u8", CHANGE, {"tier": "PRO", "interval": "MONTHLY"})
    assert error_codes(canceled) == ["NO_SUBSCRIPTION"]


@pytest.mark.parametrize("query", [PREVIEW, CHANGE], ids=["preview", "change"])
async def test_a_stripe_outage_is_provider_unavailable_and_changes_nothing(live: Live, query: str) -> None:
    _customer, subscription_id = await live.subscribe("u9", "pro_monthly")
    await live.settle()
    state_before, quotes_before = await live.state("u9"), await live.quotes()

    for tier in ("PRO", "STARTER"):  # an upgrade (to annual) and a downgrade
        interval = "ANNUAL" if tier == "PRO" else "MONTHLY"
        await live.outage()
        result = await live.graphql("u9", query, {"tier": tier, "interval": interval})
        await live.clear_faults()
        assert error_codes(result) == ["BILLING_PROVIDER_UNAVAILABLE"]
        assert result["data"] is None

    assert await live.state("u9") == state_before
    assert await live.quotes() == quotes_before
    after = await live.subscription(subscription_id)
    assert (after.schedule, item_of(after).price.id) == (None, live.prices["pro_monthly"])
