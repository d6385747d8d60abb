"""Events are hints: any order, any duplicates, one final state, equal to Stripe's."""

from __future__ import annotations

import itertools
import random
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select, text

from billing.clock import utcnow
from billing.plans import plan_of_price
from billing.stripe_gateway import StripeGateway
from billing.stripe_objects import stripe_time
from billing.stripe_state import licensed_item
from billing.webhooks import requeue
from db.engine import Database
from db.models import account_table, event_table
from tests.billing_flows import account, advance, raw_events, subscribe
from tests.conftest import Service
from tests.live import Live, LiveOptions
from tests.stripe_events import post_event

DAY = 86_400


@pytest.fixture
def live_options() -> LiveOptions:
    """No background worker and no automatic delivery: the test posts and applies events itself."""
    return LiveOptions(settings={"webhook_worker": False}, sandbox={"deliver_webhooks": False})


async def lifecycle(
    service: Service, gateway: StripeGateway, prices: dict[str, str]
) -> tuple[str, list[dict[str, Any]]]:
    """created -> updated (trialing -> active) -> updated (cancel_at_period_end) -> deleted."""
    _, subscription_id = await subscribe(service, gateway, prices, "u1", "pro_monthly")
    await advance(service, 15 * DAY)
    await gateway.v1.subscriptions.update_async(subscription_id, {"cancel_at_period_end": True})
    await gateway.v1.subscriptions.cancel_async(subscription_id)
    events = [
        e
        for e in await raw_events(service)
        if e["type"].startswith("customer.subscription.")
        and e["data"]["object"]["id"] == subscription_id
        and e["type"] != "customer.subscription.trial_will_end"
    ]
    return subscription_id, events


async def reset(database: Database) -> None:
    async with database.write() as conn:
        await conn.execute(delete(event_table))
        await conn.execute(delete(account_table))


async def apply_in_order(service: Service, events: list[dict[str, Any]]) -> None:
    async with httpx.AsyncClient() as client:
        for evt in events:
            response = await post_event(client, service.url, evt)
            assert response.status_code == 200
            await service.app.state.events.drain()


def assert_row_matches(row: Any, subscription: Any) -> None:
    item = licensed_item(subscription)
    assert row.status == subscription.status
    assert row.stripe_subscription_id == subscription.id
    assert (row.tier, row.interval) == plan_of_price(item.price)
    assert row.current_period_end == stripe_time(item.current_period_end)
    assert row.cancel_at_period_end == subscription.cancel_at_period_end
    assert row.canceled_at == stripe_time(subscription.canceled_at)
    assert row.trial_end == stripe_time(subscription.trial_end)
    assert row.trial_used is True


async def test_every_permutation_with_stale_duplicates_ends_in_stripes_state(live: Live) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    subscription_id, events = await lifecycle(service, gateway, prices)
    types = [e["type"] for e in events]
    assert types[0] == "customer.subscription.created" and types[-1] == "customer.subscription.deleted"
    assert types.count("customer.subscription.updated") >= 2
    final = await gateway.v1.subscriptions.retrieve_async(subscription_id)
    shuffler = random.Random(7)

    for order in itertools.permutations(events):
        sequence = list(order)
        for _ in range(2):  # stale copies of earlier events, interleaved
            position = shuffler.randrange(1, len(sequence) + 1)
            sequence.insert(position, shuffler.choice(sequence[:position]))
        await reset(service.database)
        await apply_in_order(service, sequence)
        assert_row_matches(await account(service.database, "u1"), final)


async def test_an_update_before_its_create_still_converges(live: Live) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    _, subscription_id = await subscribe(service, gateway, prices, "u1", "starter_monthly")
    (created,) = await raw_events(service, type="customer.subscription.created")
    await gateway.v1.subscriptions.update_async(subscription_id, {"cancel_at_period_end": True})
    updated = (await raw_events(service, type="customer.subscription.updated"))[-1]

    await apply_in_order(service, [updated, created])
    assert_row_matches(
        await account(service.database, "u1"), await gateway.v1.subscriptions.retrieve_async(subscription_id)
    )


async def test_pending_events_of_one_customer_are_coalesced_into_one_sync(live: Live) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    _, events = await lifecycle(service, gateway, prices)
    async with httpx.AsyncClient() as client:
        for evt in events:
            assert (await post_event(client, service.url, evt)).status_code == 200
    report = await service.app.state.events.drain()
    assert report.processed == len(events)
    assert len(report.syncs) == 1


async def test_a_database_error_mid_handler_is_recorded_and_replay_fixes_it(live: Live) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    database = service.database
    async with database.write() as conn:
        if database.is_postgres:
            await conn.execute(
                text(
                    "CREATE FUNCTION boom() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$ LANGUAGE plpgsql"
                )
            )
            await conn.execute(
                text(
                    "CREATE TRIGGER boom BEFORE INSERT ON billing_account FOR EACH ROW EXECUTE FUNCTION boom()"
                )
            )
        else:
            await conn.execute(
                text(
                    "CREATE TRIGGER boom BEFORE INSERT ON billing_account BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
                )
            )
    try:
        _, subscription_id = await subscribe(service, gateway, prices, "u1", "starter_monthly")
        (created,) = await raw_events(service, type="customer.subscription.created")
        async with httpx.AsyncClient() as client:
            assert (await post_event(client, service.url, created)).status_code == 200
        report = await service.app.state.events.drain()
        assert report.failed == 1
        async with database.read() as conn:
            stored = (await conn.execute(select(event_table).where(event_table.c.id == created["id"]))).one()
        assert stored.status == "pending" and "injected failure" in stored.last_error
        assert await account(database, "u1") is None  # nothing half-applied
    finally:
        async with database.write() as conn:
            await conn.execute(
                text("DROP TRIGGER boom" + (" ON billing_account" if database.is_postgres else ""))
            )
            if database.is_postgres:
                await conn.execute(text("DROP FUNCTION boom()"))

    assert await requeue(database, event_id=created["id"], now=utcnow()) == 1
    report = await service.app.state.events.drain()
    assert report.processed == 1
    assert_row_matches(
        await account(database, "u1"), await gateway.v1.subscriptions.retrieve_async(subscription_id)
    )
