"""createCheckoutSession and confirmCheckoutSession end to end: HTTP, real tokens, the sandbox via the SDK."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select, update

from billing.stripe_gateway import StripeGateway
from db.engine import Database
from db.models import account_table, invoice_table, usage_table
from stripe_sandbox import engine
from tests.billing_flows import account, control, raw_events, setup_catalog, wait_for_account
from tests.checkout_flows import (
    CREATE,
    confirm,
    create_checkout,
    customers_by_email,
    gql,
    pay,
    settle,
    snapshot,
    subscribe_via_api,
    token,
)
from tests.conftest import DbTarget, Service, running_service
from tests.gateways import open_sandbox_gateway
from tests.graphql_support import error_codes, hs256_token, only_error
from tests.stripe_faults import clear_faults, inject

SUCCESS = "http://app.test/billing/success?session_id="


@pytest.fixture
async def prices(stripe_gateway: StripeGateway) -> dict[str, str]:
    return await setup_catalog(stripe_gateway)


@pytest.fixture
async def lagging(database: Database, sandbox_db: DbTarget) -> AsyncIterator[Service]:
    """The service without its webhook worker: the database lags Stripe until something syncs."""
    async with running_service(database, sandbox_db, webhook_worker=False) as service:
        yield service


@pytest.fixture
async def lagging_gateway(lagging: Service) -> AsyncIterator[StripeGateway]:
    async with open_sandbox_gateway(lagging.url) as gateway:
        await setup_catalog(gateway)
        yield gateway


# Checkout, pay, confirm ------------------------------------------------------------------------


async def test_checkout_then_pay_then_confirm_gives_a_trialing_subscription(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    user = token("ada", email="ada@example.test", name="Ada Lovelace")
    session = await create_checkout(service, user, "PRO", "MONTHLY")
    assert session["id"].startswith("cs_")
    assert session["url"] == f"{service.url}/sandbox/checkout/{session['id']}"

    stripe_session = await stripe_gateway.v1.checkout.sessions.retrieve_async(session["id"])
    assert stripe_session.mode == "subscription" and stripe_session.status == "open"
    assert stripe_session.client_reference_id == "ada"
    assert stripe_session.success_url == SUCCESS + "{CHECKOUT_SESSION_ID}"
    assert stripe_session.cancel_url == "http://app.test/pricing"
    assert stripe_session.allow_promotion_codes is True
    assert stripe_session.billing_address_collection == "auto"
    assert stripe_session.automatic_tax.enabled is False  # the shipped plans file has tax off
    assert stripe_session.amount_total == 0  # the first 14 days are free
    items = await stripe_gateway.v1.checkout.sessions.line_items.list_async(session["id"])
    assert [(item.price.id, item.quantity) for item in items.data] == [
        (prices["pro_monthly"], 1),
        (prices["pro_api_calls_metered"], None),  # metered: no quantity, so usage can be billed
    ]

    assert isinstance(stripe_session.customer, str)
    customer = await stripe_gateway.v1.customers.retrieve_async(stripe_session.customer)
    assert customer.email == "ada@example.test" and customer.name == "Ada Lovelace"
    assert customer.metadata.to_dict() == {"userId": "ada"}
    assert customer.invoice_settings.footer == "Thank you for your business."
    row = await account(service.database, "ada")
    assert row.stripe_customer_id == customer.id and row.status == "none"
    assert (row.email, row.name) == ("ada@example.test", "Ada Lovelace")

    paid = await pay(session["url"])
    assert paid.status_code == 303 and paid.headers["location"] == f"{SUCCESS}{session['id']}"
    result = await confirm(service, user, session["id"])
    assert "errors" not in result, result
    confirmed = result["data"]["confirmCheckoutSession"]
    assert confirmed["status"] == "TRIALING" and confirmed["tier"] == "PRO"
    assert confirmed["interval"] == "MONTHLY" and confirmed["priceId"] == prices["pro_monthly"]
    assert confirmed["effectiveTier"] == "PRO" and confirmed["hasAccess"] is True
    assert confirmed["trialUsed"] is True and confirmed["cancelAtPeriodEnd"] is False
    trial_end = datetime.fromisoformat(confirmed["trialEnd"])
    assert abs(trial_end - (datetime.now(UTC) + timedelta(days=14))) < timedelta(minutes=5)

    row = await account(service.database, "ada")
    assert (row.status, row.tier, row.interval) == ("trialing", "pro", "monthly")
    subscription = await stripe_gateway.v1.subscriptions.retrieve_async(row.stripe_subscription_id)
    assert subscription.metadata.to_dict() == {"userId": "ada"}
    assert sorted(item.price.id for item in subscription["items"].data) == sorted(
        [prices["pro_monthly"], prices["pro_api_calls_metered"]]
    )
    # Confirming again is harmless: the same state.
    again = await confirm(service, user, session["id"])
    assert again["data"]["confirmCheckoutSession"] == confirmed


async def test_an_annual_checkout_bills_the_plan_yearly_and_metered_usage_monthly(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    user = token("annie")
    session = await create_checkout(service, user, "STARTER", "ANNUAL")
    items = await stripe_gateway.v1.checkout.sessions.line_items.list_async(session["id"])
    # The annual price and the monthly metered one: flexible billing mode mixes the intervals.
    assert [(item.price.id, item.quantity) for item in items.data] == [
        (prices["starter_annual"], 1),
        (prices["starter_api_calls_metered"], None),
    ]
    assert (await pay(session["url"])).status_code == 303
    confirmed = (await confirm(service, user, session["id"]))["data"]["confirmCheckoutSession"]
    assert (confirmed["status"], confirmed["tier"], confirmed["interval"]) == (
        "TRIALING",
        "STARTER",
        "ANNUAL",
    )

    await control(service, "clock/advance", {"seconds": 15 * 86_400})  # the 14-day trial ends
    row = await wait_for_account(service.database, "annie", status="active")
    subscription = await stripe_gateway.v1.subscriptions.retrieve_async(row.stripe_subscription_id)
    assert subscription.billing_mode.type == "flexible"
    periods = {
        item.price.id: (item.current_period_start, item.current_period_end)
        for item in subscription["items"].data
    }
    start, year_end = periods[prices["starter_annual"]]
    assert year_end == engine.add_intervals(start, "year", 1, 1)
    assert periods[prices["starter_api_calls_metered"]] == (start, engine.add_intervals(start, "month", 1, 1))
    # The account's period is the plan's (the year), not the metered item's month.
    await wait_for_account(
        service.database,
        "annie",
        current_period_start=datetime.fromtimestamp(start, UTC),
        current_period_end=datetime.fromtimestamp(year_end, UTC),
        interval="annual",
    )


async def test_no_second_trial_after_a_cancel(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    user = token("bob")
    first_session, first = await subscribe_via_api(service, user)
    assert first["status"] == "TRIALING"
    row = await account(service.database, "bob")
    await stripe_gateway.v1.subscriptions.cancel_async(row.stripe_subscription_id)
    canceled = await confirm(service, user, first_session)  # sync now
    assert canceled["data"]["confirmCheckoutSession"]["status"] == "CANCELED"
    await settle(service)
    # Stripe's history alone is enough: even with the account's flag lost, no second trial.
    async with service.database.write() as conn:
        await conn.execute(
            update(account_table).where(account_table.c.user_id == "bob").values(trial_used=False)
        )

    session = await create_checkout(service, user, "STARTER", "MONTHLY")
    stripe_session = await stripe_gateway.v1.checkout.sessions.retrieve_async(session["id"])
    assert stripe_session.amount_total == 2900  # charged now: no trial_period_days
    assert (await pay(session["url"])).status_code == 303
    result = await confirm(service, user, session["id"])
    again = result["data"]["confirmCheckoutSession"]
    assert again["status"] == "ACTIVE" and again["trialEnd"] is None and again["tier"] == "STARTER"
    assert (await account(service.database, "bob")).trial_used is True


async def test_a_live_subscription_is_already_subscribed_even_before_the_webhook(
    lagging: Service, lagging_gateway: StripeGateway
) -> None:
    user = token("carol")
    session = await create_checkout(lagging, user)
    assert (await pay(session["url"])).status_code == 303
    assert (await account(lagging.database, "carol")).status == "none"  # no worker: the DB lags

    result = await gql(lagging, CREATE, {"tier": "PRO", "interval": "MONTHLY"}, token=user)
    error = only_error(result)
    assert error["extensions"]["code"] == "ALREADY_SUBSCRIBED"
    assert result["data"] is None
    # The refusal brought the database up to date with Stripe, and no session was added.
    row = await account(lagging.database, "carol")
    assert (row.status, row.tier) == ("trialing", "starter")
    sessions = await lagging_gateway.v1.checkout.sessions.list_async({"customer": row.stripe_customer_id})
    assert [s.id for s in sessions.data] == [session["id"]]


async def test_tier_none_is_an_invalid_plan_and_creates_nothing(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    result = await gql(service, CREATE, {"tier": "NONE", "interval": "MONTHLY"}, token=token("dan"))
    assert error_codes(result) == ["INVALID_PLAN"]
    assert await account(service.database, "dan") is None
    assert await customers_by_email(stripe_gateway, "dan@example.test") == []


async def test_checkout_needs_a_user(service: Service, prices: dict[str, str]) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{service.url}/graphql",
            json={"query": CREATE, "variables": {"tier": "PRO", "interval": "MONTHLY"}},
        )
    assert error_codes(response.json()) == ["UNAUTHENTICATED"]


async def test_a_second_checkout_expires_the_first_open_session(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    user = token("erin")
    first = await create_checkout(service, user, "STARTER", "MONTHLY")
    second = await create_checkout(service, user, "PRO", "MONTHLY")
    assert first["id"] != second["id"]
    old = await stripe_gateway.v1.checkout.sessions.retrieve_async(first["id"])
    new = await stripe_gateway.v1.checkout.sessions.retrieve_async(second["id"])
    assert old.status == "expired" and new.status == "open"
    assert old.customer == new.customer  # one customer for both
    open_sessions = await stripe_gateway.v1.checkout.sessions.list_async(
        {"customer": str(new.customer), "status": "open"}
    )
    assert [s.id for s in open_sessions.data] == [second["id"]]
    # The first tab can no longer pay; the second can.
    refused = await pay(first["url"])
    assert refused.status_code == 409
    assert (await pay(second["url"])).status_code == 303
    result = await confirm(service, user, second["id"])
    assert result["data"]["confirmCheckoutSession"]["tier"] == "PRO"
    subscriptions = await stripe_gateway.v1.subscriptions.list_async({"customer": str(new.customer)})
    assert len(subscriptions.data) == 1


async def test_concurrent_checkouts_of_a_new_user_make_one_customer_and_one_account(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    user = token("frank", email="frank@example.test", name="Frank")
    results = await asyncio.gather(
        *(gql(service, CREATE, {"tier": "STARTER", "interval": "MONTHLY"}, token=user) for _ in range(5))
    )
    assert all("errors" not in result for result in results), results
    customers = await customers_by_email(stripe_gateway, "frank@example.test")
    assert len(customers) == 1
    async with service.database.read() as conn:
        rows = (await conn.execute(select(account_table).where(account_table.c.user_id == "frank"))).all()
    assert len(rows) == 1 and rows[0].stripe_customer_id == customers[0].id
    # One customer was ever created (the others got Stripe's replay), none made and thrown away.
    created = await raw_events(service, type="customer.created")
    assert [event["data"]["object"]["id"] for event in created] == [customers[0].id]
    # Each checkout expired the ones before it: one session can still be paid.
    open_sessions = await stripe_gateway.v1.checkout.sessions.list_async(
        {"customer": customers[0].id, "status": "open"}
    )
    assert len(open_sessions.data) == 1
    assert open_sessions.data[0].id in {result["data"]["createCheckoutSession"]["id"] for result in results}


async def test_racing_tokens_with_different_emails_still_leave_one_live_customer(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    # Different parameters cannot share an idempotency key: the customers that lose the race to
    # be linked are deleted again.
    tokens = [token("gus", email=f"gus{n % 2}@example.test") for n in range(4)]
    results = await asyncio.gather(
        *(gql(service, CREATE, {"tier": "STARTER", "interval": "MONTHLY"}, token=t) for t in tokens)
    )
    assert all("errors" not in result for result in results), results
    live = [
        *await customers_by_email(stripe_gateway, "gus0@example.test"),
        *await customers_by_email(stripe_gateway, "gus1@example.test"),
    ]
    row = await account(service.database, "gus")
    assert [customer.id for customer in live] == [row.stripe_customer_id]


async def test_a_new_email_and_name_in_the_token_update_the_customer(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    await create_checkout(service, token("gina", email="gina@old.test", name="Gina"))
    customer_id = (await account(service.database, "gina")).stripe_customer_id
    await create_checkout(service, token("gina", email="gina@new.test", name="Gina Renamed"))
    customer = await stripe_gateway.v1.customers.retrieve_async(customer_id)
    assert (customer.email, customer.name) == ("gina@new.test", "Gina Renamed")
    row = await account(service.database, "gina")
    assert (row.stripe_customer_id, row.email, row.name) == (customer_id, "gina@new.test", "Gina Renamed")
    assert await customers_by_email(stripe_gateway, "gina@old.test") == []
    # A token without a name keeps the name.
    await create_checkout(service, hs256_token("gina", email="gina@new.test"))
    assert (await stripe_gateway.v1.customers.retrieve_async(customer_id)).name == "Gina Renamed"


async def test_a_deleted_customer_is_replaced_by_a_new_one(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    user = token("hal")
    await create_checkout(service, user)
    old_customer = (await account(service.database, "hal")).stripe_customer_id
    await stripe_gateway.v1.customers.delete_async(old_customer)
    await wait_for_account(service.database, "hal", stripe_customer_id=None)  # customer.deleted

    await create_checkout(service, user)
    new_customer = (await account(service.database, "hal")).stripe_customer_id
    assert new_customer is not None and new_customer != old_customer
    live = await customers_by_email(stripe_gateway, "hal@example.test")
    assert [customer.id for customer in live] == [new_customer]


async def test_a_deleted_customer_is_replaced_even_before_the_webhook(
    lagging: Service, lagging_gateway: StripeGateway
) -> None:
    user = token("ivy")
    await create_checkout(lagging, user)
    old_customer = (await account(lagging.database, "ivy")).stripe_customer_id
    await lagging_gateway.v1.customers.delete_async(old_customer)
    assert (await account(lagging.database, "ivy")).stripe_customer_id == old_customer  # DB lags

    session = await create_checkout(lagging, user)
    new_customer = (await account(lagging.database, "ivy")).stripe_customer_id
    assert new_customer not in (None, old_customer)
    stripe_session = await lagging_gateway.v1.checkout.sessions.retrieve_async(session["id"])
    assert stripe_session.customer == new_customer


# Confirmation is for one's own sessions -----------------------------------------------------------


async def test_confirming_another_users_session_is_refused_and_changes_nothing(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    victim_session = await create_checkout(service, token("victim"))
    assert (await pay(victim_session["url"])).status_code == 303
    await create_checkout(service, token("mallory"))  # mallory has a customer of her own
    await settle(service)
    before = await snapshot(service.database)

    stolen = await confirm(service, token("mallory"), victim_session["id"])
    unknown = await confirm(service, token("mallory"), "cs_test_" + "x" * 24)
    malformed = await confirm(service, token("mallory"), "not-a-session'; DROP TABLE invoice;--")
    for result in (stolen, unknown, malformed):
        error = only_error(result)
        assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": "sessionId"}
        assert error["message"] == "No checkout session of yours has this id."  # the same for all
        assert result["data"] is None
    nobody = await confirm(service, token("newcomer"), victim_session["id"])
    assert error_codes(nobody) == ["NO_BILLING_ACCOUNT"]

    await settle(service)
    assert await snapshot(service.database) == before
    assert (await account(service.database, "mallory")).status == "none"
    assert await account(service.database, "newcomer") is None


# Stripe outages ------------------------------------------------------------------------------


async def test_a_checkout_outage_is_provider_unavailable_and_writes_nothing(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    user = token("jay")
    first = await create_checkout(service, user)
    await settle(service)
    before = await snapshot(service.database)

    await inject(service, path_prefix="/v1/checkout/sessions", status=500, count=5)
    result = await gql(service, CREATE, {"tier": "PRO", "interval": "MONTHLY"}, token=user)
    await clear_faults(service)
    assert error_codes(result) == ["BILLING_PROVIDER_UNAVAILABLE"] and result["data"] is None
    await settle(service)
    assert await snapshot(service.database) == before
    still_open = await stripe_gateway.v1.checkout.sessions.retrieve_async(first["id"])
    assert still_open.status == "open"


async def test_a_customer_outage_for_a_new_user_writes_nothing(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    await settle(service)
    before = await snapshot(service.database)
    await inject(service, path_prefix="/v1/customers", status=500, count=5)
    result = await gql(service, CREATE, {"tier": "PRO", "interval": "MONTHLY"}, token=token("kim"))
    await clear_faults(service)
    assert error_codes(result) == ["BILLING_PROVIDER_UNAVAILABLE"]
    await settle(service)
    assert await snapshot(service.database) == before
    assert await customers_by_email(stripe_gateway, "kim@example.test") == []


async def test_a_lost_customer_create_response_is_retried_without_a_second_customer(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    # The customer is created, but the response is lost: the SDK retries with the same key.
    await inject(service, path_prefix="/v1/customers", status=500, after_apply=True, count=1)
    session = await create_checkout(service, token("lee"))
    customers = await customers_by_email(stripe_gateway, "lee@example.test")
    assert len(customers) == 1
    assert (await account(service.database, "lee")).stripe_customer_id == customers[0].id
    stripe_session = await stripe_gateway.v1.checkout.sessions.retrieve_async(session["id"])
    assert stripe_session.customer == customers[0].id


async def test_every_response_lost_then_the_next_call_reuses_the_same_customer(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str]
) -> None:
    # The customer is made in Stripe (its customer.created event reaches the inbox): compare the
    # tables this service writes itself.
    ours = (account_table, invoice_table, usage_table)
    before = await snapshot(service.database, ours)
    # All three attempts (the SDK retries twice) create-or-replay, and every answer is lost.
    await inject(service, path_prefix="/v1/customers", status=500, after_apply=True, count=3)
    failed = await gql(service, CREATE, {"tier": "STARTER", "interval": "ANNUAL"}, token=token("max"))
    await clear_faults(service)
    assert error_codes(failed) == ["BILLING_PROVIDER_UNAVAILABLE"]
    await settle(service)
    assert await snapshot(service.database, ours) == before  # no account row without its customer
    created = await customers_by_email(stripe_gateway, "max@example.test")
    assert len(created) == 1  # Stripe made it once

    await create_checkout(service, token("max"), "STARTER", "ANNUAL")
    customers = await customers_by_email(stripe_gateway, "max@example.test")
    assert [customer.id for customer in customers] == [created[0].id]
    assert (await account(service.database, "max")).stripe_customer_id == created[0].id


@pytest.mark.parametrize("path_prefix", ["/v1/checkout/sessions", "/v1/customers", "/v1/subscriptions"])
async def test_a_confirm_outage_is_provider_unavailable_and_writes_nothing(
    service: Service, stripe_gateway: StripeGateway, prices: dict[str, str], path_prefix: str
) -> None:
    user = token("ned")
    session = await create_checkout(service, user)
    assert (await pay(session["url"])).status_code == 303
    await settle(service)
    # Undo what the webhooks synced, so a confirmation would have something to write.
    async with service.database.write() as conn:
        await conn.execute(
            update(account_table)
            .where(account_table.c.user_id == "ned")
            .values(status="none", tier="none", interval=None, stripe_subscription_id=None)
        )
    before = await snapshot(service.database)

    await inject(service, path_prefix=path_prefix, status=500, count=5)
    result = await confirm(service, user, session["id"])
    await clear_faults(service)
    assert error_codes(result) == ["BILLING_PROVIDER_UNAVAILABLE"] and result["data"] is None
    assert await snapshot(service.database) == before

    recovered = await confirm(service, user, session["id"])
    assert recovered["data"]["confirmCheckoutSession"]["status"] == "TRIALING"
