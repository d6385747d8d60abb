"""A subscription's start: Checkout completed (or expired), the first invoice, and the trial's end.

`end_trial` is here rather than with the clock because an update (`trial_end=now`) ends a trial too.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

from stripe_sandbox.api import SandboxConfig
from stripe_sandbox.engine import discounts
from stripe_sandbox.engine.invoice_lines import (
    TIMES,
    create_invoice_item,
    line_for_price,
    pending_lines,
    period_line,
)
from stripe_sandbox.engine.invoicing import (
    build_invoice,
    cancel_subscription,
    create_invoice,
    customer_address,
    finalize_and_charge,
    finalize_invoice,
    store_invoice,
)
from stripe_sandbox.engine.payments import attempt_payment, create_payment_method, emit, reload
from stripe_sandbox.engine.periods import (
    DAY,
    DEFAULT_BILLING_MODE,
    FINALIZE_DELAY,
    HOUR,
    TRIAL_WILL_END_NOTICE,
    Obj,
    add_intervals,
    billing_mode_object,
    billing_mode_param,
    interval_of,
    is_metered,
    item_list,
    item_period,
    items_of,
    new_item,
    next_boundary,
    price_amount,
    product_name,
)
from stripe_sandbox.errors import StripeError, parameter_invalid
from stripe_sandbox.resources.customers import new_customer
from stripe_sandbox.store import Transaction, new_id

CHECKOUT_LIFETIME = 24 * HOUR


@dataclass
class ItemSpec:
    price: Obj
    quantity: int | None
    metadata: dict[str, str] = field(default_factory=dict)


def new_subscription(
    *,
    customer_id: str,
    specs: list[ItemSpec],
    now: int,
    trial_end: int | None,
    metadata: dict[str, str],
    description: str | None,
    automatic_tax: bool,
    payment_method: str | None,
    missing_payment_method: str = "create_invoice",
    billing_mode: str = DEFAULT_BILLING_MODE,
) -> Obj:
    subscription_id = new_id("sub")
    anchor = trial_end if trial_end is not None else now
    items = []
    for spec in specs:  # each item's first period on its own interval (all end with a trial)
        interval, count = interval_of(spec.price)
        period_end = trial_end if trial_end is not None else add_intervals(anchor, interval, count, 1)
        period = (now, period_end)
        items.append(new_item(subscription_id, spec.price, spec.quantity, period, now, spec.metadata))
    return {
        "id": subscription_id,
        "object": "subscription",
        "application": None,
        "application_fee_percent": None,
        "automatic_tax": {
            "enabled": automatic_tax,
            "disabled_reason": None,
            "liability": {"type": "self"} if automatic_tax else None,
        },
        "billing_cycle_anchor": anchor,
        "billing_cycle_anchor_config": None,
        "billing_mode": billing_mode_object(billing_mode, now),
        "billing_schedules": [],
        "billing_thresholds": None,
        "cancel_at": None,
        "cancel_at_period_end": False,
        "canceled_at": None,
        "cancellation_details": {"comment": None, "feedback": None, "reason": None},
        "collection_method": "charge_automatically",
        "created": now,
        "currency": specs[0].price.get("currency", "usd"),
        "customer": customer_id,
        "customer_account": None,
        "days_until_due": None,
        "default_payment_method": payment_method,
        "default_source": None,
        "default_tax_rates": [],
        "description": description,
        "discounts": [],
        "ended_at": None,
        "invoice_settings": {
            "account_tax_ids": None,
            "custom_fields": None,
            "description": None,
            "footer": None,
            "issuer": {"type": "self"},
        },
        "items": item_list(subscription_id, items),
        "latest_invoice": None,
        "livemode": False,
        "managed_payments": {"enabled": False},
        "metadata": dict(metadata),
        "next_pending_invoice_item_invoice": None,
        "on_behalf_of": None,
        "pause_collection": None,
        "payment_settings": {
            "payment_method_options": None,
            "payment_method_types": None,
            "save_default_payment_method": "off",
        },
        "pending_invoice_item_interval": None,
        "pending_setup_intent": None,
        "pending_update": None,
        "schedule": None,
        "start_date": now,
        "status": "trialing" if trial_end is not None else "active",
        "test_clock": None,
        "transfer_data": None,
        "trial_end": trial_end,
        "trial_settings": {"end_behavior": {"missing_payment_method": missing_payment_method}},
        "trial_start": now if trial_end is not None else None,
    }


async def start_subscription(
    tx: Transaction,
    config: SandboxConfig,
    subscription: Obj,
    one_time: list[ItemSpec],
    now: int,
) -> Obj:
    """Store a new subscription with its first invoice, finalized and paid (`subscription_create`)."""
    trial = subscription["status"] == "trialing"
    lines = [
        await period_line(tx, item, item_period(item), trial=trial)
        for item in items_of(subscription)
        if not is_metered(item["price"])
    ]
    for spec in one_time:
        name = await product_name(tx, spec.price)
        quantity = spec.quantity or 1
        line = line_for_price(
            spec.price,
            amount=price_amount(spec.price, quantity),
            description=f"{quantity} {TIMES} {name}",
            quantity=quantity,
            period=(now, now),
            subscription=subscription["id"],
            item=None,
        )
        await create_invoice_item(tx, str(subscription["customer"]), line, now)
        lines.append(line)
    invoice = build_invoice(
        customer=await tx.get("customer", str(subscription["customer"])),
        subscription=subscription,
        lines=lines,
        billing_reason="subscription_create",
        period=(now, now),
        now=now,
    )
    await discounts.apply_to_invoice(tx, invoice, lines, subscription)
    subscription["latest_invoice"] = invoice["id"]
    await tx.insert(subscription)
    await emit(tx, "customer.subscription.created", subscription)
    await store_invoice(tx, invoice, lines)
    await finalize_invoice(tx, config, invoice, now)
    await attempt_payment(tx, invoice, now, succeed=True)
    return invoice


def checkout_request_key(session_id: str) -> str:
    return f"checkout:{session_id}"


async def complete_checkout(
    tx: Transaction,
    config: SandboxConfig,
    session_id: str,
    *,
    outcome: str = "paid",
    email: str | None = None,
    name: str | None = None,
    promotion_code: str | None = None,
) -> Obj:
    """The customer submits the Checkout page. `outcome`: "paid" or "declined" (card refused).

    `promotion_code`: the code the customer typed, when the session allows promotion codes.

    Paid: creates the customer (if the session had none), their card, the subscription
    (trialing when a trial was asked for, else active) and its paid first invoice, and completes
    the session. Declined: the session stays open and nothing is emitted, as on Stripe's page.
    Returns {"session", "subscription", "invoice", "outcome"}.
    """
    session = await tx.get("checkout.session", session_id)
    now = tx.now()
    if session["status"] != "open":
        raise StripeError(
            400, f"This Checkout Session is {session['status']} and can no longer be completed."
        )
    if now >= int(session["expires_at"]):
        raise StripeError(400, "This Checkout Session has expired.")
    if outcome == "declined":
        return {"outcome": "declined", "session": session, "subscription": None, "invoice": None}
    if outcome != "paid":
        raise parameter_invalid("outcome", "outcome must be 'paid' or 'declined'")
    request: Obj = json.loads(await tx.get_state(checkout_request_key(session_id), "{}"))
    specs = list(request.get("discounts") or [])
    if promotion_code:
        specs = [{"promotion_code": await _promotion_code(tx, session, promotion_code)}]
    resolved = await discounts.resolve(tx, specs, "discounts")

    customer_id = session.get("customer")
    if customer_id is None:
        customer = new_customer(now, {"email": email or session.get("customer_email"), "name": name})
        await tx.insert(customer)
        await emit(tx, "customer.created", customer)
        customer_id = customer["id"]
    else:
        customer = await tx.get("customer", customer_id)
        if email or name:
            previous = {"email": customer.get("email"), "name": customer.get("name")}
            customer["email"] = email or customer.get("email")
            customer["name"] = name or customer.get("name")
            await tx.save(customer)
            await emit(tx, "customer.updated", customer, previous)

    method = await create_payment_method(tx, customer_id, now, customer.get("email"))
    data = request.get("subscription_data") or {}
    trial_end: int | None = None
    if data.get("trial_end") is not None:
        trial_end = int(data["trial_end"])
    elif data.get("trial_period_days"):
        trial_end = now + int(data["trial_period_days"]) * DAY
    recurring: list[ItemSpec] = []
    one_time: list[ItemSpec] = []
    for spec in request.get("line_items", []):
        price = await tx.get("price", spec["price"])
        (recurring if price.get("recurring") else one_time).append(
            ItemSpec(price, spec.get("quantity"), dict(spec.get("metadata") or {}))
        )
    subscription = new_subscription(
        customer_id=customer_id,
        specs=recurring,
        now=now,
        trial_end=trial_end,
        metadata=dict(data.get("metadata") or {}),
        description=data.get("description"),
        automatic_tax=bool((request.get("automatic_tax") or {}).get("enabled")),
        payment_method=method["id"],
        billing_mode=billing_mode_param(data.get("billing_mode"), "subscription_data[billing_mode]"),
        missing_payment_method=str(
            ((data.get("trial_settings") or {}).get("end_behavior") or {}).get(
                "missing_payment_method", "create_invoice"
            )
        ),
    )
    made = await discounts.attach(tx, subscription, resolved, now)
    invoice = await start_subscription(tx, config, subscription, one_time, now)
    if trial_end is not None and trial_end - TRIAL_WILL_END_NOTICE <= now:
        await notify_trial_will_end(tx, subscription)

    session["status"] = "complete"
    session["payment_status"] = "paid" if invoice["amount_paid"] > 0 else "no_payment_required"
    session["customer"] = customer_id
    session["subscription"] = subscription["id"]
    session["amount_subtotal"] = invoice["subtotal"]
    session["amount_total"] = invoice["total"]
    session["total_details"]["amount_discount"] = sum(
        int(found["amount"]) for found in invoice["total_discount_amounts"]
    )
    session["discounts"] = [
        {"coupon": found["source"]["coupon"], "promotion_code": found["promotion_code"]} for found in made
    ]
    session["customer_details"] = {
        "address": customer_address(customer),
        "business_name": None,
        "email": customer.get("email"),
        "individual_name": None,
        "name": customer.get("name"),
        "phone": customer.get("phone"),
        "tax_exempt": customer.get("tax_exempt", "none"),
        "tax_ids": [],
    }
    await tx.save(session)
    await emit(tx, "checkout.session.completed", session)
    return {
        "outcome": "paid",
        "session": session,
        "subscription": await reload(tx, subscription),
        "invoice": await reload(tx, invoice),
    }


async def _promotion_code(tx: Transaction, session: Obj, code: str) -> str:
    """The id of the active promotion code the customer typed (codes are case-insensitive)."""
    if not session.get("allow_promotion_codes"):
        raise parameter_invalid("promotion_code", "This Checkout Session does not accept promotion codes.")
    wanted = code.strip().lower()
    found = await tx.all("promotion_code", lambda promo: promo["code"].lower() == wanted and promo["active"])
    if not found:
        raise StripeError(400, "This code is invalid.", code="promotion_code_invalid", param="promotion_code")
    return str(found[0]["id"])


async def expire_checkout(tx: Transaction, session: Obj, now: int) -> Obj:
    if session["status"] != "open":
        raise StripeError(400, 'Only Checkout Sessions with a status in ["open"] can be expired.')
    session["status"] = "expired"
    session["expires_at"] = min(int(session["expires_at"]), now)
    await tx.save(session)
    await emit(tx, "checkout.session.expired", session)
    return session


async def end_trial(
    tx: Transaction, config: SandboxConfig, subscription: Obj, at: int, *, immediately: bool = False
) -> None:
    """The trial ends at `at`: active with a first invoice (or paused/canceled without a card).

    At the trial's scheduled end the invoice is a draft finalized an hour later; when the trial
    is ended by an update (`trial_end=now`) it is finalized and charged `immediately`.
    """
    behavior = ((subscription.get("trial_settings") or {}).get("end_behavior") or {}).get(
        "missing_payment_method"
    )
    customer = await tx.get("customer", str(subscription["customer"]))
    has_method = bool(
        subscription.get("default_payment_method")
        or (customer.get("invoice_settings") or {}).get("default_payment_method")
    )
    previous: Obj = {"status": "trialing", "items": copy.deepcopy(subscription["items"])}
    if not has_method and behavior == "cancel":
        await cancel_subscription(tx, config, subscription, at, reason="cancellation_requested")
        return
    if not has_method and behavior == "pause":
        subscription["status"] = "paused"
        subscription["trial_end"] = at
        await tx.save(subscription)
        await emit(tx, "customer.subscription.paused", subscription)
        await emit(tx, "customer.subscription.updated", subscription, {"status": "trialing"})
        return
    if subscription.get("trial_end") != at:
        previous["trial_end"] = subscription.get("trial_end")
        previous["billing_cycle_anchor"] = subscription["billing_cycle_anchor"]
        subscription["trial_end"] = at
        subscription["billing_cycle_anchor"] = at
    anchor = int(subscription["billing_cycle_anchor"])
    for item in items_of(subscription):
        interval, count = interval_of(item["price"])
        item["current_period_start"], item["current_period_end"] = (
            at,
            next_boundary(anchor, interval, count, at),
        )
    subscription["status"] = "active"
    lines = await pending_lines(tx, subscription["id"]) + [
        await period_line(tx, item, item_period(item))
        for item in items_of(subscription)
        if not is_metered(item["price"])
    ]
    invoice = await create_invoice(
        tx,
        customer_id=str(subscription["customer"]),
        subscription=subscription,
        lines=lines,
        billing_reason="subscription_cycle",
        period=(int(subscription["trial_start"] or at), at),
        now=at,
        finalize_at=None if immediately else at + FINALIZE_DELAY,
    )
    previous["latest_invoice"] = subscription.get("latest_invoice")
    subscription["latest_invoice"] = invoice["id"]
    await tx.save(subscription)
    await emit(tx, "customer.subscription.updated", subscription, previous)
    if immediately:
        await finalize_and_charge(tx, config, invoice, at)


def trial_notice_key(subscription_id: str) -> str:
    return f"trial_will_end:{subscription_id}"


async def notify_trial_will_end(tx: Transaction, subscription: Obj) -> None:
    await tx.set_state(trial_notice_key(subscription["id"]), str(subscription["trial_end"]))
    await emit(tx, "customer.subscription.trial_will_end", subscription)
