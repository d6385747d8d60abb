"""Property: whatever order and however many copies Stripe delivers, the row ends as Stripe's.

Each test drives one subscription lifecycle through the real sandbox (checkout, trial, renewals,
plan changes made by `billing.plan_changes`, failing and recovering cards, cancellation), with
the sandbox's own delivery off, and records every event it emitted about the customer: real,
Stripe-shaped events. Hypothesis then delivers them to the real webhook route, signed with
Stripe's scheme, in a random order with random extra copies, in rounds posted in parallel,
with the worker draining the inbox at random points. After the last drain:

- every copy was acknowledged with 200, and exactly one copy of each event was new;
- the inbox holds each event once, none pending or failed;
- the account row equals the sandbox's subscription: id, status, price, tier and interval (from
  the price's metadata), current period, trial end, cancel_at_period_end, canceled_at, the
  pending plan change of its schedule, and (while it is live) the seats, the plan's quantity; one
  lifecycle is an organisation's (`metadata.orgId`, seats changed twice);
- every invoice of the customer named by an event is stored with the sandbox's status and
  amounts (a deleted customer's invoices belong to no account: `viewer.invoices` lists the
  current customer's).

The lifecycle is built once per test (the sandbox is the expensive part) and every example
starts from empty service tables (`truncate_all`, as the `database` fixture does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from billing.clock import utcnow
from billing.customer_locks import CustomerLocks
from billing.ledger import ACCOUNT_FIELDS, plain
from billing.plan_changes import change_plan
from billing.plans import load_catalog
from billing.stripe_gateway import StripeGateway
from billing.stripe_state import LIVE_STATUSES
from billing.sync import sync_customer
from db.engine import Database
from db.enums import BillingInterval, Tier
from db.models import event_table, invoice_table, ledger_table
from tests.billing_flows import (
    account,
    advance,
    advance_past_renewal,
    advance_to,
    card_fails,
    control,
    period_end,
    subscribe,
)
from tests.conftest import Service, truncate_all
from tests.live import Live, LiveOptions
from tests.stripe_events import post_event

DAY = 86_400
LIVE = {status.value for status in LIVE_STATUSES}
SANDBOX_KEY = {"Authorization": "Bearer sk_test_properties"}


@dataclass
class Lifecycle:
    user_id: str
    customer_id: str
    events: list[dict[str, Any]]  # every event about the customer, oldest first


@dataclass
class Driver:
    service: Service
    gateway: StripeGateway
    prices: dict[str, str]
    seen: dict[str, dict[str, Any]]
    listed: set[str] = field(default_factory=set)  # every event id read so far, anyone's

    async def sandbox(self, path: str, **params: Any) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(
                f"{self.service.url}/sandbox/v1/{path}", params=params, headers=SANDBOX_KEY
            )
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    async def record(self, *customer_ids: str) -> None:
        """Keep these customers' new events (Stripe lists only the last 30 days: record as we go)."""
        after: str | None = None
        while True:
            page = await self.sandbox("events", limit=100, **({"starting_after": after} if after else {}))
            if any(evt["id"] in self.listed for evt in page["data"]):  # newest first: the rest were read
                page = {
                    **page,
                    "data": [evt for evt in page["data"] if evt["id"] not in self.listed],
                    "has_more": False,
                }
            for evt in page["data"]:
                self.listed.add(evt["id"])
                obj = evt["data"]["object"]
                if obj.get("customer") in customer_ids or (
                    obj.get("object") == "customer" and obj.get("id") in customer_ids
                ):
                    self.seen.setdefault(evt["id"], evt)
            if not page["has_more"]:
                return
            after = page["data"][-1]["id"]

    async def change(self, user_id: str, tier: Tier, interval: BillingInterval) -> None:
        """A plan change as the API makes it (upgrade now, downgrade on a schedule)."""
        database = self.service.database
        await change_plan(
            database=database,
            gateway=self.gateway,
            locks=CustomerLocks(database),
            catalog=load_catalog(),
            user_id=user_id,
            tier=tier,
            interval=interval,
        )

    async def link(self, customer_id: str) -> None:
        """The plan-change code acts on the user's account: let the sync create it first."""
        database = self.service.database
        await sync_customer(
            database=database,
            gateway=self.gateway,
            locks=CustomerLocks(database),
            customer_id=customer_id,
            now=utcnow(),
        )


async def _trial_upgrade_then_downgrade(driver: Driver) -> Lifecycle:
    """Starter with a trial -> paid -> Pro now (prorated invoice) -> back to Starter at the period end."""
    customer_id, _ = await subscribe(driver.service, driver.gateway, driver.prices, "u-up", "starter_monthly")
    await driver.record(customer_id)
    await advance(driver.service, 15 * DAY)
    await driver.record(customer_id)
    await driver.link(customer_id)
    await advance(driver.service, 5 * DAY)
    await driver.change("u-up", Tier.PRO, BillingInterval.MONTHLY)
    await driver.record(customer_id)
    await driver.change("u-up", Tier.STARTER, BillingInterval.MONTHLY)
    await driver.record(customer_id)
    return Lifecycle("u-up", customer_id, [])


async def _past_due_recovered_then_canceled(driver: Driver) -> Lifecycle:
    """No trial -> renewal fails (past_due) -> new card, the retry pays (active) -> cancel at period end."""
    customer_id, subscription_id = await subscribe(
        driver.service, driver.gateway, driver.prices, "u-due", "pro_monthly", trial_days=None
    )
    await driver.record(customer_id)
    await card_fails(driver.service, customer_id)
    await advance_past_renewal(driver.service, driver.gateway, subscription_id)
    await driver.record(customer_id)
    await card_fails(driver.service, customer_id, fails=False)
    await advance(driver.service, 4 * DAY)  # the first retry, 3 days after the failure
    await driver.record(customer_id)
    await driver.gateway.v1.subscriptions.update_async(subscription_id, {"cancel_at_period_end": True})
    await driver.record(customer_id)
    await advance_to(driver.service, await period_end(driver.gateway, subscription_id) + 60)
    await driver.record(customer_id)
    return Lifecycle("u-due", customer_id, [])


async def _annual_during_trial_then_dunning(driver: Driver) -> Lifecycle:
    """Pro with a trial -> annual during the trial -> cancel, then resume -> the first charge fails."""
    customer_id, subscription_id = await subscribe(
        driver.service, driver.gateway, driver.prices, "u-dun", "pro_monthly"
    )
    await driver.record(customer_id)
    await driver.link(customer_id)
    await driver.change("u-dun", Tier.PRO, BillingInterval.ANNUAL)
    await driver.gateway.v1.subscriptions.update_async(subscription_id, {"cancel_at_period_end": True})
    await driver.gateway.v1.subscriptions.update_async(subscription_id, {"cancel_at_period_end": False})
    await driver.record(customer_id)
    await card_fails(driver.service, customer_id)
    await advance(driver.service, 15 * DAY)
    await advance(driver.service, DAY)
    await driver.record(customer_id)
    return Lifecycle("u-dun", customer_id, [])


async def _customer_deleted_then_a_new_one(driver: Driver) -> Lifecycle:
    """Starter paid -> the customer is deleted in Stripe (its subscription ends) -> the same user
    checks out again as a new customer: the old customer's events must not undo the new one."""
    old, _ = await subscribe(
        driver.service, driver.gateway, driver.prices, "u-new", "starter_monthly", trial_days=None
    )
    await driver.record(old)
    await advance(driver.service, 3 * DAY)
    await driver.gateway.v1.customers.delete_async(old)
    await driver.record(old)
    customer_id, _ = await subscribe(
        driver.service, driver.gateway, driver.prices, "u-new", "pro_annual", trial_days=None
    )
    await driver.record(customer_id)
    return Lifecycle("u-new", customer_id, [])


async def _organisation_seats_change(driver: Driver) -> Lifecycle:
    """An organisation's customer (`metadata.orgId`) checks out 3 seats of Pro, then its seats go
    to 5 and to 4 with prorations invoiced at once: the row is the organisation's, seats included."""
    gateway = driver.gateway
    customer = await gateway.v1.customers.create_async({"metadata": {"orgId": "org_seats"}})
    session = await gateway.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "customer": customer.id,
            "line_items": [{"price": driver.prices["pro_monthly"], "quantity": 3}],
            "subscription_data": {"metadata": {"orgId": "org_seats"}},
            "success_url": "http://app.test/billing/success",
        }
    )
    await control(driver.service, f"checkout/{session.id}/complete", {"outcome": "paid"})
    await driver.record(customer.id)
    subscription = await gateway.v1.subscriptions.list_async({"customer": customer.id})
    (found,) = subscription.data
    for seats in (5, 4):
        await advance(driver.service, 3 * DAY)
        await gateway.v1.subscriptions.update_async(
            found.id,
            {
                "items": [{"id": found["items"].data[0].id, "quantity": seats}],
                "proration_behavior": "always_invoice",
            },
        )
        await driver.record(customer.id)
    return Lifecycle("org:org_seats", customer.id, [])


# name -> (the steps, where they leave the subscription: status, tier, interval, a pending change)
LIFECYCLES: dict[str, tuple[Callable[[Driver], Awaitable[Lifecycle]], tuple[str, str, str, bool]]] = {
    "trial-upgrade-downgrade": (_trial_upgrade_then_downgrade, ("active", "pro", "monthly", True)),
    "past-due-recovered-canceled": (_past_due_recovered_then_canceled, ("canceled", "pro", "monthly", False)),
    "annual-in-trial-past-due": (_annual_during_trial_then_dunning, ("past_due", "pro", "annual", False)),
    "customer-deleted-then-new": (_customer_deleted_then_a_new_one, ("active", "pro", "annual", False)),
    "organisation-seats": (_organisation_seats_change, ("active", "pro", "monthly", False)),
}


@pytest.fixture
def live_options() -> LiveOptions:
    """No background worker and no sandbox deliveries: the tests post every event and apply them."""
    return LiveOptions(
        settings={"webhook_worker": False, "usage_reporter": False}, sandbox={"deliver_webhooks": False}
    )


@dataclass
class Recorded:
    service: Service
    gateway: StripeGateway
    lifecycle: Lifecycle
    subscriptions: list[dict[str, Any]]  # the sandbox's, with each schedule under "_schedule"
    invoices: dict[str, dict[str, Any]]  # every invoice an event names, as the sandbox has it now


@pytest.fixture(params=sorted(LIFECYCLES))
async def recorded(request: pytest.FixtureRequest, live: Live) -> Recorded:
    driver = Driver(live.service, live.gateway, live.prices, {})
    steps, (status, tier, interval, pending) = LIFECYCLES[request.param]
    lifecycle = await steps(driver)
    lifecycle.events = sorted(driver.seen.values(), key=lambda e: (e["created"], e["id"]))
    listed = await driver.sandbox("subscriptions", customer=lifecycle.customer_id, status="all")
    subscriptions = listed["data"]
    for subscription in subscriptions:
        if subscription.get("schedule"):
            subscription["_schedule"] = await driver.sandbox(
                f"subscription_schedules/{subscription['schedule']}",
                **{"expand[]": "phases.items.price"},
            )
    invoice_ids = {  # the final customer's (a deleted customer's invoices are nobody's now)
        e["data"]["object"]["id"]
        for e in lifecycle.events
        if e["type"].startswith("invoice.") and e["data"]["object"]["customer"] == lifecycle.customer_id
    }
    invoices = {invoice_id: await driver.sandbox(f"invoices/{invoice_id}") for invoice_id in invoice_ids}
    (final,) = subscriptions  # the lifecycle went where it was meant to
    model = expected_row(final)
    assert (model["status"], model["tier"], model["interval"]) == (status, tier, interval)
    assert (model["pending_tier"] is not None) is pending
    assert "customer.subscription.created" in {e["type"] for e in lifecycle.events}
    return Recorded(live.service, live.gateway, lifecycle, subscriptions, invoices)


# The model: what the row must say, read from the sandbox's JSON ----------------------------------


def _time(seconds: int | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def _licensed(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The item that carries the plan (metered items are the usage prices)."""
    (item,) = [item for item in items if item["price"]["recurring"]["usage_type"] != "metered"]
    return item


def expected_row(subscription: dict[str, Any]) -> dict[str, Any]:
    licensed = _licensed(subscription["items"]["data"])
    price = licensed["price"]
    expected = {
        "stripe_subscription_id": subscription["id"],
        "status": subscription["status"],
        "stripe_price_id": price["id"],
        "tier": price["metadata"]["tier"],
        "interval": price["metadata"]["interval"],
        "current_period_start": _time(licensed["current_period_start"]),
        "current_period_end": _time(licensed["current_period_end"]),
        "trial_end": _time(subscription["trial_end"]),
        "cancel_at_period_end": subscription["cancel_at_period_end"],
        "canceled_at": _time(subscription["canceled_at"]),
        "pending_tier": None,
        "pending_interval": None,
        "pending_change_at": None,
    }
    if subscription["status"] in LIVE:  # seats follow a live subscription's plan quantity
        expected["seats"] = licensed["quantity"]
    schedule = subscription.get("_schedule")
    if schedule is not None and schedule["status"] in ("not_started", "active"):
        start = schedule["current_phase"]["start_date"]
        (upcoming,) = [phase for phase in schedule["phases"] if phase["start_date"] > start]
        metadata = _licensed(upcoming["items"])["price"]["metadata"]
        if (metadata["tier"], metadata["interval"]) != (expected["tier"], expected["interval"]):
            expected["pending_tier"] = metadata["tier"]
            expected["pending_interval"] = metadata["interval"]
            expected["pending_change_at"] = _time(upcoming["start_date"])
    return expected


# Delivery plans -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    events: tuple[int, ...]  # posted at once (copies included)
    drain: bool  # the worker then applies what is pending


@st.composite
def delivery_plans(draw: st.DrawFn, count: int) -> list[Round]:
    """A permutation of the events, extra copies anywhere after their first, in parallel rounds."""
    sequence = list(draw(st.permutations(range(count))))
    for _ in range(draw(st.integers(0, count))):
        position = draw(st.integers(1, len(sequence)))
        sequence.insert(position, draw(st.sampled_from(sequence[:position])))  # a late duplicate
    rounds: list[Round] = []
    while sequence:
        size = draw(st.integers(1, min(4, len(sequence))))
        rounds.append(Round(tuple(sequence[:size]), draw(st.booleans())))
        sequence = sequence[size:]
    return rounds


async def deliver(recorded: Recorded, plan: list[Round]) -> list[tuple[str, httpx.Response]]:
    service, events = recorded.service, recorded.lifecycle.events
    answers: list[tuple[str, httpx.Response]] = []
    async with httpx.AsyncClient(timeout=30) as client:
        for round_ in plan:
            responses = await asyncio.gather(
                *(post_event(client, service.url, events[i]) for i in round_.events)
            )
            answers.extend(
                (events[i]["id"], response) for i, response in zip(round_.events, responses, strict=True)
            )
            if round_.drain:
                await service.app.state.events.drain()
    await service.app.state.events.drain()
    return answers


async def check_final_state(recorded: Recorded, answers: list[tuple[str, httpx.Response]]) -> None:
    database, lifecycle = recorded.service.database, recorded.lifecycle
    event_ids = {e["id"] for e in lifecycle.events}

    assert all(response.status_code == 200 for _, response in answers), [r.text for _, r in answers]
    new = sorted(event_id for event_id, response in answers if response.json()["duplicate"] is False)
    assert new == sorted(event_ids)  # exactly one copy of each was news

    async with database.read() as conn:
        inbox = {
            row.id: row.status for row in await conn.execute(select(event_table.c.id, event_table.c.status))
        }
        invoices = {row.id: row for row in await conn.execute(select(invoice_table))}
    assert set(inbox) == event_ids
    assert set(inbox.values()) <= {"processed", "ignored"}, inbox

    (subscription,) = recorded.subscriptions
    row = await account(database, lifecycle.user_id)
    assert row is not None and row.stripe_customer_id == lifecycle.customer_id
    stored = {name: getattr(row, name) for name in expected_row(subscription)}
    assert stored == expected_row(subscription)
    assert row.trial_used is (subscription["trial_start"] is not None)

    for invoice_id, invoice in recorded.invoices.items():
        kept = invoices[invoice_id]
        assert (kept.status, kept.amount_due, kept.amount_paid, kept.total) == (
            invoice["status"],
            invoice["amount_due"],
            invoice["amount_paid"],
            invoice["total"],
        ), invoice_id


async def check_ledger(database: Database, user_id: str) -> None:
    """The account's ledger: each row one change (its before the previous row's after), caused by
    events the inbox holds (or a mutation), and the last row the account's state: a duplicated,
    late or shuffled event added no row."""
    async with database.read() as conn:
        query = select(ledger_table).where(ledger_table.c.user_id == user_id).order_by(ledger_table.c.id)
        rows = (await conn.execute(query)).mappings().all()
        inbox = set((await conn.execute(select(event_table.c.id))).scalars())
    assert rows
    previous: dict[str, Any] | None = None
    for row in rows:
        assert row["changed"], row
        assert row["before"] == previous, (row, previous)
        assert all((previous or {}).get(name) != row["after"][name] for name in row["changed"]), row
        assert all(cause["id"] in inbox or cause["type"] == "mutation" for cause in row["causes"]), row
        previous = row["after"]
    stored = await account(database, user_id)
    assert previous is not None
    assert {name: previous[name] for name in ACCOUNT_FIELDS} == {
        name: plain(getattr(stored, name)) for name in ACCOUNT_FIELDS
    }


# The same examples every run (CI is reproducible); fixtures are reset per example by the test.
EXAMPLES = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@settings(EXAMPLES, max_examples=15)
@given(data=st.data())
async def test_any_interleaving_with_duplicates_ends_in_the_sandboxs_state(
    recorded: Recorded, data: st.DataObject
) -> None:
    await truncate_all(recorded.service.database)  # each example starts from empty tables
    plan = data.draw(delivery_plans(len(recorded.lifecycle.events)), label="delivery plan")
    answers = await deliver(recorded, plan)
    await check_final_state(recorded, answers)
    await check_ledger(recorded.service.database, recorded.lifecycle.user_id)


# Late deliveries while the lifecycle goes on ----------------------------------------------------
#
# Above, every event is delivered after the lifecycle ended, so every sync reads the final state.
# Here hypothesis also drives the lifecycle (plan changes, cancellation toggles, the customer
# deleted and a new one made for the same user) and, after each step, delivers only some of the
# events made so far, in any order, holding the others back for later: syncs then read Stripe
# mid-way, the database lags, and late events land on newer rows. Once everything has arrived,
# the row must still equal the sandbox's subscription of the user's current customer.

STEPS = ("upgrade", "downgrade", "toggle_cancel", "new_customer", "cancel_now")


@dataclass
class Examples:
    """What the examples of one test carry over: the sandbox keeps earlier examples' customers."""

    users: int = 0
    listed: set[str] = field(default_factory=set)  # the sandbox's events read by earlier examples


@pytest.fixture
def examples() -> Examples:
    return Examples()


@settings(EXAMPLES, max_examples=8)
@given(data=st.data())
async def test_events_held_back_while_the_lifecycle_goes_on_still_end_in_the_sandboxs_state(
    live: Live, examples: Examples, data: st.DataObject
) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    await truncate_all(service.database)
    examples.users += 1
    user = f"u-late-{examples.users}"  # the sandbox keeps earlier examples' customers: a new user each time
    driver = Driver(service, gateway, prices, {}, examples.listed)
    customers: list[str] = []
    delivered: set[str] = set()

    async def new_customer(lookup_key: str) -> str:
        customer_id, subscription_id = await subscribe(
            service, gateway, prices, user, lookup_key, trial_days=None
        )
        customers.append(customer_id)
        return subscription_id

    async def deliver_some(everything: bool = False) -> None:
        await driver.record(*customers)
        waiting = sorted(set(driver.seen) - delivered)
        chosen = (
            waiting
            if everything
            else data.draw(
                st.lists(st.sampled_from(waiting), unique=True) if waiting else st.just([]),
                label="delivered now",
            )
        )
        order = data.draw(st.permutations(chosen), label="in this order")
        async with httpx.AsyncClient(timeout=30) as client:
            for event_id in order:
                response = await post_event(client, service.url, driver.seen[event_id])
                assert response.status_code == 200, response.text
                delivered.add(event_id)
        if everything or data.draw(st.booleans(), label="worker runs"):
            await service.app.state.events.drain()

    subscription_id = await new_customer("starter_monthly")
    await deliver_some()
    for step in data.draw(st.lists(st.sampled_from(STEPS), min_size=1, max_size=4), label="lifecycle"):
        current = await gateway.v1.subscriptions.retrieve_async(subscription_id)
        if step == "new_customer" or current.status == "canceled":
            await gateway.v1.customers.delete_async(customers[-1])
            subscription_id = await new_customer("pro_monthly")
        elif step in ("upgrade", "downgrade"):
            (item,) = [i for i in current["items"].data if i.price.recurring.usage_type != "metered"]
            target = prices["pro_monthly" if step == "upgrade" else "starter_monthly"]
            await gateway.v1.subscriptions.update_async(
                subscription_id, {"items": [{"id": item.id, "price": target}], "proration_behavior": "none"}
            )
        elif step == "toggle_cancel":
            await gateway.v1.subscriptions.update_async(
                subscription_id, {"cancel_at_period_end": not current.cancel_at_period_end}
            )
        else:
            await gateway.v1.subscriptions.cancel_async(subscription_id)
        await deliver_some()
    await deliver_some(everything=True)

    listed = await driver.sandbox("subscriptions", customer=customers[-1], status="all")
    (subscription,) = listed["data"]
    row = await account(service.database, user)
    assert row is not None and row.stripe_customer_id == customers[-1], (row, customers)
    assert {name: getattr(row, name) for name in expected_row(subscription)} == expected_row(subscription)
    async with service.database.read() as conn:
        statuses = set((await conn.execute(select(event_table.c.status))).scalars())
    assert statuses <= {"processed", "ignored"}, statuses
    await check_ledger(service.database, user)
