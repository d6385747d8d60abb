"""Per-seat plans for organisations (issue 27): checkout with the organisation's seat count,
`setSeats` with Stripe's prorations equal to `previewSeatChange` to the cent, idempotent retries,
bounds. HTTP, real tokens, the sandbox through the SDK, on PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import stripe
from sqlalchemy import select

from billing.catalog import sync_catalog
from billing.plans import load_catalog
from db.engine import Database
from db.models import account_table
from tests.checkout_flows import gql, settle, subscribe_via_api
from tests.conftest import DbTarget, Service, running_service
from tests.gateways import open_sandbox_gateway
from tests.graphql_support import error_codes, hs256_token

SERVICE_KEY = "service-key-for-the-seat-tests-0123456789"
PLANS = """
currency = "usd"
trial_days = 0

[tiers.starter]
name = "Starter"
prices = { monthly = 2900, annual = 29000 }

[tiers.pro]
name = "Team"
features = ["advanced_analytics"]
prices = { monthly = 1250, annual = 12500 }
per_seat = true
min_seats = 2
max_seats = 50
"""
SET = """mutation($org: ID!, $seats: Int!, $key: String!, $at: DateTime) {
  setSeats(orgId: $org, seats: $seats, idempotencyKey: $key, prorationDate: $at) { status tier seats }
}"""
PREVIEW = """mutation($org: ID!, $seats: Int!) {
  previewSeatChange(orgId: $org, seats: $seats) {
    seats previousSeats currency amountDue prorationDate lines { description amount proration }
  }
}"""
VIEWER = "{ viewer { organizationId subscription { tier seats } } }"


@pytest.fixture
async def service(database: Database, sandbox_db: DbTarget, tmp_path: Path) -> AsyncIterator[Service]:
    plans = tmp_path / "plans.toml"
    plans.write_text(PLANS, encoding="utf-8")
    async with running_service(
        database, sandbox_db, billing_plans_file=plans, service_api_key=SERVICE_KEY
    ) as running:
        async with open_sandbox_gateway(running.url) as gateway:
            await sync_catalog(
                catalog=load_catalog(plans), gateway=gateway, return_url="http://app.test/billing"
            )
        yield running


async def call(service: Service, query: str, **variables: Any) -> dict[str, Any]:
    return await gql(service, query, variables, token=SERVICE_KEY)


async def set_seats(service: Service, seats: int, key: str, at: str | None = None) -> dict[str, Any]:
    result = await call(service, SET, org="org_t", seats=seats, key=key, at=at)
    assert "errors" not in result, result
    found: dict[str, Any] = result["data"]["setSeats"]
    return found


async def stripe_view(service: Service) -> tuple[int, list[str]]:
    """The subscription's quantity and its invoices, newest first."""
    async with service.database.read() as conn:
        row = (
            await conn.execute(
                select(account_table.c.stripe_customer_id, account_table.c.stripe_subscription_id).where(
                    account_table.c.user_id == "org:org_t"
                )
            )
        ).one()
    async with open_sandbox_gateway(service.url) as gateway:
        subscription = await gateway.v1.subscriptions.retrieve_async(row.stripe_subscription_id)
        invoices = await gateway.v1.invoices.list_async({"customer": row.stripe_customer_id, "limit": 100})
    return int(subscription["items"].data[0].quantity), [invoice.id for invoice in invoices.data]


async def invoice_lines(service: Service, invoice_id: str) -> tuple[int, list[tuple[str, int]]]:
    async with open_sandbox_gateway(service.url) as gateway:
        invoice = await gateway.v1.invoices.retrieve_async(invoice_id)
        lines = await gateway.v1.invoices.line_items.list_async(invoice_id)
    return int(invoice.total), [(line.description, int(line.amount)) for line in lines.data]


async def change_seats(service: Service, seats: int, key: str) -> str:
    """Preview, then set with the preview's proration date: the new invoice is the preview."""
    result = await call(service, PREVIEW, org="org_t", seats=seats)
    assert "errors" not in result, result
    preview = result["data"]["previewSeatChange"]
    _quantity, before = await stripe_view(service)
    state = await set_seats(service, seats, key, preview["prorationDate"])
    assert state["seats"] == seats
    quantity, after = await stripe_view(service)
    assert quantity == seats and len(after) == len(before) + 1
    total, lines = await invoice_lines(service, after[0])
    assert total == preview["amountDue"]
    assert lines == [(line["description"], line["amount"]) for line in preview["lines"]]
    assert all(line["proration"] for line in preview["lines"]) and len(lines) == 2  # credit, charge
    at: str = preview["prorationDate"]
    return at


async def test_an_organisation_checks_out_its_seats_and_changes_them_with_prorations(
    service: Service,
) -> None:
    stored = await set_seats(service, 3, "members-3")  # before any subscription: kept for checkout
    assert (stored["status"], stored["seats"]) == ("NONE", 3)

    admin = hs256_token("ada", o={"id": "org_t", "rol": "admin"})
    _session, confirmed = await subscribe_via_api(service, admin, "PRO", "MONTHLY")
    assert confirmed["status"] == "ACTIVE"
    await settle(service)
    quantity, invoices = await stripe_view(service)
    assert quantity == 3
    assert (await invoice_lines(service, invoices[0]))[0] == 3 * 1250
    member = await gql(service, VIEWER, token=hs256_token("bob", org_id="org_t", org_role="org:member"))
    assert member["data"]["viewer"]["subscription"] == {"tier": "PRO", "seats": 3}

    first_at = await change_seats(service, 5, "members-5")  # charged for two more seats
    await change_seats(service, 4, "members-4")  # one seat credited

    # A retry of an earlier call (its response lost) changes nothing, even after a later change.
    _q, invoices = await stripe_view(service)
    again = await set_seats(service, 5, "members-5", first_at)
    assert again["seats"] == 4
    assert await stripe_view(service) == (4, invoices)
    reused = await call(service, SET, org="org_t", seats=6, key="members-5")
    assert error_codes(reused) == ["IDEMPOTENCY_CONFLICT"], reused
    assert await stripe_view(service) == (4, invoices)
    assert (await set_seats(service, 4, "members-4-again"))["seats"] == 4  # already so: nothing sent
    assert await stripe_view(service) == (4, invoices)

    for seats in (1, 51, 0):  # under min_seats, over max_seats, not a count
        refused = await call(service, SET, org="org_t", seats=seats, key=f"bad-{seats}")
        assert error_codes(refused) == ["BAD_USER_INPUT"], refused
        refused = await call(service, PREVIEW, org="org_t", seats=seats)
        assert error_codes(refused) == ["BAD_USER_INPUT"], refused
    assert await stripe_view(service) == (4, invoices)
    await settle(service)
    async with service.database.read() as conn:
        seats = (
            await conn.execute(select(account_table.c.seats).where(account_table.c.user_id == "org:org_t"))
        ).scalar_one()
    assert seats == 4


async def test_only_the_service_key_sets_seats(service: Service) -> None:
    for token in (hs256_token("ada", o={"id": "org_t", "rol": "admin"}), hs256_token("ada")):
        result = await gql(service, SET, {"org": "org_t", "seats": 3, "key": "k"}, token=token)
        assert error_codes(result) == ["FORBIDDEN"]
    async with service.database.read() as conn:
        assert (await conn.execute(select(account_table))).first() is None


async def test_a_personal_checkout_of_a_per_seat_tier_starts_at_its_minimum(service: Service) -> None:
    _session, confirmed = await subscribe_via_api(
        service, hs256_token("solo", email="solo@example.test"), "PRO"
    )
    assert confirmed["tier"] == "PRO"
    await settle(service)
    async with service.database.read() as conn:
        seats = (
            await conn.execute(select(account_table.c.seats).where(account_table.c.user_id == "solo"))
        ).scalar_one()
    assert seats == 2


async def test_the_sandbox_refuses_a_negative_quantity_as_stripe_does(service: Service) -> None:
    admin = hs256_token("ada", o={"id": "org_t", "rol": "admin"})
    await subscribe_via_api(service, admin, "PRO", "MONTHLY")
    quantity, invoices = await stripe_view(service)
    async with open_sandbox_gateway(service.url) as gateway, service.database.read() as conn:
        subscription_id = (
            await conn.execute(
                select(account_table.c.stripe_subscription_id).where(account_table.c.user_id == "org:org_t")
            )
        ).scalar_one()
        subscription = await gateway.v1.subscriptions.retrieve_async(subscription_id)
        with pytest.raises(stripe.InvalidRequestError, match="greater than or equal to 0"):
            await gateway.v1.subscriptions.update_async(
                subscription_id, {"items": [{"id": subscription["items"].data[0].id, "quantity": -1}]}
            )
    assert await stripe_view(service) == (quantity, invoices) and quantity == 2  # min_seats
