"""Fault matrix, Stripe outages: the sandbox's fault injection on every path that reaches Stripe.

Each row asserts the client's exact answer, that retries were bounded (the sandbox's fault
counter says how many requests were made) and made with one idempotency key (the sandbox keeps
the keys it executed: a retry under a new key would show as a second key and a second object),
and that the database is unchanged (every state table compared row by row, `tests/db_snapshot.py`).
The service's gateway keeps its production retry settings (2 SDK retries for 5xx, timeouts and
resets; 3 backoffs for 429), with a 0.5 s timeout and short backoffs so the rows stay quick.

| row | where |
|---|---|
| 500 on checkout (customer create, session create), confirm, portal, preview, plan change, cancel, resume | `test_mutations_checkout.py::test_a_checkout_outage_is_provider_unavailable_and_writes_nothing`, `::test_a_customer_outage_for_a_new_user_writes_nothing`, `::test_a_confirm_outage_is_provider_unavailable_and_writes_nothing`, `test_mutations_portal.py::test_a_portal_outage_is_provider_unavailable_and_writes_nothing`, `test_mutations_plan_change.py::test_a_stripe_outage_is_provider_unavailable_and_changes_nothing`, `test_mutations_cancel.py::test_a_stripe_outage_is_provider_unavailable_and_changes_nothing` |
| 429, timeout and connection reset on checkout, confirm, portal and plan change: BILLING_PROVIDER_UNAVAILABLE, bounded attempts, nothing written, no second customer or subscription | here: `test_a_persistent_outage_is_provider_unavailable_after_bounded_retries_and_writes_nothing` |
| the gateway itself: 5xx / 429 retried then mapped, timeout, reset, lost responses replayed under the same key, 402 | `test_stripe_gateway.py` (every test) |
| `after_apply` on customer create (checkout) | `test_mutations_checkout.py::test_a_lost_customer_create_response_is_retried_without_a_second_customer`, `::test_every_response_lost_then_the_next_call_reuses_the_same_customer` |
| `after_apply` on checkout session create: once (replayed) and every attempt (the next click leaves one open session) | here: `test_a_lost_checkout_session_response_is_replayed_under_the_same_key`, `test_every_checkout_session_response_lost_then_one_open_session` |
| `after_apply` on an upgrade: once (replayed, charged once) and every attempt (charged once; the retry changes nothing) | here: `test_a_lost_upgrade_response_is_replayed_and_charged_once`, `test_every_upgrade_response_lost_is_charged_once_and_not_repeated` |
| a release failing after the schedule was changed (cancel) | `test_mutations_cancel.py::test_a_pending_change_released_for_a_cancellation_that_fails_is_put_back` |
| declined card on an upgrade (402): nothing changes in Stripe or the database | `test_mutations_plan_change.py::test_a_declined_card_changes_nothing_in_stripe_or_the_database` |
| `billing sync` (`billing.reconcile`): 500, 429, timeout, reset | here: `test_billing_sync_during_an_outage_fails_without_writing_then_repairs` |
| meter reporting: 500 mid drain and lost responses | `test_usage_reporting.py::test_an_outage_mid_drain_loses_nothing_and_reports_nothing_twice` |
| meter reporting: 429, timeout, reset | here: `test_meter_reporting_through_an_outage_reports_each_aggregate_once` |

On PostgreSQL only: the code paths do not depend on the database (the checkout and plan-change
modules run their 500 rows on both), and each row drives a whole sandbox subscription.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Table, select

from billing.clock import utcnow
from billing.errors import BillingError, ErrorCode
from billing.notifier import LogNotifier
from billing.reconcile import customer_ids, reconcile
from billing.stripe_gateway import StripeGateway
from billing.usage.reporting import UsageReporter
from db.engine import Database
from db.models import account_table
from stripe_sandbox.store import Store, faults, idempotency
from tests.billing_flows import setup_catalog, subscribe
from tests.checkout_flows import (
    CREATE,
    create_checkout,
    customers_by_email,
    gql,
    settle,
    subscribe_via_api,
    token,
)
from tests.conftest import DbTarget, Service, running_service
from tests.db_snapshot import STATE_TABLES, unchanged
from tests.gateways import sandbox_gateway
from tests.graphql_support import error_codes
from tests.live import CHANGE, Live
from tests.stripe_faults import FaultyAt, clear_faults, inject
from tests.usage_flows import (
    CATALOG,
    Clock,
    metered_subscriber,
    report_rows,
    sandbox_meter_events,
    spread_usage,
    unreported_records,
)

pytestmark = pytest.mark.postgres_only

# The service's retry settings; a short timeout and backoff so that the rows are quick.
QUICK = {"timeout_seconds": 0.5, "rate_limit_base_delay": 0.01, "max_network_retries": 2}
# Requests one gateway call makes before giving up: 1 + 2 SDK retries, or 1 + 3 backoffs for 429.
ATTEMPTS = {"429": 4, "timeout": 3, "reset": 3, "500": 3}
KINDS = {"429": {"status": 429}, "timeout": {"status": "timeout", "seconds": 1}, "reset": {"status": "reset"}}
UPGRADE = {"tier": "PRO", "interval": "MONTHLY"}


async def sandbox_rows(service: Service, table: Table) -> list[Any]:
    """Rows of the sandbox's own store: the faults it still holds, the idempotency keys it executed."""
    store = Store(service.sandbox_db.url, schema=service.sandbox_db.schema)
    try:
        async with store.transaction() as tx:
            return list(await tx.conn.execute(select(table)))
    finally:
        await store.dispose()


async def requests_failed(service: Service, injected: int) -> int:
    """Requests the sandbox failed, once the count has held still for a second.

    With the quick gateway's 0.5 s timeout the SDK may give up on an attempt that a loaded
    machine has not yet delivered to the sandbox; it still arrives (and is failed) a moment
    after the call has returned, so the count is read when nothing more is on its way."""
    deadline = time.monotonic() + 10
    last, still_since = -1, time.monotonic()
    while True:
        (fault,) = await sandbox_rows(service, faults)
        count = injected - int(fault.remaining)
        if count != last:
            last, still_since = count, time.monotonic()
        elif time.monotonic() - still_since >= 1 or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.1)


async def keys_of(service: Service, kind: str) -> list[str]:
    return [
        row.key for row in await sandbox_rows(service, idempotency) if row.key.startswith(f"billing:{kind}:")
    ]


@asynccontextmanager
async def serving(service: Service, gateway: StripeGateway) -> AsyncIterator[StripeGateway]:
    """The service's GraphQL mutations call Stripe through `gateway` for the block."""
    services = service.app.state.graphql
    original = services.gateway
    services.gateway = gateway
    try:
        yield gateway
    finally:
        services.gateway = original
        await gateway.close()


def quick_gateway(service: Service) -> StripeGateway:
    return sandbox_gateway(service.url, **QUICK)


@pytest.fixture
async def prices(stripe_gateway: StripeGateway) -> dict[str, str]:
    return await setup_catalog(stripe_gateway)


# Persistent outages: 429, timeouts, resets ---------------------------------------------------------

PORTAL = "mutation { createPortalSession { url } }"
CONFIRM = "mutation($id: ID!) { confirmCheckoutSession(sessionId: $id) { status } }"
# (operation, path prefix that fails, document, needs a paid subscription)
OPERATIONS = {
    "checkout": ("/v1/checkout/sessions", CREATE, False),
    "confirm": ("/v1/checkout/sessions", CONFIRM, True),
    "portal": ("/v1/billing_portal", PORTAL, False),
    "plan-change": ("/v1/subscriptions", CHANGE, True),
}
ROWS = [(operation, kind) for operation in OPERATIONS for kind in KINDS]


@pytest.mark.parametrize(("operation", "kind"), ROWS, ids=[f"{op}-{kind}" for op, kind in ROWS])
async def test_a_persistent_outage_is_provider_unavailable_after_bounded_retries_and_writes_nothing(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str], operation: str, kind: str
) -> None:
    path_prefix, document, paid = OPERATIONS[operation]
    user = token("olga")
    if paid:
        session_id, _confirmed = await subscribe_via_api(service, user, "STARTER", "MONTHLY")
        variables: dict[str, Any] = {"id": session_id} if document == CONFIRM else UPGRADE
    else:
        await create_checkout(service, user)  # a customer and an open session to keep
        variables = {"tier": "STARTER", "interval": "ANNUAL"} if document == CREATE else {}
    await settle(service)
    customer = (await customers_by_email(stripe_gateway, "olga@example.test"))[0]
    stripe_before = await stripe_gateway.v1.subscriptions.list_async(
        {"customer": customer.id, "status": "all"}
    )
    sessions_before = await stripe_gateway.v1.checkout.sessions.list_async({"customer": customer.id})

    async with serving(service, quick_gateway(service)), unchanged(service.database):
        await inject(service, path_prefix=path_prefix, count=10, **KINDS[kind])
        result = await gql(service, document, variables, token=user)
        failed = await requests_failed(service, 10)
        await clear_faults(service)

    assert error_codes(result) == ["BILLING_PROVIDER_UNAVAILABLE"] and result["data"] is None, result
    assert failed == ATTEMPTS[kind]  # one call, retried as configured, then given up
    assert [c.id for c in await customers_by_email(stripe_gateway, "olga@example.test")] == [customer.id]
    stripe_after = await stripe_gateway.v1.subscriptions.list_async(
        {"customer": customer.id, "status": "all"}
    )
    assert [s.to_dict() for s in stripe_after.data] == [s.to_dict() for s in stripe_before.data]
    sessions_after = await stripe_gateway.v1.checkout.sessions.list_async({"customer": customer.id})
    assert [(s.id, s.status) for s in sessions_after.data] == [(s.id, s.status) for s in sessions_before.data]


# The change happened at Stripe, the response was lost ---------------------------------------------


async def test_a_lost_checkout_session_response_is_replayed_under_the_same_key(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    user = token("pia")
    await create_checkout(service, user)  # the customer exists; the next session is the one under test
    await settle(service)
    faulty = FaultyAt(
        service, "create checkout session", "/v1/checkout/sessions", 1, after_apply=True, config=QUICK
    )
    async with serving(service, faulty):
        session = await create_checkout(service, user, "PRO", "MONTHLY")

    assert len(await keys_of(service, "checkout.session")) == 2  # the first checkout's and this one's
    customer = (await customers_by_email(stripe_gateway, "pia@example.test"))[0]
    sessions = await stripe_gateway.v1.checkout.sessions.list_async({"customer": customer.id})
    assert [s.id for s in sessions.data if s.status == "open"] == [session["id"]]
    assert len(sessions.data) == 2  # the replay made no third session


async def test_every_checkout_session_response_lost_then_one_open_session(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    user = token("quinn")
    first = await create_checkout(service, user)
    await settle(service)
    keys_before = await keys_of(service, "checkout.session")
    faulty = FaultyAt(
        service, "create checkout session", "/v1/checkout/sessions", 3, after_apply=True, config=QUICK
    )
    # The first session is expired before the new one is made: its webhook may land meanwhile.
    ours = [table for table in STATE_TABLES if table.name != "stripe_event"]
    async with serving(service, faulty), unchanged(service.database, ours):
        failed = await gql(service, CREATE, {"tier": "PRO", "interval": "ANNUAL"}, token=user)
    await clear_faults(service)
    assert error_codes(failed) == ["BILLING_PROVIDER_UNAVAILABLE"]
    assert len(await keys_of(service, "checkout.session")) == len(keys_before) + 1  # 3 attempts, 1 key

    customer = (await customers_by_email(stripe_gateway, "quinn@example.test"))[0]
    made = await stripe_gateway.v1.checkout.sessions.list_async({"customer": customer.id})
    assert len(made.data) == 2  # Stripe made the lost session once
    again = await create_checkout(service, user, "PRO", "ANNUAL")  # the user clicks again
    sessions = await stripe_gateway.v1.checkout.sessions.list_async({"customer": customer.id})
    assert [s.id for s in sessions.data if s.status == "open"] == [again["id"]]
    assert first["id"] in [s.id for s in sessions.data if s.status == "expired"]


async def invoices_of(live: Live, subscription_id: str) -> list[Any]:
    return list((await live.gateway.v1.invoices.list_async({"subscription": subscription_id})).data)


async def upgrade_losing_responses(live: Live, user_id: str, lost: int) -> tuple[str, dict[str, Any]]:
    """A starter subscriber upgrades to Pro while Stripe applies but loses `lost` responses."""
    _customer, subscription_id = await live.subscribe(user_id, "starter_monthly")
    await live.settle()
    path = f"/v1/subscriptions/{subscription_id}"
    faulty = FaultyAt(live.service, "change plan", path, lost, after_apply=True, config=QUICK)
    async with serving(live.service, faulty):
        result = await live.graphql(user_id, CHANGE, UPGRADE)
    await live.clear_faults()
    return subscription_id, result


async def test_a_lost_upgrade_response_is_replayed_and_charged_once(live: Live) -> None:
    subscription_id, result = await upgrade_losing_responses(live, "ray", 1)

    assert "errors" not in result and result["data"]["changePlan"]["tier"] == "PRO", result
    assert len(await keys_of(live.service, "subscription.change_plan")) == 1
    invoices = await invoices_of(live, subscription_id)
    assert len(invoices) == 2  # the first one and one proration, not two
    assert (await live.subscription(subscription_id))["items"].data[0].price.id == live.prices["pro_monthly"]


async def test_every_upgrade_response_lost_is_charged_once_and_not_repeated(live: Live) -> None:
    subscription_id, lost = await upgrade_losing_responses(live, "sam", 3)

    assert error_codes(lost) == ["BILLING_PROVIDER_UNAVAILABLE"] and lost["data"] is None
    assert len(await keys_of(live.service, "subscription.change_plan")) == 1  # three attempts, one key
    assert len(await invoices_of(live, subscription_id)) == 2  # applied and charged once
    await live.settle()  # Stripe's webhooks bring the database to the change that was made
    assert (await live.viewer("sam"))["tier"] == "PRO"
    async with unchanged(live.service.database):
        retried = await live.graphql("sam", CHANGE, UPGRADE)  # the user, seeing an error, tries again
    assert error_codes(retried) == ["INVALID_PLAN"]  # already on it: nothing changed, nothing charged
    assert len(await invoices_of(live, subscription_id)) == 2


# billing sync ------------------------------------------------------------------------------------

SYNC_KINDS = {"500": {"status": 500}, **KINDS}


@pytest.mark.parametrize("kind", SYNC_KINDS)
async def test_billing_sync_during_an_outage_fails_without_writing_then_repairs(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str], kind: str
) -> None:
    await subscribe(service, stripe_gateway, prices, "tia", "starter_monthly", trial_days=None)
    await settle(service)
    async with service.database.write() as conn:  # drift for the sync to repair
        await conn.execute(account_table.update().values(status="canceled", tier="pro"))
    gateway = quick_gateway(service)
    try:
        ids = await customer_ids(database=service.database, gateway=gateway)
        await inject(service, path_prefix="/v1/subscriptions", count=10, **SYNC_KINDS[kind])
        async with unchanged(
            service.database, [table for table in STATE_TABLES if table.name != "stripe_event"]
        ):
            with pytest.raises(BillingError) as caught:
                await reconcile(
                    database=service.database,
                    gateway=gateway,
                    notifier=LogNotifier(),
                    customers=ids,
                    now=utcnow(),
                )
        assert caught.value.code is ErrorCode.BILLING_PROVIDER_UNAVAILABLE
        assert await requests_failed(service, 10) == ATTEMPTS[kind]
        await clear_faults(service)

        report = await reconcile(
            database=service.database, gateway=gateway, notifier=LogNotifier(), customers=ids, now=utcnow()
        )
    finally:
        await gateway.close()
    assert [r.user_id for r in report.drifted] == ["tia"]
    async with service.database.read() as conn:
        row = (await conn.execute(select(account_table))).one()
    assert (row.status, row.tier) == ("active", "starter")


# Meter reporting ---------------------------------------------------------------------------------


@pytest.fixture
async def metered(database: Database, sandbox_db: DbTarget) -> AsyncIterator[Service]:
    """The service without its own usage reporter: the test drives one."""
    async with running_service(database, sandbox_db, usage_reporter=False) as service:
        yield service


@pytest.mark.parametrize("kind", KINDS)
async def test_meter_reporting_through_an_outage_reports_each_aggregate_once(
    metered: Service, kind: str
) -> None:
    service = metered
    gateway, clock = quick_gateway(service), Clock()
    await metered_subscriber(service, gateway, await setup_catalog(gateway), "uma")
    await spread_usage(service.database, ["uma"], 3, datetime.now(UTC))
    reporter = UsageReporter(
        database=service.database, gateway=gateway, catalog=CATALOG, clock=clock, batch_size=10, concurrency=1
    )
    try:
        while (await reporter.aggregate())[0]:
            pass
        await inject(service, path_prefix="/v1/billing/meter_events", count=10, **KINDS[kind])
        down = await reporter.drain()
        assert down.unavailable and down.sent == 0
        assert await requests_failed(service, 10) == ATTEMPTS[kind]  # the pass stopped at the first
        assert await sandbox_meter_events(service) == []
        assert await unreported_records(service.database) == 3
        await clear_faults(service)

        clock.advance(minutes=1)  # past the backoff
        back = await reporter.drain()
    finally:
        await gateway.close()
    assert back.sent == 3 and not back.unavailable
    reports = await report_rows(service.database)
    assert {row.status for row in reports} == {"reported"} and await unreported_records(service.database) == 0
    assert sorted(e["identifier"] for e in await sandbox_meter_events(service)) == sorted(
        r.id for r in reports
    )
