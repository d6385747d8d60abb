"""The issue's population test: customers scripted on the sandbox over three simulated months
(trials that convert and that lapse, monthly and annual plans, a promotion code typed at
Checkout and a once coupon, metered usage, upgrades, downgrades at the period end,
cancellations, a failed renewal recovered and one lost), then every figure of `billingMetrics`
against an independent computation from the sandbox's own subscriptions, discounts and invoices
(tests/revenue_model.py), per day of `effectiveAt`, on both databases; with webhooks delivered
in order, and held back for a whole step then delivered late, shuffled and duplicated."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from billing.plans import plan_of_price
from tests.billing_flows import advance, card_fails, checkout, control, settle
from tests.checkout_flows import confirm, create_checkout, token
from tests.graphql_support import hs256_token
from tests.live import Live, LiveOptions
from tests.revenue_model import KINDS, expected_metrics, invoice_figures, timelines

DAY = 86_400
OPERATOR = "operator-1"
PER_COHORT = 3  # customers per kind of story: 13 stories, 39 customers

METRICS = """
query ($from: DateTime!, $to: DateTime!) {
  billingMetrics(from: $from, to: $to) {
    mrr arr mrrAtStart trialsStarted trialsConverted trialsLapsed churnedSubscribers
    failedPayments recoveredPayments failedInvoices failedAmount recoveredInvoices recoveredAmount
    meteredRevenue
    subscribers { status tier count }
    movements { start mrr new expansion contraction churned reactivation netNew }
  }
}"""
CHANGE_PLAN = (
    "mutation ($tier: Tier!, $interval: BillingInterval!) "
    "{ changePlan(tier: $tier, interval: $interval) { tier } }"
)


@pytest.fixture(params=["ordered", "late_shuffled_duplicated"])
def live_options(request: pytest.FixtureRequest) -> LiveOptions:
    mode = "ordered" if request.param == "ordered" else "shuffled_duplicated"
    return LiveOptions(delivery=mode, settings={"admin_user_ids": OPERATOR})


class Steps:
    """Each step of the script, then every webhook delivered and applied. `late`: the step's
    webhooks are held back until it ends (the sandbox's delivery off), then all sent at once,
    shuffled and duplicated."""

    def __init__(self, live: Live, late: bool) -> None:
        self.live = live
        self.late = late
        self.deliverer = live.service.app.state.sandbox.delivery
        self.held = 0  # events that waited for the end of their step

    def _deliver(self, on: bool) -> None:
        self.deliverer.config = dataclasses.replace(self.deliverer.config, deliver_webhooks=on)

    @asynccontextmanager
    async def step(self) -> AsyncIterator[None]:
        if self.late:
            self._deliver(False)
        try:
            yield
        finally:
            if self.late:
                self.held += (await self.deliverer.stats()).pending
            self._deliver(True)
            await control(self.live.service, "delivery/flush", {"timeout": 60})
            await settle(self.live.service.url, self.live.service.database)


async def _session_with_coupon(live: Live, user: str, coupon: str) -> tuple[str, str]:
    """A checkout made with the SDK, for a coupon applied by the merchant (`discounts`)."""
    customer = await live.gateway.v1.customers.create_async(
        {"email": f"{user}@example.com", "metadata": {"userId": user}}
    )
    session = await live.gateway.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "customer": customer.id,
            "line_items": [{"price": live.prices["starter_monthly"], "quantity": 1}],
            "subscription_data": {"metadata": {"userId": user}},
            "discounts": [{"coupon": coupon}],
            "success_url": "http://app.test/billing/success",
        }
    )
    return customer.id, session.id


async def _pay(url: str, **form: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        paid = await client.post(f"{url}/pay", data=form)
    assert paid.status_code == 303, paid.text


async def test_every_metric_equals_the_sandboxs_own_numbers(live: Live, live_options: LiveOptions) -> None:
    began = time.monotonic()
    service, gateway, prices = live.service, live.gateway, live.prices
    steps = Steps(live, late=live_options.delivery == "shuffled_duplicated")
    started = datetime.fromtimestamp(int((await advance(service, 0))["now"]), tz=UTC)
    metered = {price_id for key, price_id in prices.items() if key.endswith("_metered")}
    promo = await gateway.v1.coupons.create_async(
        {"percent_off": 25, "duration": "repeating", "duration_in_months": 2}
    )
    await gateway.v1.promotion_codes.create_async(
        {"promotion": {"type": "coupon", "coupon": promo.id}, "code": "LAUNCH25"}
    )
    once = await gateway.v1.coupons.create_async({"amount_off": 500, "currency": "usd", "duration": "once"})

    plans = {  # story -> (lookup key, trial days)
        "monthly": ("starter_monthly", None),
        "annual": ("pro_annual", None),
        "trial_converts": ("pro_monthly", 14),
        "trial_lapses": ("starter_monthly", 14),
        "upgrade": ("starter_monthly", None),
        "downgrade": ("pro_monthly", None),
        "cancel_now": ("pro_monthly", None),
        "cancel_at_end": ("starter_monthly", None),
        "recovered": ("starter_monthly", None),
        "lost": ("starter_monthly", None),
        "metered": ("starter_monthly", None),
    }
    users = {f"{story}-{n}": story for story in [*plans, "promo", "once"] for n in range(PER_COHORT)}
    customers: dict[str, str] = {}
    sessions: dict[str, str] = {}
    async with steps.step():
        for user, story in users.items():
            if story == "promo":  # the service's own checkout; the customer types the code
                session = await create_checkout(service, token(user), "STARTER", "MONTHLY")
                await _pay(session["url"], promotion_code="launch25")
                answer = await confirm(service, token(user), session["id"])
                assert "errors" not in answer, answer
                sessions[user] = session["id"]
                continue
            if story == "once":
                customers[user], sessions[user] = await _session_with_coupon(live, user, once.id)
            else:
                key, trial = plans[story]
                extra = ("starter_api_calls_metered",) if story == "metered" else ()
                customers[user], sessions[user] = await checkout(
                    gateway, prices, user, key, trial_days=trial, metered=extra
                )
            await control(service, f"checkout/{sessions[user]}/complete", {"outcome": "paid"})
    subs: dict[str, str] = {}
    for user, session_id in sessions.items():
        session = await gateway.v1.checkout.sessions.retrieve_async(session_id)
        subs[user], customers[user] = str(session.subscription), str(session.customer)

    async with steps.step():  # day 0: a trial set to lapse, a cancellation at the period's end
        for user, story in users.items():
            if story in ("trial_lapses", "cancel_at_end"):
                await gateway.v1.subscriptions.update_async(subs[user], {"cancel_at_period_end": True})
    await advance(service, 9 * DAY)
    async with steps.step():  # day 9: plan changes, usage, an immediate cancellation
        for user, story in users.items():
            if story in ("upgrade", "downgrade"):
                tier = "PRO" if story == "upgrade" else "STARTER"
                answer = await live.graphql(user, CHANGE_PLAN, {"tier": tier, "interval": "MONTHLY"})
                assert "errors" not in answer, answer
            elif story == "metered":
                await gateway.v1.billing.meter_events.create_async(
                    {
                        "event_name": "billing_api_calls",
                        "payload": {"stripe_customer_id": customers[user], "value": "12000"},
                    }
                )
            elif story == "cancel_now":
                await gateway.v1.subscriptions.cancel_async(subs[user])
            elif story in ("recovered", "lost"):
                await card_fails(service, customers[user])
    for _ in range(9):  # the rest of three months, in steps shorter than a month
        async with steps.step():
            now = int((await advance(service, 9 * DAY))["now"])
            for user, story in users.items():
                if (
                    story == "recovered"
                    and now
                    > int((await gateway.v1.subscriptions.retrieve_async(subs[user])).start_date) + 33 * DAY
                ):
                    await card_fails(service, customers[user], fails=False)  # the next retry pays
    now_ts = int((await advance(service, 0))["now"])
    end = datetime.fromtimestamp(now_ts + 1, tz=UTC)
    start = started.replace(hour=0, minute=0, second=0, microsecond=0)

    answer = await live.graphql(
        None, METRICS, {"from": start.isoformat(), "to": end.isoformat()}, token=hs256_token(OPERATOR)
    )
    assert "errors" not in answer, answer
    metrics = answer["data"]["billingMetrics"]

    # Independently, from the sandbox's objects.
    model = await timelines(gateway, subs, metered)
    expected = expected_metrics(model, start, end)
    found = {
        bucket["start"][:10]: Counter({kind: bucket[kind] for kind in KINDS if bucket[kind]})
        for bucket in metrics["movements"]
    }
    assert {day: moves for day, moves in found.items() if moves} == expected.days
    assert {bucket["start"][:10]: bucket["mrr"] for bucket in metrics["movements"]} == expected.mrr_by_day
    assert (metrics["mrr"], metrics["arr"], metrics["mrrAtStart"]) == (expected.mrr, expected.mrr * 12, 0)
    assert metrics["churnedSubscribers"] == expected.churned

    stripe_subs = {user: await gateway.v1.subscriptions.retrieve_async(sid) for user, sid in subs.items()}
    counted = Counter((s.status, _tier(s)) for s in stripe_subs.values())
    assert {(c["status"], c["tier"]): c["count"] for c in metrics["subscribers"]} == counted
    trials = [s for s in stripe_subs.values() if s.trial_start is not None]
    converted = [
        user
        for user, s in stripe_subs.items()
        if s.trial_start is not None and model[user].mrr(_after(s.trial_end)) > 0
    ]
    assert metrics["trialsStarted"] == len(trials)
    assert metrics["trialsConverted"] == len(converted)
    assert metrics["trialsLapsed"] == len(trials) - len(converted)

    figures = await invoice_figures(gateway, sorted(set(customers.values())), metered, start, end)
    assert (metrics["failedInvoices"], metrics["failedAmount"]) == (figures.failed, figures.failed_amount)
    assert (metrics["recoveredInvoices"], metrics["recoveredAmount"]) == (
        figures.recovered,
        figures.recovered_amount,
    )
    assert metrics["meteredRevenue"] == figures.metered
    # The ledger's status changes tell the same story as the invoices.
    assert metrics["failedPayments"] == figures.failed and metrics["recoveredPayments"] == figures.recovered

    # The script did what it meant to: each story shows in the figures, late events were late.
    assert steps.held > len(users) if steps.late else steps.held == 0
    assert figures.failed == 2 * PER_COHORT and figures.recovered == PER_COHORT and figures.metered > 0
    totals = Counter[str]()
    for moves in expected.days.values():
        totals.update(moves)
    assert all(totals[kind] for kind in ("new", "expansion", "contraction", "churned"))
    print(f"population of {len(users)} customers: {time.monotonic() - began:.1f}s")


def _licensed(subscription: Any) -> Any:
    items = subscription["items"].data
    return next(item for item in items if item.price.recurring.usage_type == "licensed")


def _tier(subscription: Any) -> str:
    plan = plan_of_price(_licensed(subscription).price)
    return "none" if plan is None else plan[0].value


def _after(ts: int | None) -> datetime:
    assert ts is not None
    return datetime.fromtimestamp(int(ts), tz=UTC) + timedelta(seconds=1)
