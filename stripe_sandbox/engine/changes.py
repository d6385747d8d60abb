"""Changing a subscription: new items or a reset anchor and their prorations, what a change would
bill (the invoice preview), `update_subscription` and `resume_subscription`."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from stripe_sandbox.api import SandboxConfig, apply_metadata
from stripe_sandbox.engine.creation import end_trial, notify_trial_will_end
from stripe_sandbox.engine.invoice_lines import (
    Line,
    create_invoice_item,
    pending_lines,
    period_line,
    proration_line,
    usage_line,
)
from stripe_sandbox.engine.invoicing import (
    build_invoice,
    create_invoice,
    finalize_invoice,
    settle_subscription,
)
from stripe_sandbox.engine.payments import attempt_payment, emit, reload
from stripe_sandbox.engine.periods import (
    BILLED_STATUSES,
    Obj,
    add_intervals,
    billing_mode_of,
    check_compatible,
    embedded_price,
    get_price,
    interval_of,
    is_metered,
    item_list,
    item_period,
    items_of,
    latest_period_end,
    new_item,
    next_boundary,
    period_for_new_item,
    period_of,
    plan_from_price,
)
from stripe_sandbox.errors import (
    StripeError,
    card_declined,
    parameter_invalid,
    parameter_missing,
    resource_missing,
    unsupported,
)
from stripe_sandbox.store import Transaction


@dataclass
class Change:
    """The effect of new items (and/or a reset anchor) on a subscription, computed at `at`."""

    items: list[Obj]
    prorations: list[Line]
    period_charges: list[Line]
    usage: list[Line]
    invoice_now: bool
    reset_anchor: bool
    now: int
    at: int
    period: tuple[int, int]


async def resolve_items(
    tx: Transaction,
    subscription: Obj,
    specs: list[Obj],
    now: int,
    param: str = "items",
) -> list[Obj]:
    """Apply `items[]` parameters (id / price / quantity / deleted / metadata) to a copy of the items."""
    result = [copy.deepcopy(item) for item in items_of(subscription)]
    for index, spec in enumerate(specs):
        name = f"{param}[{index}]"
        for key in ("price_data", "discounts", "billing_thresholds", "tax_rates", "current_trial"):
            if key in spec:
                raise unsupported(f"{name}[{key}]")
        price_id = spec.get("price") or spec.get("plan")
        if spec.get("id"):
            item = next((candidate for candidate in result if candidate["id"] == spec["id"]), None)
            if item is None:
                raise resource_missing("subscription_item", str(spec["id"]), f"{name}[id]")
            if spec.get("deleted"):
                result.remove(item)
                continue
            if price_id and price_id != item["price"]["id"]:
                price = await get_price(tx, str(price_id), f"{name}[price]")
                item["price"] = embedded_price(price)
                item["plan"] = plan_from_price(price)
                if is_metered(price):
                    item["quantity"] = None
                elif item.get("quantity") is None:
                    item["quantity"] = 1
        else:
            if spec.get("deleted"):
                raise parameter_missing(f"{name}[id]")
            if not price_id:
                raise parameter_missing(f"{name}[price]")
            price = await get_price(tx, str(price_id), f"{name}[price]")
            period = period_for_new_item(subscription, price, now)
            item = new_item(subscription["id"], price, None, period, now)
            result.append(item)
        if "quantity" in spec:
            if is_metered(item["price"]):
                raise parameter_invalid(
                    f"{name}[quantity]", "Quantity should not be specified where usage_type is `metered`."
                )
            quantity = int(spec["quantity"])
            if quantity < 0:
                raise parameter_invalid(f"{name}[quantity]", "This value must be greater than or equal to 0.")
            item["quantity"] = quantity
        if "metadata" in spec:
            item["metadata"] = apply_metadata(item.get("metadata") or {}, spec["metadata"])
    if not result:
        raise parameter_invalid(param, "A subscription must have at least one item.")
    seen: set[str] = set()
    for item in result:
        if item["price"]["id"] in seen:
            raise parameter_invalid(
                param, f"Cannot add multiple subscription items with the same price: {item['price']['id']}"
            )
        seen.add(item["price"]["id"])
    check_compatible([item["price"] for item in result], param, billing_mode=billing_mode_of(subscription))
    return result


def _licensed_intervals(items: list[Obj]) -> set[tuple[str, int]]:
    return {interval_of(item["price"]) for item in items if not is_metered(item["price"])}


def _changed(before: Obj | None, after: Obj | None) -> bool:
    if before is None or after is None:
        return True
    return bool(
        before["price"]["id"] != after["price"]["id"] or before.get("quantity") != after.get("quantity")
    )


def items_differ(before: list[Obj], after: list[Obj]) -> bool:
    if [item["id"] for item in before] != [item["id"] for item in after]:
        return True
    return any(
        _changed(a, b) or a.get("metadata") != b.get("metadata") for a, b in zip(before, after, strict=True)
    )


async def plan_change(
    tx: Transaction,
    subscription: Obj,
    new_items: list[Obj],
    *,
    proration_behavior: str,
    now: int,
    proration_date: int | None = None,
    reset_anchor: bool = False,
) -> Change:
    """What replacing the subscription's items with `new_items` charges, without changing anything."""
    period = period_of(subscription)
    at = now if proration_date is None else proration_date
    if proration_date is not None and not period[0] <= proration_date <= period[1]:
        raise parameter_invalid(
            "proration_date", "proration_date must be within the subscription's current period."
        )
    trialing = subscription["status"] == "trialing"
    old_items = items_of(subscription)
    before = {item["id"]: item for item in old_items}
    after = {item["id"]: item for item in new_items}
    # A kept item moving to another interval, or licensed items all replaced by ones of other
    # intervals, resets the anchor for every item. Adding an item of another interval beside the
    # kept ones (flexible mode) does not: it gets its own period on the anchor.
    kept_licensed = [item for item in new_items if item["id"] in before and not is_metered(item["price"])]
    interval_changed = any(
        interval_of(item["price"]) != interval_of(before[item["id"]]["price"])
        for item in new_items
        if item["id"] in before
    ) or (not kept_licensed and _licensed_intervals(old_items) != _licensed_intervals(new_items))
    reset = not trialing and (reset_anchor or interval_changed)
    prorations: list[Line] = []
    if not trialing and proration_behavior != "none" and subscription["status"] in BILLED_STATUSES:
        for item in old_items:
            if not is_metered(item["price"]) and (reset or _changed(item, after.get(item["id"]))):
                line = await proration_line(tx, item, item_period(item), at, credit=True)
                if line.amount:
                    prorations.append(line)
        if not reset:
            for item in new_items:
                if not is_metered(item["price"]) and _changed(before.get(item["id"]), item):
                    line = await proration_line(tx, item, item_period(item), at, credit=False)
                    if line.amount:
                        prorations.append(line)
    items = [copy.deepcopy(item) for item in new_items]
    period_charges: list[Line] = []
    usage: list[Line] = []
    if reset:
        for item in items:
            interval, count = interval_of(item["price"])
            item["current_period_start"], item["current_period_end"] = (
                now,
                add_intervals(now, interval, count, 1),
            )
        period_charges = [
            await period_line(tx, item, item_period(item)) for item in items if not is_metered(item["price"])
        ]
        usage = [
            await usage_line(tx, item, str(subscription["customer"]), (item_period(item)[0], now))
            for item in old_items
            if is_metered(item["price"])
        ]
    invoice_now = reset or (proration_behavior == "always_invoice" and bool(prorations))
    return Change(
        items=items,
        prorations=prorations,
        period_charges=period_charges,
        usage=usage,
        invoice_now=invoice_now,
        reset_anchor=reset,
        now=now,
        at=at,
        period=period,
    )


async def apply_change(
    tx: Transaction,
    config: SandboxConfig,
    subscription: Obj,
    change: Change,
    *,
    payment_behavior: str = "allow_incomplete",
) -> tuple[Obj, Obj, Obj | None]:
    """Store a planned change; returns (subscription, previous attributes, invoice billed now).

    The caller emits `customer.subscription.updated` (it may merge other attributes). With
    `payment_behavior=error_if_incomplete` a failed charge raises 402 `card_declined` and the
    whole transaction rolls back, leaving the subscription unchanged.
    """
    previous: Obj = {"items": copy.deepcopy(subscription["items"])}
    subscription["items"] = item_list(subscription["id"], change.items)
    if change.reset_anchor:
        previous["billing_cycle_anchor"] = subscription["billing_cycle_anchor"]
        subscription["billing_cycle_anchor"] = change.now
    customer_id = str(subscription["customer"])
    for line in change.prorations:
        await create_invoice_item(tx, customer_id, line, change.now)
    await tx.save(subscription)
    invoice = None
    if change.invoice_now:
        lines = await pending_lines(tx, subscription["id"]) + change.period_charges + change.usage
        invoice = await create_invoice(
            tx,
            customer_id=customer_id,
            subscription=subscription,
            lines=lines,
            billing_reason="subscription_update",
            period=(change.period[0], change.now) if change.reset_anchor else (change.now, change.now),
            now=change.now,
        )
        previous["latest_invoice"] = subscription.get("latest_invoice")
        subscription["latest_invoice"] = invoice["id"]
        await tx.save(subscription)
        await finalize_invoice(tx, config, invoice, change.now)
        paid = await attempt_payment(tx, invoice, change.now)
        if not paid and payment_behavior == "error_if_incomplete":
            raise card_declined()
        await settle_subscription(tx, config, invoice, paid, change.now)
        subscription = await reload(tx, subscription)
        invoice = await reload(tx, invoice)
    return subscription, previous, invoice


async def preview_change(tx: Transaction, subscription: Obj, change: Change | None, now: int) -> Obj:
    """The invoice a change bills now, or (when it bills nothing now) the next renewal invoice."""
    customer = await tx.get("customer", str(subscription["customer"]))
    pending = await pending_lines(tx, subscription["id"])
    if change is not None and change.invoice_now:
        lines = pending + change.prorations + change.period_charges + change.usage
        period = (change.period[0], change.now) if change.reset_anchor else (change.now, change.now)
        return build_invoice(
            customer=customer,
            subscription=subscription,
            lines=lines,
            billing_reason="subscription_update",
            period=period,
            now=now,
            preview=True,
        )
    items = change.items if change is not None else items_of(subscription)
    lines = pending + (change.prorations if change is not None else [])
    trialing = subscription["status"] == "trialing"
    end = min(item_period(item)[1] for item in items)
    if trialing:
        end = int(subscription["trial_end"] or end)
    # The next invoice bills the items whose period ends first (all of them after a trial).
    due = items if trialing else [item for item in items if item_period(item)[1] <= end]
    start = min(item_period(item)[0] for item in due)
    anchor = int(subscription["billing_cycle_anchor"])
    for item in due:
        if is_metered(item["price"]):
            if not trialing:
                usage_period = (item_period(item)[0], min(now, end))
                lines.append(await usage_line(tx, item, str(subscription["customer"]), usage_period))
        else:
            interval, count = interval_of(item["price"])
            lines.append(await period_line(tx, item, (end, next_boundary(anchor, interval, count, end))))
    return build_invoice(
        customer=customer,
        subscription=subscription,
        lines=lines,
        billing_reason="upcoming",
        period=(start, end),
        now=now,
        preview=True,
    )


def _ensure_not_canceled(subscription: Obj, params: Obj) -> None:
    if subscription["status"] in ("canceled", "incomplete_expired") and set(params) - {
        "metadata",
        "cancellation_details",
        "expand",
    }:
        raise StripeError(
            400, "A canceled subscription can only update its cancellation_details and metadata."
        )


_UNSUPPORTED_UPDATE = (
    "add_invoice_items",
    "application_fee_percent",
    "billing_schedules",
    "billing_thresholds",
    "collection_method",
    "days_until_due",
    "discounts",
    "on_behalf_of",
    "pending_invoice_item_interval",
    "transfer_data",
    "trial_from_plan",
)


async def update_subscription(
    tx: Transaction, config: SandboxConfig, subscription_id: str, params: Obj
) -> Obj:
    """`POST /v1/subscriptions/{id}`: items and proration, cancellation, metadata, anchor reset."""
    subscription = await tx.get("subscription", subscription_id)
    now = tx.now()
    _ensure_not_canceled(subscription, params)
    for key in _UNSUPPORTED_UPDATE:
        if key in params:
            raise unsupported(key)
    if subscription.get("schedule") and ({"cancel_at_period_end", "cancel_at"} & set(params)):
        raise StripeError(
            400,
            f"The subscription is managed by the subscription schedule `{subscription['schedule']}`, and "
            "updating any cancelation behavior directly is not allowed. Please update the schedule instead.",
        )
    previous: Obj = {}

    def record(key: str) -> None:
        if key not in previous:
            previous[key] = copy.deepcopy(subscription.get(key))

    if "metadata" in params:
        record("metadata")
        subscription["metadata"] = apply_metadata(subscription.get("metadata") or {}, params["metadata"])
    for key in ("description", "default_payment_method"):
        if key in params:
            record(key)
            subscription[key] = params[key] or None
    if "pause_collection" in params:
        record("pause_collection")
        subscription["pause_collection"] = params["pause_collection"] or None
    if "cancellation_details" in params:
        record("cancellation_details")
        details = dict(subscription.get("cancellation_details") or {})
        for key in ("comment", "feedback"):
            if key in params["cancellation_details"]:
                details[key] = params["cancellation_details"][key] or None
        subscription["cancellation_details"] = details
    if "cancel_at_period_end" in params or "cancel_at" in params:
        for key in ("cancel_at_period_end", "cancel_at", "canceled_at"):
            record(key)
        cancel_at = params.get("cancel_at")
        if params.get("cancel_at_period_end") or cancel_at == "min_period_end":
            cancel_at = period_of(subscription)[1]  # the earliest item period end
        elif cancel_at == "max_period_end":
            cancel_at = latest_period_end(subscription)
        if cancel_at in (None, "", False):
            subscription["cancel_at"] = None
            subscription["cancel_at_period_end"] = False
            subscription["canceled_at"] = None
        else:
            if int(cancel_at) <= now:
                raise parameter_invalid("cancel_at", "cancel_at must be in the future.")
            subscription["cancel_at"] = int(cancel_at)
            subscription["cancel_at_period_end"] = int(cancel_at) == period_of(subscription)[1]
            subscription["canceled_at"] = now
            subscription["cancellation_details"] = {
                **(subscription.get("cancellation_details") or {}),
                "reason": "cancellation_requested",
            }
    if params.get("trial_end") == "now" and subscription["status"] == "trialing":
        await tx.save(subscription)
        await notify_trial_will_end(tx, subscription)
        await end_trial(tx, config, subscription, now, immediately=True)
        subscription = await tx.get("subscription", subscription_id)
    elif "trial_end" in params:
        raise unsupported("trial_end", "only `now` on a trialing subscription")

    reset = (params.get("billing_cycle_anchor") or {}).get("type") == "now"
    if "items" in params or reset:
        if subscription["status"] == "paused":
            raise StripeError(400, "A paused subscription cannot be updated; resume it first.")
        items = await resolve_items(tx, subscription, params.get("items") or [], now)
        change = await plan_change(
            tx,
            subscription,
            items,
            proration_behavior=str(params.get("proration_behavior") or "create_prorations"),
            now=now,
            proration_date=params.get("proration_date"),
            reset_anchor=reset,
        )
        if change.reset_anchor or items_differ(items_of(subscription), change.items):
            subscription, item_previous, _invoice = await apply_change(
                tx,
                config,
                subscription,
                change,
                payment_behavior=str(params.get("payment_behavior") or "allow_incomplete"),
            )
            for key, value in item_previous.items():
                previous.setdefault(key, value)
    changed = {key: value for key, value in previous.items() if subscription.get(key) != value}
    await tx.save(subscription)
    if changed:
        await emit(tx, "customer.subscription.updated", subscription, changed)
    return await tx.get("subscription", subscription_id)


async def resume_subscription(
    tx: Transaction, config: SandboxConfig, subscription: Obj, now: int, params: Obj
) -> Obj:
    """`POST /v1/subscriptions/{id}/resume`: a paused subscription starts a new period now."""
    if subscription["status"] != "paused":
        raise StripeError(400, "Only a subscription with status `paused` can be resumed.")
    anchor_type = (params.get("billing_cycle_anchor") or {}).get("type", "now")
    if anchor_type != "now":
        raise unsupported("billing_cycle_anchor", "only `now`")
    previous: Obj = {"status": "paused", "items": copy.deepcopy(subscription["items"])}
    for item in items_of(subscription):
        interval, count = interval_of(item["price"])
        new_period = (now, add_intervals(now, interval, count, 1))
        item["current_period_start"], item["current_period_end"] = new_period
    previous["billing_cycle_anchor"] = subscription["billing_cycle_anchor"]
    subscription["billing_cycle_anchor"] = now
    subscription["status"] = "active"
    subscription["pause_collection"] = None
    lines = await pending_lines(tx, subscription["id"]) + [
        await period_line(tx, item, item_period(item))
        for item in items_of(subscription)
        if not is_metered(item["price"])
    ]
    await tx.save(subscription)
    invoice = await create_invoice(
        tx,
        customer_id=str(subscription["customer"]),
        subscription=subscription,
        lines=lines,
        billing_reason="subscription_cycle",
        period=(now, now),
        now=now,
    )
    previous["latest_invoice"] = subscription.get("latest_invoice")
    subscription["latest_invoice"] = invoice["id"]
    await tx.save(subscription)
    await emit(tx, "customer.subscription.resumed", subscription)
    await emit(tx, "customer.subscription.updated", subscription, previous)
    await finalize_invoice(tx, config, invoice, now)
    paid = await attempt_payment(tx, invoice, now)
    if not paid and params.get("payment_behavior") == "resume_on_payment_success":
        raise card_declined()
    await settle_subscription(tx, config, invoice, paid, now)
    return await reload(tx, subscription)
