"""A subscriber's lifecycle on the sandbox yields exactly the expected host events, each once,
in causal order per account; duplicate, reordered and replayed Stripe events add none."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from billing.clock import utcnow
from billing.stripe_gateway import StripeGateway
from billing.webhooks import requeue
from db.engine import Database
from db.models import event_table, host_event_table
from tests.billing_flows import (
    advance,
    advance_past_renewal,
    advance_to,
    card_fails,
    control,
    eventually,
    period_end,
    setup_catalog,
    subscribe,
    wait_for_account,
)
from tests.conftest import DbTarget, Service, running_service
from tests.gateways import sandbox_gateway
from tests.graphql_support import hs256_token
from tests.host_receiver import SECRET, HostReceiver, run_host_receiver

DAY = 86_400
HOUR = 3_600


@dataclass
class Live:
    service: Service
    gateway: StripeGateway
    prices: dict[str, str]
    receiver: HostReceiver


@pytest.fixture(params=["ordered", "shuffled_duplicated"])
async def live(
    request: pytest.FixtureRequest, database: Database, sandbox_db: DbTarget
) -> AsyncIterator[Live]:
    async with (
        run_host_receiver(SECRET) as receiver,
        running_service(
            database,
            sandbox_db,
            host_webhook_url=receiver.url,
            host_webhook_secret=SECRET,
            host_webhook_retry_schedule="0.2,0.5,1",
        ) as service,
    ):
        await control(service, "delivery", {"mode": request.param})
        gateway = sandbox_gateway(service.url)
        try:
            yield Live(service, gateway, await setup_catalog(gateway), receiver)
        finally:
            await gateway.close()


async def outbox_count(database: Database) -> int:
    async with database.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(host_event_table))).scalar_one())


async def all_delivered(live: Live) -> None:
    """Wait until the outbox is empty of pending events and the receiver has them all."""

    async def undelivered() -> int:
        async with live.service.database.read() as conn:
            query = select(func.count()).where(host_event_table.c.status != "delivered")
            return int((await conn.execute(query)).scalar_one())

    await eventually(lambda: undelivered_none(undelivered), what="every host event is delivered", seconds=30)
    total = await outbox_count(live.service.database)
    await live.receiver.wait_for(lambda r: len(r.delivered) >= total, within=30)


async def undelivered_none(undelivered: Any) -> bool | None:
    return True if await undelivered() == 0 else None


def of(receiver: HostReceiver, *types: str) -> list[dict[str, Any]]:
    return [d.event for d in receiver.delivered if d.type in types]


async def test_a_subscribers_lifecycle_yields_each_event_once_in_causal_order(live: Live) -> None:
    service, gateway, prices, receiver = live.service, live.gateway, live.prices, live.receiver
    customer_id, subscription_id = await subscribe(service, gateway, prices, "u1", "pro_monthly")
    await wait_for_account(service.database, "u1", status="trialing")
    await receiver.wait_for(lambda r: {"checkout.completed", "subscription.created"} <= set(r.types()))

    await advance(service, 15 * DAY)  # the 3-day notice, then the trial ends and the first charge
    await wait_for_account(service.database, "u1", status="active")
    await receiver.wait_for(lambda r: "trial.ending" in r.types())

    await card_fails(service, customer_id)
    await advance_past_renewal(service, gateway, subscription_id)
    await wait_for_account(service.database, "u1", status="past_due")
    await receiver.wait_for(lambda r: "payment.failed" in r.types())
    failed_at = await period_end(gateway, subscription_id)

    await card_fails(service, customer_id, fails=False)
    await advance(service, 3 * DAY + HOUR)  # the retry succeeds
    await wait_for_account(service.database, "u1", status="active")
    await receiver.wait_for(lambda r: "payment.recovered" in r.types())
    assert failed_at  # (the period moved on at the failed renewal)

    current = await gateway.v1.subscriptions.retrieve_async(subscription_id)
    (item,) = [i for i in current["items"].data if i.price.recurring.usage_type != "metered"]
    await gateway.v1.subscriptions.update_async(
        subscription_id,
        {"items": [{"id": item.id, "price": prices["pro_annual"]}], "proration_behavior": "none"},
    )
    await wait_for_account(service.database, "u1", interval="annual")

    await gateway.v1.subscriptions.update_async(subscription_id, {"cancel_at_period_end": True})
    await wait_for_account(service.database, "u1", cancel_at_period_end=True)
    await advance_to(service, await period_end(gateway, subscription_id) + 60)
    await wait_for_account(service.database, "u1", status="canceled")
    await all_delivered(live)
    await receiver.settle(quiet=1.0)

    types = receiver.types()
    counts = Counter(types)
    assert counts["checkout.completed"] == 1
    assert counts["subscription.created"] == 1
    assert counts["trial.ending"] == 1
    assert counts["payment.recovered"] == 1
    assert counts["subscription.canceled"] == 1
    assert counts["payment.failed"] >= 1
    assert counts["invoice.paid"] >= 3  # the trial's $0 invoice, the first charge, the retried renewal
    assert set(types) <= {
        "checkout.completed",
        "subscription.created",
        "subscription.updated",
        "subscription.canceled",
        "trial.ending",
        "payment.failed",
        "payment.recovered",
        "invoice.paid",
    }
    # Each webhook-id once as delivered; no Stripe object named twice.
    ids = [d.message_id for d in receiver.delivered]
    assert len(ids) == len(set(ids)) == await outbox_count(service.database)

    # Causal order of the account's state: what each subscription.* event says, in delivery order.
    lifecycle = [
        (e["type"], e["data"]["subscription"]["status"], e["data"]["subscription"]["interval"])
        for e in of(receiver, "subscription.created", "subscription.updated", "subscription.canceled")
    ]
    assert lifecycle[0] == ("subscription.created", "TRIALING", "MONTHLY")
    assert lifecycle[-1][:2] == ("subscription.canceled", "CANCELED")
    statuses = [status for _, status, _ in lifecycle]
    assert statuses.index("PAST_DUE") < max(i for i, s in enumerate(statuses) if s == "ACTIVE")
    assert ("subscription.updated", "ACTIVE", "ANNUAL") in lifecycle
    assert types.index("trial.ending") < types.index("payment.failed") < types.index("payment.recovered")
    assert types.index("payment.recovered") < types.index("subscription.canceled")

    # The data: the user, the Stripe ids, the state in the BillingSubscription shape.
    created = of(receiver, "subscription.created")[0]["data"]
    assert (created["userId"], created["stripeCustomerId"]) == ("u1", customer_id)
    assert created["stripeSubscriptionId"] == subscription_id
    assert created["subscription"]["tier"] == "PRO" and created["subscription"]["hasAccess"] is True
    assert set(created["subscription"]) == {
        "status",
        "tier",
        "effectiveTier",
        "hasAccess",
        "interval",
        "priceId",
        "currentPeriodStart",
        "currentPeriodEnd",
        "trialEnd",
        "cancelAtPeriodEnd",
        "canceledAt",
        "trialUsed",
        "pendingChange",
    }
    canceled = of(receiver, "subscription.canceled")[0]["data"]
    assert canceled["subscription"]["hasAccess"] is False
    assert canceled["previous"]["status"] == "ACTIVE"
    failed = of(receiver, "payment.failed")[0]["data"]
    assert failed["invoiceId"].startswith("in_") and failed["userId"] == "u1"

    # Every Stripe event applied again (a replay, late duplicates): no new host event.
    before = await outbox_count(service.database)
    async with service.database.read() as conn:
        stripe_ids = list((await conn.execute(select(event_table.c.id))).scalars())
    for event_id in stripe_ids:
        await requeue(service.database, event_id=event_id, now=utcnow())
    report = await service.app.state.events.drain()
    assert report.failed == 0
    assert await outbox_count(service.database) == before


async def test_a_change_made_by_a_mutation_sends_its_event_once(live: Live) -> None:
    """The mutation's own sync (not only the webhook's) writes the event: whichever sync sees the
    change first writes it, and the other one sees no change."""
    service, gateway, prices, receiver = live.service, live.gateway, live.prices, live.receiver
    await subscribe(service, gateway, prices, "m1", "starter_monthly", trial_days=None)
    await wait_for_account(service.database, "m1", status="active")
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(
            f"{service.url}/graphql",
            json={"query": "mutation { cancelSubscription { cancelAtPeriodEnd } }"},
            headers={"Authorization": f"Bearer {hs256_token('m1')}"},
        )
    assert response.json() == {"data": {"cancelSubscription": {"cancelAtPeriodEnd": True}}}
    await receiver.wait_for(
        lambda r: any(e["data"]["subscription"]["cancelAtPeriodEnd"] for e in of(r, "subscription.updated"))
    )
    await all_delivered(live)
    await receiver.settle(quiet=1.0)
    updates = of(receiver, "subscription.updated")
    assert [e["data"]["subscription"]["cancelAtPeriodEnd"] for e in updates] == [True]
    assert updates[0]["data"]["previous"]["cancelAtPeriodEnd"] is False
