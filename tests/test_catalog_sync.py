"""`billing catalog sync` makes the sandbox's Stripe match the plans file, once."""

from __future__ import annotations

import dataclasses

from billing.catalog import sync_catalog
from billing.clock import utcnow
from billing.notifier import LogNotifier
from billing.plans import Catalog, load_catalog, plan_of_price
from billing.reconcile import customer_ids, reconcile
from billing.stripe_gateway import StripeGateway
from db.enums import BillingInterval, Tier
from tests.billing_flows import account, setup_catalog, subscribe, wait_for_account
from tests.conftest import Service
from tests.stripe_shapes import missing_keys

RETURN_URL = "http://app.test/billing"


async def sync(gateway: StripeGateway, catalog: Catalog | None = None, *, dry_run: bool = False) -> list[str]:
    report = await sync_catalog(
        catalog=catalog or load_catalog(), gateway=gateway, return_url=RETURN_URL, dry_run=dry_run
    )
    return report.changes


def with_price(catalog: Catalog, tier: Tier, interval: BillingInterval, amount: int) -> Catalog:
    plan = catalog.plan(tier)
    prices = dict(plan.prices)
    prices[interval] = dataclasses.replace(prices[interval], amount=amount)
    plans = dict(catalog.plans)
    plans[tier] = dataclasses.replace(plan, prices=prices)
    return dataclasses.replace(catalog, plans=plans)


async def test_the_first_sync_creates_the_catalog(stripe_gateway: StripeGateway) -> None:
    changes = await sync(stripe_gateway)
    v1 = stripe_gateway.v1
    products = (await v1.products.list_async({"active": True})).data
    prices = (await v1.prices.list_async({"active": True, "limit": 100})).data
    meters = (await v1.billing.meters.list_async()).data
    portals = (await v1.billing_portal.configurations.list_async()).data

    assert sorted(p.metadata["tier"] for p in products if "tier" in p.metadata.to_dict()) == [
        "pro",
        "starter",
    ]
    # The metered prices have their own product, so Checkout names the line "API calls".
    (metered,) = [p for p in products if p.metadata.to_dict().get("feature") == "api_calls"]
    assert metered.name == "API calls"
    by_key = {p.lookup_key: p for p in prices}
    assert set(by_key) == {
        "starter_monthly",
        "starter_annual",
        "pro_monthly",
        "pro_annual",
        "starter_api_calls_metered",
        "pro_api_calls_metered",
    }
    assert by_key["pro_annual"].unit_amount == 99000
    assert by_key["pro_annual"].recurring.interval == "year"
    assert plan_of_price(by_key["starter_monthly"]) == (Tier.STARTER, BillingInterval.MONTHLY)
    assert by_key["pro_api_calls_metered"].recurring.usage_type == "metered"
    assert by_key["pro_api_calls_metered"].recurring.meter == meters[0].id
    assert by_key["pro_api_calls_metered"].product == metered.id
    assert by_key["pro_monthly"].product != metered.id
    assert [m.event_name for m in meters] == ["billing_api_calls"]
    assert len(portals) == 1
    features = portals[0].features
    assert features.subscription_update.enabled is False
    assert features.subscription_cancel.enabled is True
    assert features.subscription_cancel.mode == "at_period_end"
    assert features.subscription_cancel.cancellation_reason.enabled is True
    assert "too_expensive" in features.subscription_cancel.cancellation_reason.options
    assert features.payment_method_update.enabled and features.invoice_history.enabled
    assert len(changes) == 2 + 1 + 1 + 6 + 1


async def test_a_second_sync_changes_nothing(stripe_gateway: StripeGateway) -> None:
    await sync(stripe_gateway)
    assert await sync(stripe_gateway) == []


async def test_a_dry_run_reports_and_changes_nothing(stripe_gateway: StripeGateway) -> None:
    changes = await sync(stripe_gateway, dry_run=True)
    assert len(changes) == 11
    assert any("create price pro_monthly" in change for change in changes)
    assert (await stripe_gateway.v1.products.list_async()).data == []
    assert (await stripe_gateway.v1.prices.list_async()).data == []


async def test_a_changed_amount_makes_a_new_price_and_archives_the_old(stripe_gateway: StripeGateway) -> None:
    await sync(stripe_gateway)
    old = (await stripe_gateway.v1.prices.list_async({"lookup_keys": ["starter_monthly"]})).data[0]

    changes = await sync(
        stripe_gateway, with_price(load_catalog(), Tier.STARTER, BillingInterval.MONTHLY, 3500)
    )

    assert len(changes) == 1 and "replace" in changes[0]
    new = (await stripe_gateway.v1.prices.list_async({"lookup_keys": ["starter_monthly"]})).data[0]
    archived = await stripe_gateway.v1.prices.retrieve_async(old.id)
    assert new.id != old.id and new.unit_amount == 3500
    assert archived.active is False and archived.lookup_key is None
    # Whoever still pays the archived price keeps the tier its metadata names.
    assert plan_of_price(archived) == (Tier.STARTER, BillingInterval.MONTHLY)
    assert (
        await sync(stripe_gateway, with_price(load_catalog(), Tier.STARTER, BillingInterval.MONTHLY, 3500))
        == []
    )


async def test_a_subscriber_on_an_archived_price_keeps_the_tier(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    prices = await setup_catalog(stripe_gateway)
    _, subscription_id = await subscribe(
        service, stripe_gateway, prices, "u-old", "starter_monthly", trial_days=None
    )
    await wait_for_account(service.database, "u-old", status="active")

    await sync(stripe_gateway, with_price(load_catalog(), Tier.STARTER, BillingInterval.MONTHLY, 3500))
    old = await stripe_gateway.v1.prices.retrieve_async(prices["starter_monthly"])
    assert old.active is False

    ids = await customer_ids(database=service.database, gateway=stripe_gateway)
    await reconcile(
        database=service.database, gateway=stripe_gateway, notifier=LogNotifier(), customers=ids, now=utcnow()
    )
    row = await account(service.database, "u-old")
    assert (row.tier, row.interval, row.stripe_price_id) == ("starter", "monthly", old.id)
    assert row.stripe_subscription_id == subscription_id


async def test_a_customer_has_stripes_shape(stripe_gateway: StripeGateway) -> None:
    customer = await stripe_gateway.v1.customers.create_async({"email": "shape@example.com"})
    assert missing_keys(customer, "customer") == []
