"""The operator's numbers on the sandbox: a small scripted population, then `billingMetrics`
against an independent computation from the sandbox's own subscriptions, and `billingAccount`
answering "why does this user have PRO"."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest

from billing.plans import plan_of_price
from billing.stripe_objects import stripe_time
from tests.billing_flows import (
    CHARGE_DELAY,
    advance,
    advance_to,
    card_fails,
    period_end,
    settle,
    subscribe,
    wait_for_account,
)
from tests.graphql_support import hs256_token
from tests.live import Live, LiveOptions

DAY = 86_400
OPERATOR = "operator-1"

METRICS = """
query ($from: DateTime!, $to: DateTime!) {
  billingMetrics(from: $from, to: $to) {
    mrr arr mrrAtStart trialsStarted trialsConverted trialsLapsed churnedSubscribers failedPayments
    subscribers { status tier count }
    movements { start mrr new expansion contraction churned reactivation netNew }
  }
}"""
ACCOUNT = """
query ($userId: ID!) {
  billingAccount(userId: $userId) {
    userId stripeCustomerId
    subscription { status tier }
    ledger { kind changes { field before after } causes { type id } effectiveAt }
    invoices { id status amountPaid }
    usage { feature used }
    events { id type outcome }
  }
}"""


@pytest.fixture(params=["ordered", "shuffled_duplicated"])
def live_options(request: pytest.FixtureRequest) -> LiveOptions:
    return LiveOptions(delivery=str(request.param), settings={"admin_user_ids": OPERATOR})


async def operator_query(live: Live, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    answer = await live.graphql(None, query, variables, token=hs256_token(OPERATOR))
    assert "errors" not in answer, answer
    data: dict[str, Any] = answer["data"]
    return data


def mrr_of_subscription(subscription: Any) -> Fraction:
    """Independently: Stripe's subscription, its licensed item, paying statuses only."""
    if subscription.status not in ("active", "past_due"):
        return Fraction(0)
    total = Fraction(0)
    for item in subscription["items"].data:
        price = item.price
        if price.recurring.usage_type != "licensed":
            continue
        amount = Fraction(price.unit_amount * (item.quantity or 1))
        total += amount / 12 if price.recurring.interval == "year" else amount
    return total


async def test_metrics_equal_the_sandboxs_subscriptions(live: Live) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    started = datetime.fromtimestamp(int((await advance(service, 0))["now"]), tz=UTC)
    subs: dict[str, str] = {}
    _, subs["trial_converts"] = await subscribe(service, gateway, prices, "m1", "pro_monthly")
    _, subs["trial_lapses"] = await subscribe(service, gateway, prices, "m2", "starter_monthly")
    _, subs["monthly"] = await subscribe(service, gateway, prices, "m3", "starter_monthly", trial_days=None)
    _, subs["annual"] = await subscribe(service, gateway, prices, "m4", "pro_annual", trial_days=None)
    _, subs["churns"] = await subscribe(service, gateway, prices, "m5", "pro_monthly", trial_days=None)
    await gateway.v1.subscriptions.update_async(subs["trial_lapses"], {"cancel_at_period_end": True})
    for user in ("m1", "m2"):
        await wait_for_account(service.database, user, status="trialing")
    await settle(service.url, service.database)

    await advance(service, 2 * DAY)
    await gateway.v1.subscriptions.cancel_async(subs["churns"])
    await wait_for_account(service.database, "m5", status="canceled")
    trial_end = int((await gateway.v1.subscriptions.retrieve_async(subs["trial_converts"])).trial_end or 0)
    await advance_to(service, trial_end + 60)
    await wait_for_account(service.database, "m1", status="active")
    await wait_for_account(service.database, "m2", status="canceled")
    await settle(service.url, service.database)
    now = datetime.fromtimestamp(int((await advance(service, 0))["now"]), tz=UTC)

    start_day = started.replace(hour=0, minute=0, second=0, microsecond=0)
    end = now + timedelta(seconds=1)
    variables = {"from": start_day.isoformat(), "to": end.isoformat()}
    metrics = (await operator_query(live, METRICS, variables))["billingMetrics"]

    # Independently, from the sandbox's subscriptions.
    stripe_subs = {name: await gateway.v1.subscriptions.retrieve_async(sid) for name, sid in subs.items()}
    expected_mrr = sum((mrr_of_subscription(s) for s in stripe_subs.values()), Fraction(0))
    assert metrics["mrr"] == round(expected_mrr) and metrics["arr"] == metrics["mrr"] * 12
    counted = Counter(
        (s.status, (plan_of_price(s["items"].data[0].price) or ("none",))[0]) for s in stripe_subs.values()
    )
    assert {(c["status"], c["tier"]): c["count"] for c in metrics["subscribers"]} == counted

    # Movements, per day: new on the day each became paying (start, or trial end); churn when a
    # paying one was canceled; a lapsed trial moves nothing.
    expected: dict[str, Counter[str]] = {}

    def add(moment: datetime | None, kind: str, amount: Fraction) -> None:
        assert moment is not None
        day = moment.strftime("%Y-%m-%d")
        expected.setdefault(day, Counter())[kind] += round(amount)

    prices_of = {
        name: mrr_of_subscription(s) if s.status != "canceled" else _list_mrr(s)
        for name, s in stripe_subs.items()
    }
    for name in ("monthly", "annual", "churns"):
        add(stripe_time(stripe_subs[name].start_date), "new", prices_of[name])
    add(stripe_time(stripe_subs["trial_converts"].trial_end), "new", prices_of["trial_converts"])
    add(stripe_time(stripe_subs["churns"].canceled_at), "churned", -prices_of["churns"])
    found = {
        bucket["start"][:10]: Counter(
            {
                k: bucket[k]
                for k in ("new", "expansion", "contraction", "churned", "reactivation")
                if bucket[k]
            }
        )
        for bucket in metrics["movements"]
    }
    assert {day: moves for day, moves in found.items() if moves} == expected
    assert sum(bucket["netNew"] for bucket in metrics["movements"]) == metrics["mrr"]

    # Trials and churned logos, independently: a trial is a subscription with `trial_start`; it
    # converted if it is paying now, lapsed if it ended; a churned logo ended after paying.
    trials = [s for s in stripe_subs.values() if s.trial_start is not None]
    assert metrics["mrrAtStart"] == 0
    assert metrics["trialsStarted"] == len(trials)
    assert metrics["trialsConverted"] == sum(1 for s in trials if s.status in ("active", "past_due"))
    assert metrics["trialsLapsed"] == sum(1 for s in trials if s.status == "canceled")
    ended_paying = [s for s in stripe_subs.values() if s.status == "canceled" and s.trial_start is None]
    assert metrics["churnedSubscribers"] == len(ended_paying) and metrics["failedPayments"] == 0


def _list_mrr(subscription: Any) -> Fraction:
    """What a canceled subscription paid per month while it was paying."""
    item = subscription["items"].data[0]
    amount = Fraction(item.price.unit_amount * (item.quantity or 1))
    return amount / 12 if item.price.recurring.interval == "year" else amount


async def test_why_does_this_user_have_pro(live: Live) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    customer_id, subscription_id = await subscribe(
        service, gateway, prices, "w1", "pro_monthly", trial_days=None
    )
    await wait_for_account(service.database, "w1", status="active", tier="pro")
    await settle(service.url, service.database)

    found = (await operator_query(live, ACCOUNT, {"userId": "w1"}))["billingAccount"]
    assert found["stripeCustomerId"] == customer_id
    assert found["subscription"] == {"status": "ACTIVE", "tier": "PRO"}
    (entry,) = found["ledger"]
    tier = next(change for change in entry["changes"] if change["field"] == "tier")
    assert (json.loads(tier["before"]), json.loads(tier["after"])) == (None, "pro")
    # Its causes: the webhook events of the batch that was synced (whichever arrived first, when
    # delivery is shuffled), each listed among the customer's events.
    event_types = {event["id"]: event["type"] for event in found["events"]}
    assert entry["causes"] and all(event_types[cause["id"]] == cause["type"] for cause in entry["causes"])
    assert all(event["outcome"] in ("processed", "ignored") for event in found["events"])
    assert [invoice["status"] for invoice in found["invoices"]] == ["paid"]
    subscription = await gateway.v1.subscriptions.retrieve_async(subscription_id)
    assert datetime.fromisoformat(entry["effectiveAt"]) >= stripe_time(subscription.start_date)  # type: ignore[operator]
    assert (await operator_query(live, ACCOUNT, {"userId": "nobody"}))["billingAccount"] is None


CHANGE_PLAN = "mutation ($tier: Tier!, $interval: BillingInterval!) { changePlan(tier: $tier, interval: $interval) { tier } }"


async def test_upgrades_downgrades_and_dunning_move_mrr_as_the_sandbox_says(live: Live) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    started = datetime.fromtimestamp(int((await advance(service, 0))["now"]), tz=UTC)
    plans = {
        "up": "starter_monthly",
        "down": "pro_monthly",
        "rec": "starter_monthly",
        "lost": "starter_monthly",
    }
    subs: dict[str, str] = {}
    customers: dict[str, str] = {}
    for user, key in plans.items():
        customers[user], subs[user] = await subscribe(service, gateway, prices, user, key, trial_days=None)
    for user in plans:
        await wait_for_account(service.database, user, status="active")
    await settle(service.url, service.database)
    amount = {key: (await gateway.v1.prices.retrieve_async(prices[key])).unit_amount or 0 for key in prices}

    for user, tier in (("up", "PRO"), ("down", "STARTER")):
        answer = await live.graphql(user, CHANGE_PLAN, {"tier": tier, "interval": "MONTHLY"})
        assert "errors" not in answer, answer
    await settle(service.url, service.database)
    for user in ("rec", "lost"):
        await card_fails(service, customers[user])
    ends = {user: await period_end(gateway, sid) for user, sid in subs.items()}
    renewal = max(ends.values())
    await advance_to(service, renewal + CHARGE_DELAY + 60)
    for user in ("rec", "lost"):
        await wait_for_account(service.database, user, status="past_due")
    await wait_for_account(service.database, "down", tier="starter")
    await card_fails(service, customers["rec"], fails=False)
    await advance(service, 4 * DAY)  # the first retry pays for "rec" only
    await wait_for_account(service.database, "rec", status="active")
    await advance(service, 30 * DAY)  # every retry of "lost" fails
    await wait_for_account(service.database, "lost", status="canceled")
    await settle(service.url, service.database)
    now = datetime.fromtimestamp(int((await advance(service, 0))["now"]), tz=UTC)

    start_day = started.replace(hour=0, minute=0, second=0, microsecond=0)
    variables = {"from": start_day.isoformat(), "to": (now + timedelta(seconds=1)).isoformat()}
    metrics = (await operator_query(live, METRICS, variables))["billingMetrics"]

    stripe_subs = {user: await gateway.v1.subscriptions.retrieve_async(sid) for user, sid in subs.items()}
    assert metrics["mrr"] == round(sum((mrr_of_subscription(s) for s in stripe_subs.values()), Fraction(0)))
    expected: dict[str, Counter[str]] = {}

    def add(moment: datetime | None, kind: str, cents: int) -> None:
        assert moment is not None
        expected.setdefault(moment.strftime("%Y-%m-%d"), Counter())[kind] += cents

    for user, key in plans.items():
        add(stripe_time(stripe_subs[user].start_date), "new", amount[key])
    add(started, "expansion", amount["pro_monthly"] - amount["starter_monthly"])  # changed now
    # The downgrade took effect at the renewal: the end of the first period, as Stripe reported it.
    first_renewal = stripe_time(ends["down"])
    add(first_renewal, "contraction", amount["starter_monthly"] - amount["pro_monthly"])
    add(
        stripe_time(stripe_subs["lost"].ended_at or stripe_subs["lost"].canceled_at),
        "churned",
        -amount["starter_monthly"],
    )
    found = {
        bucket["start"][:10]: Counter(
            {
                k: bucket[k]
                for k in ("new", "expansion", "contraction", "churned", "reactivation")
                if bucket[k]
            }
        )
        for bucket in metrics["movements"]
    }
    assert {day: moves for day, moves in found.items() if moves} == expected
    assert metrics["failedPayments"] == 2 and metrics["churnedSubscribers"] == 1
