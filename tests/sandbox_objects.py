"""Helpers for sandbox subscription tests: catalog objects, control routes, captured events."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from typing import Any

import httpx

from billing.stripe_gateway import StripeGateway
from stripe_sandbox.store import new_id
from tests.conftest import Service

DAY = 86_400


async def insert_price(
    service: Service,
    *,
    unit_amount: int,
    interval: str | None = "month",
    usage_type: str = "licensed",
    meter: str | None = None,
    product_name: str = "Pro",
    currency: str = "usd",
) -> str:
    """A product and a price in Stripe's shape, put straight into the sandbox's store."""
    store = service.app.state.sandbox.store
    async with store.transaction() as tx:
        now = tx.now()
        product = {
            "id": new_id("prod"),
            "object": "product",
            "active": True,
            "created": now,
            "default_price": None,
            "description": None,
            "images": [],
            "livemode": False,
            "marketing_features": [],
            "metadata": {},
            "name": product_name,
            "package_dimensions": None,
            "shippable": None,
            "statement_descriptor": None,
            "tax_code": None,
            "type": "service",
            "unit_label": None,
            "updated": now,
            "url": None,
        }
        price = {
            "id": new_id("price"),
            "object": "price",
            "active": True,
            "billing_scheme": "per_unit",
            "created": now,
            "currency": currency,
            "custom_unit_amount": None,
            "livemode": False,
            "lookup_key": None,
            "metadata": {},
            "nickname": None,
            "product": product["id"],
            "recurring": None
            if interval is None
            else {
                "interval": interval,
                "interval_count": 1,
                "meter": meter,
                "trial_period_days": None,
                "usage_type": usage_type,
            },
            "tax_behavior": "unspecified",
            "tiers_mode": None,
            "transform_quantity": None,
            "type": "one_time" if interval is None else "recurring",
            "unit_amount": unit_amount,
            "unit_amount_decimal": str(unit_amount),
        }
        await tx.insert(product)
        await tx.insert(price)
    return str(price["id"])


async def control(service: Service, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(f"{service.url}/sandbox/_control/{path}", json=body or {})


async def control_ok(service: Service, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = await control(service, path, body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def advance(service: Service, seconds: int) -> dict[str, Any]:
    return await control_ok(service, "clock/advance", {"seconds": seconds})


async def clock(service: Service) -> int:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{service.url}/sandbox/_control/clock")
    return int(response.json()["now"])


async def card_fails(service: Service, customer_id: str, fails: bool = True) -> None:
    await control_ok(service, f"customers/{customer_id}/payment_method", {"fails": fails})


async def events(service: Service) -> list[dict[str, Any]]:
    """Every event the sandbox recorded, oldest first."""
    store = service.app.state.sandbox.store
    async with store.transaction() as tx:
        found = await tx.all("event")
    return list(reversed(found))


async def event_types(service: Service, since: int = 0) -> list[str]:
    return [event["type"] for event in (await events(service))[since:]]


async def open_session(
    gateway: StripeGateway,
    price_id: str,
    *,
    customer_id: str | None = None,
    trial_days: int | None = None,
    quantity: int | None = 1,
    metadata: dict[str, str] | None = None,
    metered: tuple[str, ...] = (),
    billing_mode: str | None = None,
) -> Any:
    """`metered`: metered prices added as line items without quantity; `billing_mode`: its type."""
    line: dict[str, Any] = {"price": price_id}
    if quantity is not None:
        line["quantity"] = quantity
    params: dict[str, Any] = {
        "mode": "subscription",
        "line_items": [line, *({"price": metered_price} for metered_price in metered)],
        "success_url": "https://app.test/done?session={CHECKOUT_SESSION_ID}",
        "cancel_url": "https://app.test/cancel",
    }
    if customer_id is not None:
        params["customer"] = customer_id
    data: dict[str, Any] = {}
    if trial_days is not None:
        data["trial_period_days"] = trial_days
    if metadata:
        data["metadata"] = metadata
    if billing_mode is not None:
        data["billing_mode"] = {"type": billing_mode}
    if data:
        params["subscription_data"] = data
    return await gateway.v1.checkout.sessions.create_async(params)  # type: ignore[arg-type]


async def subscribe(
    service: Service,
    gateway: StripeGateway,
    price_id: str,
    *,
    trial_days: int | None = None,
    quantity: int | None = 1,
    metered: tuple[str, ...] = (),
    billing_mode: str | None = None,
) -> tuple[str, str]:
    """A customer who paid Checkout for `price_id` (and `metered`): (customer id, subscription id)."""
    customer = await gateway.v1.customers.create_async({"email": "payer@example.com"})
    session = await open_session(
        gateway,
        price_id,
        customer_id=customer.id,
        trial_days=trial_days,
        quantity=quantity,
        metered=metered,
        billing_mode=billing_mode,
    )
    result = await control_ok(service, f"checkout/{session.id}/complete", {"outcome": "paid"})
    return customer.id, str(result["subscription"]["id"])


async def move_to_thirty_day_month(service: Service) -> int:
    """Advance the clock to noon UTC on the 5th of the next 30-day month; returns that time."""
    now = await clock(service)
    moment = datetime.fromtimestamp(now, UTC)
    year, month = moment.year, moment.month
    while True:
        month += 1
        if month > 12:
            year, month = year + 1, 1
        if calendar.monthrange(year, month)[1] == 30:
            break
    target = int(datetime(year, month, 5, 12, 0, tzinfo=UTC).timestamp())
    await advance(service, target - now)
    return target
