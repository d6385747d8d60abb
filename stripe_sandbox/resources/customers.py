"""Customers: create, retrieve, update, delete, list, search."""

from __future__ import annotations

from typing import Any

from stripe.params import (
    CustomerCreateParams,
    CustomerDeleteParams,
    CustomerListParams,
    CustomerRetrieveParams,
    CustomerSearchParams,
    CustomerUpdateParams,
)

from stripe_sandbox.api import (
    Call,
    apply_metadata,
    created_filter,
    endpoint,
    paginate,
    search_matcher,
    search_result,
)
from stripe_sandbox.errors import resource_missing
from stripe_sandbox.store import new_id

# Fields the sandbox stores as given when a create or update names them.
_PLAIN_FIELDS = ("description", "email", "name", "phone", "preferred_locales", "tax_exempt")


def new_customer(now: int, params: dict[str, Any]) -> dict[str, Any]:
    customer: dict[str, Any] = {
        "id": new_id("cus"),
        "object": "customer",
        "address": None,
        "balance": params.get("balance", 0),
        "created": now,
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "discount": None,
        "email": None,
        "invoice_prefix": new_id("x")[2:10].upper(),
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": False,
        "metadata": {},
        "name": None,
        "next_invoice_sequence": 1,
        "phone": None,
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": None,
    }
    return _apply(customer, params)


def _apply(customer: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    for name in _PLAIN_FIELDS:
        if name in params:
            customer[name] = params[name] or None if name != "preferred_locales" else params[name]
    if "metadata" in params:
        customer["metadata"] = apply_metadata(customer["metadata"], params["metadata"])
    if "address" in params:
        customer["address"] = params["address"] or None
    if "shipping" in params:
        customer["shipping"] = params["shipping"] or None
    if "invoice_settings" in params:
        settings = dict(customer["invoice_settings"])
        for key, value in params["invoice_settings"].items():
            settings[key] = value or None
        customer["invoice_settings"] = settings
    return customer


@endpoint("POST", "/v1/customers", CustomerCreateParams)
async def create_customer(call: Call) -> dict[str, Any]:
    customer = new_customer(call.tx.now(), call.params)
    await call.tx.insert(customer)
    await call.tx.emit("customer.created", customer)
    return customer


async def live_customer(call: Call, customer_id: str) -> dict[str, Any]:
    """A customer that is not deleted (a deleted one is a 404 for everything but retrieve)."""
    customer = await call.tx.get("customer", customer_id)
    if customer.get("deleted"):
        raise resource_missing("customer", customer_id)
    return customer


@endpoint("GET", "/v1/customers/{id}", CustomerRetrieveParams)
async def retrieve_customer(call: Call) -> dict[str, Any]:
    customer = await call.tx.get("customer", call.path["id"])
    if customer.get("deleted"):
        # As Stripe does: a deleted customer stays retrievable, as a stub.
        return {"id": customer["id"], "object": "customer", "deleted": True}
    return customer


@endpoint("POST", "/v1/customers/{id}", CustomerUpdateParams)
async def update_customer(call: Call) -> dict[str, Any]:
    customer = await live_customer(call, call.path["id"])
    before = {key: customer.get(key) for key in call.params if key != "expand"}
    _apply(customer, call.params)
    changed = {key: value for key, value in before.items() if customer.get(key) != value}
    await call.tx.save(customer)
    if changed:
        await call.tx.emit("customer.updated", customer, previous_attributes=changed)
    return customer


@endpoint("DELETE", "/v1/customers/{id}", CustomerDeleteParams)
async def delete_customer(call: Call) -> dict[str, Any]:
    """Deleting a customer cancels its subscriptions at once, as Stripe does."""
    from stripe_sandbox.engine import invoicing  # the billing engine imports this module's helpers

    customer = await live_customer(call, call.path["id"])
    live = await call.tx.all(
        "subscription",
        lambda s: (
            s.get("customer") == customer["id"] and s.get("status") not in ("canceled", "incomplete_expired")
        ),
    )
    for subscription in live:
        await invoicing.cancel_subscription(call.tx, call.config, subscription, call.tx.now())
    await call.tx.emit("customer.deleted", customer)
    await call.tx.save({**customer, "deleted": True})
    return {"id": customer["id"], "object": "customer", "deleted": True}


@endpoint("GET", "/v1/customers", CustomerListParams)
async def list_customers(call: Call) -> dict[str, Any]:
    email = call.params.get("email")
    in_range = created_filter(call.params)
    customers = await call.tx.all(
        "customer",
        lambda c: not c.get("deleted") and in_range(c) and (email is None or c.get("email") == email),
    )
    return paginate(customers, call.params, call.url)


@endpoint("GET", "/v1/customers/search", CustomerSearchParams)
async def search_customers(call: Call) -> dict[str, Any]:
    matcher = search_matcher(call.params["query"])
    matches = await call.tx.all("customer", lambda c: not c.get("deleted") and matcher(c))
    return search_result(matches, call.params, call.url)
