"""Drive the sandbox the way a customer and Stripe would: catalog, checkout, clock, cards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from sqlalchemy import select

from billing.catalog import sync_catalog
from billing.plans import load_catalog
from billing.stripe_gateway import StripeGateway
from db.engine import Database
from db.models import account_table
from tests.conftest import Service

T = TypeVar("T")


async def setup_catalog(gateway: StripeGateway) -> dict[str, str]:
    """Sync the shipped catalog into the sandbox; lookup key -> price id."""
    await sync_catalog(catalog=load_catalog(), gateway=gateway, return_url="http://app.test/billing")
    prices = await gateway.v1.prices.list_async({"active": True, "limit": 100})
    return {price.lookup_key: price.id for price in prices.data if price.lookup_key}


async def control(service: Service, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(f"{service.url}/sandbox/_control/{path}", json=body or {})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def checkout(
    gateway: StripeGateway,
    prices: dict[str, str],
    user_id: str,
    lookup_key: str = "starter_monthly",
    *,
    trial_days: int | None = 14,
    metered: tuple[str, ...] = (),
) -> tuple[str, str]:
    """A customer for `user_id` and an open checkout session; returns (customer id, session id).

    `metered`: lookup keys of metered prices to add as line items (no quantity), as our checkout does.
    """
    customer = await gateway.v1.customers.create_async(
        {"email": f"{user_id}@example.com", "metadata": {"userId": user_id}}
    )
    subscription_data: dict[str, Any] = {"metadata": {"userId": user_id}}
    if trial_days:
        subscription_data["trial_period_days"] = trial_days
    session = await gateway.v1.checkout.sessions.create_async(
        {
            "mode": "subscription",
            "customer": customer.id,
            "client_reference_id": user_id,
            "line_items": [
                {"price": prices[lookup_key], "quantity": 1},
                *({"price": prices[key]} for key in metered),
            ],
            "subscription_data": subscription_data,  # type: ignore[typeddict-item]
            "success_url": "http://app.test/billing/success?session_id={CHECKOUT_SESSION_ID}",
            "cancel_url": "http://app.test/pricing",
        }
    )
    return customer.id, session.id


async def subscribe(
    service: Service,
    gateway: StripeGateway,
    prices: dict[str, str],
    user_id: str,
    lookup_key: str = "starter_monthly",
    *,
    trial_days: int | None = 14,
    metered: tuple[str, ...] = (),
) -> tuple[str, str]:
    """Check out and pay; returns (customer id, subscription id)."""
    customer_id, session_id = await checkout(
        gateway, prices, user_id, lookup_key, trial_days=trial_days, metered=metered
    )
    await control(service, f"checkout/{session_id}/complete", {"outcome": "paid"})
    session = await gateway.v1.checkout.sessions.retrieve_async(session_id)
    assert session.subscription is not None
    subscription = session.subscription if isinstance(session.subscription, str) else session.subscription.id
    return customer_id, subscription


# A renewal's invoice is finalized and charged an hour after the period ends, as on Stripe.
CHARGE_DELAY = 3_600


async def advance(service: Service, seconds: int) -> dict[str, Any]:
    return await control(service, "clock/advance", {"seconds": seconds})


async def advance_to(service: Service, moment: int) -> dict[str, Any]:
    """Move the sandbox clock to `moment` (unix seconds); a moment already past moves nothing."""
    now = int((await advance(service, 0))["now"])
    return await advance(service, max(0, moment - now))


async def period_end(gateway: StripeGateway, subscription_id: str) -> int:
    """The end of the subscription's current period, as Stripe reports it (its licensed item's)."""
    subscription = await gateway.v1.subscriptions.retrieve_async(subscription_id)
    items = subscription["items"].data
    licensed = [
        item for item in items if item.price.recurring and item.price.recurring.usage_type == "licensed"
    ]
    return int((licensed or items)[0].current_period_end)


async def advance_past_renewal(
    service: Service, gateway: StripeGateway, subscription_id: str, *, margin: int = 60
) -> dict[str, Any]:
    """Move the clock `margin` seconds past the renewal's charge (the period's end plus the charge
    delay): the time the subscription reports, whatever the month's or the year's length."""
    return await advance_to(service, await period_end(gateway, subscription_id) + CHARGE_DELAY + margin)


async def card_fails(service: Service, customer_id: str, fails: bool = True) -> None:
    await control(service, f"customers/{customer_id}/payment_method", {"fails": fails})


async def account(database: Database, user_id: str) -> Any:
    async with database.read() as conn:
        return (await conn.execute(select(account_table).where(account_table.c.user_id == user_id))).first()


async def wait_for_account(database: Database, user_id: str, **expected: Any) -> Any:
    """Poll until the account row has the expected values (webhooks are asynchronous)."""
    deadline = time.monotonic() + 20
    row = None
    while time.monotonic() < deadline:
        row = await account(database, user_id)
        if row is not None and all(getattr(row, key) == value for key, value in expected.items()):
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"account {user_id} never reached {expected}; last seen {row}")


async def raw_events(service: Service, **params: Any) -> list[dict[str, Any]]:
    """Events as Stripe's JSON (the SDK's objects turn decimal strings into Decimals), oldest first."""
    query = {"limit": 100, **params}
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"{service.url}/sandbox/v1/events", params=query, headers={"Authorization": "Bearer sk_test_x"}
        )
    assert response.status_code == 200, response.text
    return list(reversed(response.json()["data"]))


async def eventually(check: Callable[[], Awaitable[T]], *, what: str, seconds: float = 20) -> T:
    """Poll `check` until it returns something truthy (webhooks land asynchronously)."""
    deadline = time.monotonic() + seconds
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}; last result {result!r}")
        await asyncio.sleep(0.05)


async def settle(service_url: str, database: Database) -> None:
    """Wait until the sandbox has delivered every event and the service has applied them all."""
    from db.models import event_table

    async def quiet() -> bool:
        async with httpx.AsyncClient() as client:
            delivery = (await client.get(f"{service_url}/sandbox/_control/delivery")).json()
        async with database.read() as conn:
            busy = (
                await conn.execute(
                    select(event_table.c.id)
                    .where(event_table.c.status.in_(["pending", "processing"]))
                    .limit(1)
                )
            ).first()
        return delivery["pending"] == 0 and busy is None

    await eventually(quiet, what="sandbox outbox and service inbox drained")
