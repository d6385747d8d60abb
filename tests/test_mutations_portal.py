"""createPortalSession end to end: the catalog's configuration, the return URL, NO_BILLING_ACCOUNT, outages."""

from __future__ import annotations

from typing import Any

import httpx

from billing.checkout import portal_configurations
from billing.stripe_gateway import StripeGateway
from db.engine import Database
from tests.billing_flows import account, raw_events, setup_catalog, wait_for_account
from tests.checkout_flows import create_checkout, gql, settle, snapshot, token
from tests.conftest import Service
from tests.graphql_support import error_codes, only_error
from tests.stripe_faults import clear_faults, inject

PORTAL = "mutation { createPortalSession { url } }"


async def portal_sessions(service: Service) -> list[dict[str, Any]]:
    """The portal sessions Stripe created, oldest first, as Stripe's JSON."""
    return [
        event["data"]["object"] for event in await raw_events(service, type="billing_portal.session.created")
    ]


async def test_the_portal_uses_the_catalog_configuration_and_returns_to_billing(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    # Another configuration is made first, so it is Stripe's default: the portal must not use it.
    other = await stripe_gateway.v1.billing_portal.configurations.create_async(
        {
            "features": {"invoice_history": {"enabled": True}},
            "default_return_url": "http://elsewhere.test/",
        }
    )
    await setup_catalog(stripe_gateway)
    configurations = await stripe_gateway.v1.billing_portal.configurations.list_async({"limit": 10})
    (billing,) = [
        c
        for c in configurations.data
        if c.metadata is not None and c.metadata.to_dict().get("catalog") == "billing"
    ]
    assert other.is_default and not billing.is_default

    user = token("pam")
    await create_checkout(service, user)
    lookups = portal_configurations.lookups
    first = await gql(service, PORTAL, token=user)
    second = await gql(service, PORTAL, token=user)
    assert "errors" not in first and "errors" not in second, (first, second)
    url = first["data"]["createPortalSession"]["url"]
    assert url.startswith(f"{service.url}/sandbox/portal/bps_")
    assert portal_configurations.lookups == lookups + 1  # looked up once, then cached

    sessions = await portal_sessions(service)
    assert [s["url"] for s in sessions] == [url, second["data"]["createPortalSession"]["url"]]
    customer = (await account(service.database, "pam")).stripe_customer_id
    for session in sessions:
        assert session["configuration"] == billing.id
        assert session["return_url"] == "http://app.test/billing"
        assert session["customer"] == customer
    async with httpx.AsyncClient() as client:
        page = await client.get(url)
    assert page.status_code == 200 and "http://app.test/billing" in page.text


async def test_no_customer_is_no_billing_account(service: Service, stripe_gateway: StripeGateway) -> None:
    await setup_catalog(stripe_gateway)
    result = await gql(service, PORTAL, token=token("quinn"))
    error = only_error(result)
    assert error["extensions"]["code"] == "NO_BILLING_ACCOUNT" and result["data"] is None
    assert await account(service.database, "quinn") is None
    assert await portal_sessions(service) == []


async def test_a_deleted_customer_is_no_billing_account(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    await setup_catalog(stripe_gateway)
    user = token("rosa")
    await create_checkout(service, user)
    customer = (await account(service.database, "rosa")).stripe_customer_id
    await stripe_gateway.v1.customers.delete_async(customer)
    # Before the webhook unlinks it and after: the same answer.
    before_webhook = await gql(service, PORTAL, token=user)
    await wait_for_account(service.database, "rosa", stripe_customer_id=None)
    after_webhook = await gql(service, PORTAL, token=user)
    assert error_codes(before_webhook) == ["NO_BILLING_ACCOUNT"]
    assert error_codes(after_webhook) == ["NO_BILLING_ACCOUNT"]


async def test_a_new_email_reaches_the_customer_before_the_portal_shows_it(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    await setup_catalog(stripe_gateway)
    await create_checkout(service, token("sam", email="sam@old.test"))
    result = await gql(service, PORTAL, token=token("sam", email="sam@new.test", name="Sam"))
    assert "errors" not in result, result
    row = await account(service.database, "sam")
    customer = await stripe_gateway.v1.customers.retrieve_async(row.stripe_customer_id)
    assert (customer.email, customer.name) == ("sam@new.test", "Sam")
    assert (row.email, row.name) == ("sam@new.test", "Sam")


async def test_a_portal_outage_is_provider_unavailable_and_writes_nothing(
    service: Service, stripe_gateway: StripeGateway, database: Database
) -> None:
    await setup_catalog(stripe_gateway)
    user = token("tia")
    await create_checkout(service, user)
    await settle(service)
    before = await snapshot(database)

    await inject(service, path_prefix="/v1/billing_portal", status=500, count=5)
    result = await gql(service, PORTAL, token=user)
    await clear_faults(service)
    assert error_codes(result) == ["BILLING_PROVIDER_UNAVAILABLE"] and result["data"] is None
    await settle(service)
    assert await snapshot(database) == before

    recovered = await gql(service, PORTAL, token=user)
    assert "errors" not in recovered, recovered


async def test_the_portal_needs_a_user(service: Service) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{service.url}/graphql", json={"query": PORTAL})
    assert error_codes(response.json()) == ["UNAUTHENTICATED"]
