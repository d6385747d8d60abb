"""A user's checkout through the API: real tokens, the hosted page, the confirmation; the tables a
billing call writes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from sqlalchemy import select

from billing.stripe_gateway import StripeGateway
from db.engine import Database
from db.models import account_table, event_table, invoice_table, usage_table
from tests.billing_flows import control
from tests.conftest import Service
from tests.db_snapshot import Snapshot
from tests.db_snapshot import snapshot as snapshot_of
from tests.graphql_support import hs256_token

CREATE = """mutation($tier: Tier!, $interval: BillingInterval!) {
  createCheckoutSession(tier: $tier, interval: $interval) { id url }
}"""
CONFIRM = """mutation($id: ID!) {
  confirmCheckoutSession(sessionId: $id) {
    status tier effectiveTier hasAccess interval priceId trialEnd trialUsed cancelAtPeriodEnd
  }
}"""
SNAPSHOT_TABLES = (account_table, invoice_table, event_table, usage_table)


def token(user_id: str, *, email: str | None = None, name: str | None = None) -> str:
    claims: dict[str, Any] = {"email": email or f"{user_id}@example.test"}
    if name is not None:
        claims["name"] = name
    return hs256_token(user_id, **claims)


async def gql(
    service: Service, query: str, variables: dict[str, Any] | None = None, *, token: str
) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(
            f"{service.url}/graphql",
            json={"query": query, "variables": variables or {}},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def create_checkout(
    service: Service, user_token: str, tier: str = "STARTER", interval: str = "MONTHLY"
) -> dict[str, Any]:
    result = await gql(service, CREATE, {"tier": tier, "interval": interval}, token=user_token)
    assert "errors" not in result, result
    session: dict[str, Any] = result["data"]["createCheckoutSession"]
    return session


async def pay(session_url: str) -> httpx.Response:
    """The customer pays on the hosted Checkout page (a form POST, as a browser does)."""
    async with httpx.AsyncClient(timeout=30, follow_redirects=False) as client:
        return await client.post(f"{session_url}/pay")


async def confirm(service: Service, user_token: str, session_id: str) -> dict[str, Any]:
    return await gql(service, CONFIRM, {"id": session_id}, token=user_token)


async def subscribe_via_api(
    service: Service, user_token: str, tier: str = "STARTER", interval: str = "MONTHLY"
) -> tuple[str, dict[str, Any]]:
    """Checkout, pay and confirm through the API; returns (session id, confirmed subscription)."""
    session = await create_checkout(service, user_token, tier, interval)
    paid = await pay(session["url"])
    assert paid.status_code == 303, paid.text
    confirmed = await confirm(service, user_token, session["id"])
    assert "errors" not in confirmed, confirmed
    return session["id"], confirmed["data"]["confirmCheckoutSession"]


async def settle(service: Service) -> None:
    """Every webhook delivered and applied, so the tables stop changing."""
    await control(service, "delivery/flush", {"timeout": 20})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        await service.app.state.events.drain()
        async with service.database.read() as conn:
            busy = (
                await conn.execute(
                    select(event_table.c.id).where(event_table.c.status.in_(["pending", "processing"]))
                )
            ).first()
        if busy is None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("webhook events never settled")


async def snapshot(database: Database, tables: tuple[Any, ...] = SNAPSHOT_TABLES) -> Snapshot:
    """Every row of the tables a billing call could write (by default with the webhook inbox)."""
    return await snapshot_of(database, tables)


async def customers_by_email(gateway: StripeGateway, email: str) -> list[Any]:
    page = await gateway.v1.customers.list_async({"email": email, "limit": 100})
    return list(page.data)
