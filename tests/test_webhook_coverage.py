"""Each kind of Stripe event does what it should; odd cases are recorded, not lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import select, update

from billing.clock import utcnow
from billing.notifier import NotificationKind
from billing.reconcile import customer_ids, reconcile
from billing.webhooks import HANDLED, target_of
from db.engine import Database
from db.models import account_table, event_table
from tests.billing_flows import (
    account,
    checkout,
    control,
    raw_events,
    subscribe,
    wait_for_account,
)
from tests.conftest import DbTarget
from tests.live import Live, LiveOptions, Recorder, start_live
from tests.stripe_events import event, post_event


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def live_options(recorder: Recorder) -> LiveOptions:
    """The service's notifications are kept."""
    return LiveOptions(notifier=recorder)


async def event_status(database: Database, event_id: str) -> tuple[str, str | None]:
    for _ in range(300):
        async with database.read() as conn:
            row = (await conn.execute(select(event_table).where(event_table.c.id == event_id))).first()
        if row is not None and row.status not in ("pending", "processing"):
            return row.status, row.last_error
        await asyncio.sleep(0.05)
    raise AssertionError(f"{event_id} never finished")


async def test_an_unknown_event_type_is_acknowledged_and_recorded_as_ignored(live: Live) -> None:
    service = live.service
    evt = event("charge.succeeded", {"id": "ch_1", "object": "charge"})
    async with httpx.AsyncClient() as client:
        response = await post_event(client, service.url, evt)
    assert response.status_code == 200
    assert (await event_status(service.database, evt["id"]))[0] == "ignored"


def test_the_worker_acts_on_exactly_the_handled_event_types() -> None:
    obj = {"id": "obj_1", "object": "any", "customer": "cus_1", "mode": "subscription"}
    for event_type in HANDLED:
        assert target_of(event_type, {"data": {"object": obj}}) is not None, event_type
    for event_type in ("charge.succeeded", "customer.created", "payment_intent.succeeded"):
        assert target_of(event_type, {"data": {"object": obj}}) is None, event_type


async def test_checkout_links_the_customer_to_the_user_by_client_reference_id(live: Live) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    customer = await gateway.v1.customers.create_async({"email": "no-metadata@example.com"})
    session = await gateway.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "customer": customer.id,
            "client_reference_id": "u-ref",
            "line_items": [{"price": prices["starter_monthly"], "quantity": 1}],
            "success_url": "http://app.test/ok",
            "cancel_url": "http://app.test/no",
        }
    )
    await control(service, f"checkout/{session.id}/complete", {"outcome": "paid"})
    row = await wait_for_account(service.database, "u-ref", status="active")
    assert row.stripe_customer_id == customer.id and row.tier == "starter"


@pytest.fixture
async def undelivered(database: Database, sandbox_db: DbTarget, recorder: Recorder) -> AsyncIterator[Live]:
    """The sandbox keeps its events: the test decides which ones reach the route."""
    options = LiveOptions(notifier=recorder, sandbox={"deliver_webhooks": False})
    async with start_live(database, sandbox_db, options) as live:
        yield live


async def test_an_unknown_customer_is_recorded_then_fixed_by_billing_sync(
    undelivered: Live, recorder: Recorder
) -> None:
    service, gateway, prices = undelivered.service, undelivered.gateway, undelivered.prices
    customer = await gateway.v1.customers.create_async({"email": "stranger@example.com"})
    session = await gateway.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "customer": customer.id,
            "line_items": [{"price": prices["pro_annual"], "quantity": 1}],
            "success_url": "http://app.test/ok",
            "cancel_url": "http://app.test/no",
        }
    )
    await control(service, f"checkout/{session.id}/complete", {"outcome": "paid"})
    (created,) = await raw_events(service, type="customer.subscription.created")
    async with httpx.AsyncClient() as client:
        assert (await post_event(client, service.url, created)).status_code == 200
    status, note = await event_status(service.database, created["id"])
    assert status == "ignored" and "unknown customer" in (note or "")
    async with service.database.read() as conn:
        assert (await conn.execute(select(account_table))).all() == []

    # The host app tells Stripe who this is; `billing sync` then creates the account.
    await gateway.v1.customers.update_async(customer.id, {"metadata": {"userId": "u-late"}})
    ids = await customer_ids(database=service.database, gateway=gateway)
    report = await reconcile(
        database=service.database, gateway=gateway, notifier=recorder, customers=ids, now=utcnow()
    )
    row = await wait_for_account(service.database, "u-late", status="active", tier="pro", interval="annual")
    assert row.stripe_customer_id == customer.id
    assert any(r.created_account and r.user_id == "u-late" for r in report.results)


async def test_billing_sync_repairs_drift_and_a_dry_run_only_reports_it(
    undelivered: Live, recorder: Recorder
) -> None:
    service, gateway, prices = undelivered.service, undelivered.gateway, undelivered.prices
    await subscribe(service, gateway, prices, "u1", "starter_monthly")
    ids = await customer_ids(database=service.database, gateway=gateway)
    first = await reconcile(
        database=service.database, gateway=gateway, notifier=recorder, customers=ids, now=utcnow()
    )
    assert [r.user_id for r in first.results if r.created_account] == ["u1"]  # from metadata.userId
    await wait_for_account(service.database, "u1", status="trialing")
    async with service.database.write() as conn:  # drift: someone edited the row by hand
        await conn.execute(update(account_table).values(status="canceled", tier="pro"))

    dry = await reconcile(
        database=service.database,
        gateway=gateway,
        notifier=recorder,
        customers=ids,
        now=utcnow(),
        dry_run=True,
    )
    assert [(r.user_id, sorted(r.changes)) for r in dry.drifted] == [("u1", ["status", "tier"])]
    assert (await account(service.database, "u1")).status == "canceled"

    fixed = await reconcile(
        database=service.database, gateway=gateway, notifier=recorder, customers=ids, now=utcnow()
    )
    assert fixed.drifted[0].changes["status"] == ("canceled", "trialing")
    row = await account(service.database, "u1")
    assert (row.status, row.tier) == ("trialing", "starter")
    again = await reconcile(
        database=service.database, gateway=gateway, notifier=recorder, customers=ids, now=utcnow()
    )
    assert again.drifted == []


async def test_two_live_subscriptions_follow_the_higher_tier_and_are_flagged(
    live: Live, recorder: Recorder
) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    customer_id, first_session = await checkout(gateway, prices, "u2", "starter_monthly", trial_days=None)
    second = await gateway.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "customer": customer_id,
            "client_reference_id": "u2",
            "line_items": [{"price": prices["pro_monthly"], "quantity": 1}],
            "success_url": "http://app.test/ok",
            "cancel_url": "http://app.test/no",
        }
    )
    await control(service, f"checkout/{first_session}/complete", {"outcome": "paid"})
    await control(service, f"checkout/{second.id}/complete", {"outcome": "paid"})  # a second tab
    await wait_for_account(service.database, "u2", status="active", tier="pro")
    for _ in range(200):
        flagged = [n for n in recorder.sent if n.kind is NotificationKind.MULTIPLE_LIVE_SUBSCRIPTIONS]
        if flagged:
            break
        await asyncio.sleep(0.05)
    assert flagged and flagged[0].user_id == "u2" and len(flagged[0].details["subscriptions"]) == 2


async def test_a_deleted_customer_unlinks_the_account(live: Live) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    customer_id, _ = await subscribe(service, gateway, prices, "u3", "starter_monthly", trial_days=None)
    await wait_for_account(service.database, "u3", status="active")
    await gateway.v1.customers.delete_async(customer_id)
    row = await wait_for_account(service.database, "u3", stripe_customer_id=None)
    assert row.status == "canceled"


async def test_payment_action_required_notifies(live: Live, recorder: Recorder) -> None:
    service, gateway, prices = live.service, live.gateway, live.prices
    customer_id, _ = await subscribe(service, gateway, prices, "u4", "starter_monthly", trial_days=None)
    await wait_for_account(service.database, "u4", status="active")
    invoice = (await raw_events(service, type="invoice.paid"))[-1]["data"]["object"]
    evt = event("invoice.payment_action_required", invoice)
    async with httpx.AsyncClient() as client:
        assert (await post_event(client, service.url, evt)).status_code == 200
    assert (await event_status(service.database, evt["id"]))[0] == "processed"
    sent = [n for n in recorder.sent if n.kind is NotificationKind.PAYMENT_ACTION_REQUIRED]
    assert [(n.user_id, n.stripe_customer_id, n.details["object"]) for n in sent] == [
        ("u4", customer_id, invoice["id"])
    ]
