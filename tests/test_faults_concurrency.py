"""Fault matrix, concurrency: things that happen at once end in Stripe's state, each effect once.

| row | where |
|---|---|
| two (five) checkouts of the same new user at once: one customer, one account row, one open session | `test_mutations_checkout.py::test_concurrent_checkouts_of_a_new_user_make_one_customer_and_one_account`, `::test_racing_tokens_with_different_emails_still_leave_one_live_customer` |
| checkout confirmation racing its own webhooks (and their duplicates) | here: `test_a_confirmation_racing_its_own_webhooks_ends_in_stripes_state_once` |
| a plan change racing the renewal and its webhooks | here: `test_an_upgrade_racing_the_renewal_ends_in_stripes_state` |
| usage recorded while the period rolls over (renewal written meanwhile) | here: `test_usage_recorded_while_the_period_rolls_over_is_counted_once_in_the_right_window`; the window arithmetic itself: `test_usage_windows.py::test_a_monthly_window_rolls_over_at_the_period_end` |
| concurrent recordings of one key / of distinct keys | `test_usage_recording.py::test_concurrent_recordings_of_one_key_count_once`, `::test_concurrent_recordings_of_distinct_keys_lose_nothing` |
| concurrent calls just under a quota | `test_usage_quota.py::test_concurrent_calls_just_under_the_limit_overshoot_by_at_most_the_calls_in_flight` |
| parallel duplicate webhooks, two processes | `test_webhook_idempotency.py::test_ten_parallel_copies_cause_one_effect`, `::test_copies_sent_to_two_processes_cause_one_effect` |
| concurrent report drainers | `test_usage_reporting.py::test_two_drainers_at_once_report_every_aggregate_exactly_once` |

Every row runs on PostgreSQL and SQLite.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from billing.stripe_gateway import StripeGateway
from billing.stripe_objects import stripe_time
from db.engine import Database
from db.models import account_table, event_table, invoice_table, rollup_table, usage_table
from tests.billing_flows import advance, control, raw_events
from tests.checkout_flows import confirm, create_checkout, pay, token
from tests.conftest import DbTarget, Service
from tests.graphql_support import SERVICE_KEY, hs256_token, insert_account, serve_api
from tests.live import CHANGE, Live, LiveOptions, item_of, start_live
from tests.stripe_events import post_event

HOUR = 3_600


async def the_account(database: Database, user_id: str) -> Any:
    async with database.read() as conn:
        (row,) = (await conn.execute(select(account_table).where(account_table.c.user_id == user_id))).all()
    return row


async def stored_invoices(database: Database) -> list[tuple[str, str]]:
    async with database.read() as conn:
        rows = await conn.execute(
            select(invoice_table.c.id, invoice_table.c.status).order_by(invoice_table.c.id)
        )
        return [(row.id, row.status) for row in rows]


async def stripe_invoices(gateway: StripeGateway, customer_id: str) -> list[tuple[str, str]]:
    found = await gateway.v1.invoices.list_async({"customer": customer_id, "limit": 100})
    return sorted((invoice.id, str(invoice.status)) for invoice in found.data if invoice.status != "draft")


async def inbox_statuses(database: Database) -> set[str]:
    async with database.read() as conn:
        return {str(status) for status in (await conn.execute(select(event_table.c.status))).scalars()}


def assert_row_is_stripes(row: Any, subscription: Any) -> None:
    item = item_of(subscription)
    price = item.price
    assert row.stripe_subscription_id == subscription.id
    assert (row.status, row.stripe_price_id) == (subscription.status, price.id)
    assert (row.tier, row.interval) == (price.metadata["tier"], price.metadata["interval"])
    assert (row.current_period_start, row.current_period_end) == (
        stripe_time(item.current_period_start),
        stripe_time(item.current_period_end),
    )


# Checkout racing its own webhook -----------------------------------------------------------------


@pytest.fixture
async def lagging(database: Database, sandbox_db: DbTarget) -> AsyncIterator[Live]:
    """No background webhook worker: the test decides when the inbox is applied."""
    async with start_live(database, sandbox_db, LiveOptions(settings={"webhook_worker": False})) as live:
        yield live


async def test_a_confirmation_racing_its_own_webhooks_ends_in_stripes_state_once(lagging: Live) -> None:
    service, gateway = lagging.service, lagging.gateway
    user = token("vic")
    session = await create_checkout(service, user)
    assert (await pay(session["url"])).status_code == 303
    await control(service, "delivery/flush", {"timeout": 20})  # in the inbox, not applied yet
    events = await raw_events(service)

    async def redeliver() -> list[int]:  # Stripe sending the same events again meanwhile
        async with httpx.AsyncClient(timeout=30) as client:
            return [(await post_event(client, service.url, evt)).status_code for evt in events]

    processor = service.app.state.events
    results = await asyncio.gather(
        confirm(service, user, session["id"]),
        processor.drain(),
        confirm(service, user, session["id"]),
        redeliver(),
        processor.drain(),
    )
    await processor.drain()  # whatever the redelivery stored after the drains looked

    first, second = results[0], results[2]
    for result in (first, second):
        assert "errors" not in result, result
        assert result["data"]["confirmCheckoutSession"]["status"] == "TRIALING"
    assert set(results[3]) == {200}
    row = await the_account(service.database, "vic")
    stripe_session = await gateway.v1.checkout.sessions.retrieve_async(session["id"])
    subscriptions = await gateway.v1.subscriptions.list_async(
        {"customer": row.stripe_customer_id, "status": "all"}
    )
    assert len(subscriptions.data) == 1 and stripe_session.subscription == subscriptions.data[0].id
    assert_row_is_stripes(row, subscriptions.data[0])
    assert await stored_invoices(service.database) == await stripe_invoices(gateway, row.stripe_customer_id)
    assert await inbox_statuses(service.database) <= {"processed", "ignored"}


# A plan change racing the renewal ------------------------------------------------------------------


async def sandbox_now(service: Service) -> int:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{service.url}/sandbox/_control/clock")
    assert response.status_code == 200, response.text
    return int(response.json()["now"])


async def test_an_upgrade_racing_the_renewal_ends_in_stripes_state(live: Live) -> None:
    service = live.service
    customer_id, subscription_id = await live.subscribe("wes", "starter_monthly")
    end = item_of(await live.subscription(subscription_id)).current_period_end
    await advance(service, end - await sandbox_now(service) - 60)  # a minute before the renewal
    await live.settle()

    # The renewal (period end, invoice charged an hour later) and its webhooks while the user upgrades.
    changed, _renewal = await asyncio.gather(
        live.graphql("wes", CHANGE, {"tier": "PRO", "interval": "MONTHLY"}), advance(service, 2 * HOUR)
    )
    await live.settle()

    assert "errors" not in changed, changed
    subscription = await live.subscription(subscription_id)
    assert item_of(subscription).price.id == live.prices["pro_monthly"]
    assert item_of(subscription).current_period_end > end  # renewed
    row = await the_account(service.database, "wes")
    assert_row_is_stripes(row, subscription)
    assert await stored_invoices(service.database) == await stripe_invoices(live.gateway, customer_id)
    assert await inbox_statuses(service.database) <= {"processed", "ignored"}
    assert (await live.viewer("wes"))["tier"] == "PRO"


# Usage recorded while the period rolls over --------------------------------------------------------

BATCH = "mutation($inputs: [RecordUsageInput!]!) { recordUsageBatch(inputs: $inputs) { id duplicate } }"
USAGE = '{ viewer { usage(feature: "api_calls") { used windowStart windowEnd } } }'


async def test_usage_recorded_while_the_period_rolls_over_is_counted_once_in_the_right_window(
    database: Database,
) -> None:
    boundary = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)  # the old period's end
    await insert_account(
        database, "xena", tier="pro", period_start=boundary - timedelta(days=30), current_period_end=boundary
    )
    # 8 batches of 25 uses from 30 minutes before the boundary to 30 minutes after; every batch
    # is sent twice (a client retrying), so each key is seen twice.
    batches = [
        [
            {
                "userId": "xena",
                "feature": "api_calls",
                "quantity": 1 + (batch * 25 + n) % 7,
                "idempotencyKey": f"use-{batch}-{n}",
                "recordedAt": (boundary + timedelta(seconds=(batch * 25 + n) * 9 - 1800)).isoformat(),
            }
            for n in range(25)
        ]
        for batch in range(8)
    ]
    uses = [use for batch in batches for use in batch]
    after = sum(use["quantity"] for use in uses if datetime.fromisoformat(use["recordedAt"]) >= boundary)

    async def renew() -> None:  # the renewal webhook's sync writing the new period meanwhile
        async with database.write() as conn:
            await conn.execute(
                account_table.update()
                .where(account_table.c.user_id == "xena")
                .values(current_period_start=boundary, current_period_end=boundary + timedelta(days=30))
            )

    async with serve_api(database, service_api_key=SERVICE_KEY, usage_reporter=False) as api:
        before = await api.query(USAGE, token=hs256_token("xena"))
        results = await asyncio.gather(
            *(api.query(BATCH, {"inputs": batch}, token=SERVICE_KEY) for batch in batches + batches[::-1]),
            renew(),
        )
        now = await api.query(USAGE, token=hs256_token("xena"))

    for result in results[:-1]:
        assert result is not None and "errors" not in result, result
    async with database.read() as conn:
        count, total = (await conn.execute(select(func.count(), func.sum(usage_table.c.quantity)))).one()
        rolled = (await conn.execute(select(func.sum(rollup_table.c.quantity)))).scalar_one()
    assert count == len(uses) and total == rolled == sum(use["quantity"] for use in uses)  # each key once
    usage = now["data"]["viewer"]["usage"]
    assert datetime.fromisoformat(usage["windowStart"]) == boundary
    assert int(usage["used"]) == after  # only the uses from the boundary on
    # Before the renewal was written the window had already rolled forward from the stored end.
    assert before["data"]["viewer"]["usage"]["windowStart"] == usage["windowStart"]
    assert int(before["data"]["viewer"]["usage"]["used"]) == 0
