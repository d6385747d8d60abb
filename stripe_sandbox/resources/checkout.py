"""Checkout Sessions in subscription mode: create, retrieve, list, expire, line items.

The customer's side of Checkout (paying, or having the card declined) is
`engine.creation.complete_checkout`, reached through `POST /_control/checkout/{id}/complete` or
a hosted page; this module is the merchant's API.
"""

from __future__ import annotations

import json
from typing import Any

from stripe.params.checkout import (
    SessionCreateParams,
    SessionExpireParams,
    SessionListLineItemsParams,
    SessionListParams,
    SessionRetrieveParams,
)

from stripe_sandbox.api import Call, created_filter, endpoint, paginate
from stripe_sandbox.engine import creation, discounts, periods
from stripe_sandbox.errors import StripeError, parameter_invalid, parameter_missing, unsupported
from stripe_sandbox.store import new_id

# Parameters of a session that the sandbox cannot honour: refused rather than ignored.
_UNSUPPORTED = (
    "adaptive_pricing",
    "consent_collection",
    "custom_fields",
    "invoice_creation",
    "optional_items",
    "payment_intent_data",
    "setup_intent_data",
    "shipping_address_collection",
    "shipping_options",
)
_UNSUPPORTED_SUBSCRIPTION_DATA = (
    "application_fee_percent",
    "billing_cycle_anchor",
    "billing_cycle_anchor_config",
    "default_tax_rates",
    "invoice_settings",
    "on_behalf_of",
    "pending_invoice_item_interval",
    "transfer_data",
)


async def _line_items(call: Call) -> tuple[list[dict[str, Any]], int, str]:
    """Validated `line_items`; the first invoice's amount and the currency."""
    specs = call.params.get("line_items")
    if not specs:
        raise parameter_missing("line_items")
    validated: list[dict[str, Any]] = []
    total = 0
    currencies: set[str] = set()
    recurring_prices: list[dict[str, Any]] = []
    trial = bool((call.params.get("subscription_data") or {}).get("trial_period_days")) or bool(
        (call.params.get("subscription_data") or {}).get("trial_end")
    )
    for index, spec in enumerate(specs):
        name = f"line_items[{index}]"
        for key in ("price_data", "adjustable_quantity", "tax_rates"):
            if key in spec:
                raise unsupported(f"{name}[{key}]")
        if "price" not in spec:
            raise parameter_missing(f"{name}[price]")
        price = await periods.get_price(call.tx, spec["price"], f"{name}[price]", recurring=False)
        quantity = spec.get("quantity")
        if periods.is_metered(price):
            if quantity is not None:
                raise parameter_invalid(
                    f"{name}[quantity]", "Quantity should not be specified where usage_type is `metered`."
                )
        elif quantity is None:
            raise parameter_missing(f"{name}[quantity]")
        elif int(quantity) < 1:
            raise parameter_invalid(f"{name}[quantity]", "Quantity must be at least 1.")
        currencies.add(str(price.get("currency")))
        if price.get("recurring"):
            recurring_prices.append(price)
            if not trial:
                total += periods.price_amount(price, int(quantity or 0))
        else:
            total += periods.price_amount(price, int(quantity or 1))
        item: dict[str, Any] = {"price": price["id"], "quantity": quantity}
        if spec.get("metadata"):
            item["metadata"] = spec["metadata"]
        validated.append(item)
    if not recurring_prices:
        raise parameter_invalid(
            "line_items",
            "You must provide at least one recurring price in `subscription` mode when using prices.",
        )
    if len(currencies) > 1:
        raise parameter_invalid("line_items", "All prices must be in the same currency.")
    mode = periods.billing_mode_param(
        (call.params.get("subscription_data") or {}).get("billing_mode"), "subscription_data[billing_mode]"
    )
    periods.check_compatible(recurring_prices, "line_items", billing_mode=mode)
    return validated, total, currencies.pop()


@endpoint("POST", "/v1/checkout/sessions", SessionCreateParams)
async def create_session(call: Call) -> dict[str, Any]:
    params = call.params
    tx = call.tx
    mode = params.get("mode")
    if mode is None:
        raise parameter_missing("mode")
    if mode != "subscription":
        raise unsupported("mode", "the sandbox emulates Checkout in `subscription` mode")
    for key in _UNSUPPORTED:
        if key in params:
            raise unsupported(key)
    data = params.get("subscription_data") or {}
    for key in _UNSUPPORTED_SUBSCRIPTION_DATA:
        if key in data:
            raise unsupported(f"subscription_data[{key}]")
    if params.get("ui_mode", "hosted_page") != "hosted_page":
        raise unsupported("ui_mode", "only `hosted_page`")
    if "success_url" not in params:
        raise parameter_missing("success_url")
    customer_id = params.get("customer")
    if customer_id is not None and "customer_email" in params:
        raise StripeError(
            400, "You may only specify one of these parameters: customer, customer_email.", param="customer"
        )
    if customer_id is not None:
        await tx.get("customer", customer_id, param="customer")
    elif "customer_update" in params:
        raise parameter_invalid("customer_update", "customer_update can only be used with customer.")
    now = tx.now()
    trial_end = data.get("trial_end")
    if trial_end is not None and int(trial_end) < now + 2 * periods.DAY:
        raise parameter_invalid(
            "subscription_data[trial_end]", "The `trial_end` date has to be at least 2 days in the future."
        )
    days = data.get("trial_period_days")
    if days is not None and not 1 <= int(days) <= 730:
        raise parameter_invalid(
            "subscription_data[trial_period_days]", "trial_period_days must be between 1 and 730."
        )
    line_items, total, currency = await _line_items(call)
    if params.get("allow_promotion_codes") and params.get("discounts"):
        raise StripeError(
            400,
            "You may only specify one of these parameters: allow_promotion_codes, discounts.",
            param="discounts",
        )
    await discounts.resolve(tx, list(params.get("discounts") or []), "discounts")
    expires_at = int(params.get("expires_at") or now + creation.CHECKOUT_LIFETIME)
    if not now + 30 * periods.MINUTE <= expires_at <= now + creation.CHECKOUT_LIFETIME:
        raise parameter_invalid(
            "expires_at", "The `expires_at` timestamp must be between 30 minutes and 24 hours from now."
        )
    session_id = new_id("cs_test")
    tax = bool((params.get("automatic_tax") or {}).get("enabled"))
    session: dict[str, Any] = {
        "id": session_id,
        "object": "checkout.session",
        "adaptive_pricing": None,
        "after_expiration": None,
        "allow_promotion_codes": params.get("allow_promotion_codes"),
        "amount_subtotal": total,
        "amount_total": total,
        "automatic_tax": {
            "enabled": tax,
            "liability": {"type": "self"} if tax else None,
            "provider": "stripe" if tax else None,
            "status": "requires_location_inputs" if tax else None,
        },
        "billing_address_collection": params.get("billing_address_collection"),
        "cancel_url": params.get("cancel_url"),
        "client_reference_id": params.get("client_reference_id"),
        "client_secret": None,
        "collected_information": None,
        "consent": None,
        "consent_collection": None,
        "created": now,
        "currency": currency,
        "currency_conversion": None,
        "custom_fields": [],
        "custom_text": {
            "after_submit": None,
            "shipping_address": None,
            "submit": None,
            "terms_of_service_acceptance": None,
        },
        "customer": customer_id,
        "customer_account": None,
        "customer_creation": None if customer_id else "always",
        "customer_details": None,
        "customer_email": params.get("customer_email"),
        "discounts": [
            {"coupon": spec.get("coupon"), "promotion_code": spec.get("promotion_code")}
            for spec in params.get("discounts") or []
        ],
        "expires_at": expires_at,
        "integration_identifier": None,
        "invoice": None,
        "invoice_creation": None,
        "livemode": False,
        "locale": params.get("locale"),
        "managed_payments": None,
        "metadata": dict(params.get("metadata") or {}),
        "mode": "subscription",
        "origin_context": None,
        "payment_intent": None,
        "payment_link": None,
        "payment_method_collection": params.get("payment_method_collection", "always"),
        "payment_method_configuration_details": None,
        "payment_method_options": {},
        "payment_method_types": ["card"],
        "payment_status": "unpaid",
        "permissions": None,
        "phone_number_collection": {"enabled": False},
        "recovered_from": None,
        "saved_payment_method_options": None,
        "setup_intent": None,
        "shipping_address_collection": None,
        "shipping_cost": None,
        "shipping_options": [],
        "status": "open",
        "submit_type": None,
        "subscription": None,
        # Kept as created: the literal {CHECKOUT_SESSION_ID} is filled in only at the redirect.
        "success_url": str(params["success_url"]),
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "ui_mode": "hosted_page",
        "url": f"{call.config.base_url}/checkout/{session_id}",
        "wallet_options": None,
    }
    await tx.insert(session)
    # What completion needs but the session object does not show.
    request = {
        "line_items": line_items,
        "subscription_data": data,
        "automatic_tax": params.get("automatic_tax") or {},
        "customer_update": params.get("customer_update") or {},
        "discounts": list(params.get("discounts") or []),
    }
    await tx.set_state(creation.checkout_request_key(session_id), json.dumps(request))
    return session


@endpoint("GET", "/v1/checkout/sessions/{id}", SessionRetrieveParams)
async def retrieve_session(call: Call) -> dict[str, Any]:
    session = await call.tx.get("checkout.session", call.path["id"])
    if "line_items" in call.params.get("expand", []):
        session["line_items"] = await _line_item_list(call, session)
    return session


@endpoint("GET", "/v1/checkout/sessions", SessionListParams)
async def list_sessions(call: Call) -> dict[str, Any]:
    params = call.params
    for key in ("customer_account", "customer_details", "payment_intent", "payment_link"):
        if key in params:
            raise unsupported(key)
    in_range = created_filter(params)

    def wanted(session: dict[str, Any]) -> bool:
        return (
            in_range(session)
            and params.get("customer") in (None, session.get("customer"))
            and params.get("status") in (None, session.get("status"))
            and params.get("subscription") in (None, session.get("subscription"))
        )

    return paginate(await call.tx.all("checkout.session", wanted), params, call.url)


@endpoint("POST", "/v1/checkout/sessions/{id}/expire", SessionExpireParams)
async def expire_session(call: Call) -> dict[str, Any]:
    session = await call.tx.get("checkout.session", call.path["id"])
    return await creation.expire_checkout(call.tx, session, call.tx.now())


@endpoint("GET", "/v1/checkout/sessions/{id}/line_items", SessionListLineItemsParams)
async def list_session_line_items(call: Call) -> dict[str, Any]:
    session = await call.tx.get("checkout.session", call.path["id"])
    listed = await _line_item_list(call, session)
    return paginate(listed["data"], call.params, listed["url"])


async def _line_item_list(call: Call, session: dict[str, Any]) -> dict[str, Any]:
    request = json.loads(await call.tx.get_state(creation.checkout_request_key(session["id"]), "{}"))
    trial = bool((request.get("subscription_data") or {}).get("trial_period_days")) or bool(
        (request.get("subscription_data") or {}).get("trial_end")
    )
    items = []
    for index, spec in enumerate(request.get("line_items", [])):
        price = await call.tx.get("price", spec["price"])
        quantity = spec.get("quantity")
        amount = 0 if trial and price.get("recurring") else periods.price_amount(price, int(quantity or 0))
        items.append(
            {
                "id": f"li_{session['id'][-20:]}{index:04d}",
                "object": "item",
                "adjustable_quantity": None,
                "amount_discount": 0,
                "amount_subtotal": amount,
                "amount_tax": 0,
                "amount_total": amount,
                "currency": price.get("currency"),
                "description": await periods.product_name(call.tx, price),
                "discounts": [],
                "metadata": spec.get("metadata") or {},
                "price": periods.embedded_price(price),
                "quantity": quantity,
                "taxes": [],
            }
        )
    url = f"/v1/checkout/sessions/{session['id']}/line_items"
    return {"object": "list", "data": items, "has_more": False, "url": url}
