"""Subscription schedules made `from_subscription`: create, retrieve, list, update, release, cancel.

The clock (`engine.clock.advance_clock`) starts each next phase when the current one ends.
"""

from __future__ import annotations

import copy
from typing import Any

from stripe.params import (
    SubscriptionScheduleCancelParams,
    SubscriptionScheduleCreateParams,
    SubscriptionScheduleListParams,
    SubscriptionScheduleReleaseParams,
    SubscriptionScheduleRetrieveParams,
    SubscriptionScheduleUpdateParams,
)

from stripe_sandbox.api import Call, apply_metadata, created_filter, endpoint, paginate
from stripe_sandbox.engine import clock, invoicing, payments, periods
from stripe_sandbox.errors import StripeError, parameter_invalid, parameter_missing, unsupported
from stripe_sandbox.store import Transaction, new_id

_PHASE_KEYS = {
    "items",
    "start_date",
    "end_date",
    "duration",
    "proration_behavior",
    "metadata",
    "description",
    "currency",
}


def _phase(
    start: int,
    end: int,
    items: list[dict[str, Any]],
    *,
    currency: str,
    proration_behavior: str = "create_prorations",
    metadata: dict[str, str] | None = None,
    description: str | None = None,
    trial_end: int | None = None,
) -> dict[str, Any]:
    return {
        "add_invoice_items": [],
        "application_fee_percent": None,
        "automatic_tax": None,
        "billing_cycle_anchor": None,
        "billing_thresholds": None,
        "collection_method": None,
        "currency": currency,
        "default_payment_method": None,
        "default_tax_rates": [],
        "description": description,
        "discounts": [],
        "end_date": end,
        "invoice_settings": None,
        "items": items,
        "metadata": metadata or {},
        "on_behalf_of": None,
        "proration_behavior": proration_behavior,
        "start_date": start,
        "transfer_data": None,
        "trial_end": trial_end,
    }


def _phase_item(
    price_id: str, quantity: int | None, metadata: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "billing_thresholds": None,
        "discounts": [],
        "metadata": metadata or {},
        "plan": price_id,
        "price": price_id,
        "quantity": quantity,
        "tax_rates": [],
    }


@endpoint("POST", "/v1/subscription_schedules", SubscriptionScheduleCreateParams)
async def create_schedule(call: Call) -> dict[str, Any]:
    tx = call.tx
    params = call.params
    source = params.get("from_subscription")
    if source is None:
        raise unsupported("customer", "the sandbox creates schedules with `from_subscription` only")
    for key in params:
        if key not in ("from_subscription", "expand"):
            raise StripeError(
                400,
                f"You cannot set `{key}` if `from_subscription` is set. To create a subscription schedule "
                "with other modifications, make two separate API calls.",
                param=key,
            )
    subscription = await tx.get("subscription", source, param="from_subscription")
    if subscription.get("schedule"):
        raise StripeError(
            400,
            "You cannot migrate a subscription that is already attached to a schedule: "
            f"`{subscription['schedule']}`.",
            param="from_subscription",
        )
    if subscription["status"] not in ("active", "trialing", "past_due", "unpaid"):
        raise StripeError(
            400,
            f"You cannot migrate a subscription in the `{subscription['status']}` status to a schedule.",
            param="from_subscription",
        )
    now = tx.now()
    start, end = periods.period_of(subscription)
    items = [
        _phase_item(item["price"]["id"], item.get("quantity")) for item in periods.items_of(subscription)
    ]
    trial_end = subscription.get("trial_end") if subscription["status"] == "trialing" else None
    phase = _phase(
        start, end, items, currency=str(subscription.get("currency") or "usd"), trial_end=trial_end
    )
    tax = bool((subscription.get("automatic_tax") or {}).get("enabled"))
    schedule: dict[str, Any] = {
        "id": new_id("sub_sched"),
        "object": "subscription_schedule",
        "application": None,
        "billing_mode": copy.deepcopy(subscription.get("billing_mode")),
        "canceled_at": None,
        "completed_at": None,
        "created": now,
        "current_phase": {"start_date": start, "end_date": end},
        "customer": subscription["customer"],
        "customer_account": None,
        "default_settings": {
            "application_fee_percent": None,
            "automatic_tax": {"enabled": tax, "disabled_reason": None, "liability": None},
            "billing_cycle_anchor": "automatic",
            "billing_thresholds": None,
            "collection_method": "charge_automatically",
            "default_payment_method": None,
            "description": None,
            "invoice_settings": {"account_tax_ids": None, "days_until_due": None, "issuer": {"type": "self"}},
            "on_behalf_of": None,
            "transfer_data": None,
        },
        "end_behavior": "release",
        "livemode": False,
        "metadata": {},
        "phases": [phase],
        "released_at": None,
        "released_subscription": None,
        "status": "active",
        "subscription": subscription["id"],
        "test_clock": None,
    }
    await tx.insert(schedule)
    await payments.emit(tx, "subscription_schedule.created", schedule)
    subscription["schedule"] = schedule["id"]
    await tx.save(subscription)
    await payments.emit(tx, "customer.subscription.updated", subscription, {"schedule": None})
    return schedule


@endpoint("GET", "/v1/subscription_schedules/{id}", SubscriptionScheduleRetrieveParams)
async def retrieve_schedule(call: Call) -> dict[str, Any]:
    return await call.tx.get("subscription_schedule", call.path["id"])


@endpoint("GET", "/v1/subscription_schedules", SubscriptionScheduleListParams)
async def list_schedules(call: Call) -> dict[str, Any]:
    params = call.params
    for key in ("canceled_at", "completed_at", "released_at", "customer_account"):
        if key in params:
            raise unsupported(key)
    in_range = created_filter(params)

    def wanted(schedule: dict[str, Any]) -> bool:
        return (
            in_range(schedule)
            and params.get("customer") in (None, schedule.get("customer"))
            and ("scheduled" not in params or (schedule["status"] == "not_started") == params["scheduled"])
        )

    return paginate(await call.tx.all("subscription_schedule", wanted), params, call.url)


def _ensure_open(schedule: dict[str, Any], action: str) -> None:
    if schedule["status"] not in ("not_started", "active"):
        raise StripeError(
            400,
            f"You cannot {action} a subscription schedule that is currently in the "
            f"`{schedule['status']}` status.",
        )


async def _resolve_phases(
    tx: Transaction, schedule: dict[str, Any], specs: list[dict[str, Any]], now: int
) -> list[dict[str, Any]]:
    """Phases from `phases[]`: the first one is the current phase; each starts where the last ended."""
    if not specs:
        raise parameter_invalid("phases", "A subscription schedule needs at least one phase.")
    current = schedule.get("current_phase") or {}
    phases: list[dict[str, Any]] = []
    start = int(current.get("start_date") or now)
    for index, spec in enumerate(specs):
        name = f"phases[{index}]"
        for key in spec:
            if key not in _PHASE_KEYS:
                raise unsupported(f"{name}[{key}]")
        given = spec.get("start_date")
        if given is not None:
            given = now if given == "now" else int(given)
            if index == 0 and current and given != int(current["start_date"]):
                raise parameter_invalid(
                    f"{name}[start_date]", "You can not modify the start date of the current phase."
                )
            if index > 0 and given != start:
                raise parameter_invalid(
                    f"{name}[start_date]",
                    "The start date of a phase must be the end date of the phase before it.",
                )
            start = given
        if not spec.get("items"):
            raise parameter_missing(f"{name}[items]")
        items = []
        prices = []
        for number, item in enumerate(spec["items"]):
            item_name = f"{name}[items][{number}]"
            for key in item:
                if key not in ("price", "plan", "quantity", "metadata"):
                    raise unsupported(f"{item_name}[{key}]")
            price_id = item.get("price") or item.get("plan")
            if not price_id:
                raise parameter_missing(f"{item_name}[price]")
            price = await periods.get_price(tx, str(price_id), f"{item_name}[price]")
            quantity = item.get("quantity")
            if periods.is_metered(price):
                if quantity is not None:
                    raise parameter_invalid(
                        f"{item_name}[quantity]",
                        "Quantity should not be specified where usage_type is `metered`.",
                    )
            else:
                quantity = 1 if quantity is None else int(quantity)
            prices.append(price)
            items.append(_phase_item(price["id"], quantity, item.get("metadata")))
        mode = str((schedule.get("billing_mode") or {}).get("type") or periods.DEFAULT_BILLING_MODE)
        periods.check_compatible(prices, f"{name}[items]", billing_mode=mode)
        if spec.get("end_date") is not None:
            end = now if spec["end_date"] == "now" else int(spec["end_date"])
        elif spec.get("duration") is not None:
            duration = spec["duration"]
            end = periods.add_intervals(
                start, duration["interval"], int(duration.get("interval_count") or 1), 1
            )
        else:
            # One billing period; with mixed intervals (flexible mode) the longest one.
            end = max(periods.add_intervals(start, *periods.interval_of(price), 1) for price in prices)
        if end <= start:
            raise parameter_invalid(
                f"{name}[end_date]", "The end date of a phase must be after its start date."
            )
        if index == 0 and end <= now:
            raise parameter_invalid(f"{name}[end_date]", "The current phase must end in the future.")
        currency = str(spec.get("currency") or prices[0].get("currency") or "usd")
        phases.append(
            _phase(
                start,
                end,
                items,
                currency=currency,
                proration_behavior=str(spec.get("proration_behavior") or "create_prorations"),
                metadata=dict(spec.get("metadata") or {}),
                description=spec.get("description"),
            )
        )
        start = end
    return phases


@endpoint("POST", "/v1/subscription_schedules/{id}", SubscriptionScheduleUpdateParams)
async def update_schedule(call: Call) -> dict[str, Any]:
    tx = call.tx
    params = call.params
    schedule = await tx.get("subscription_schedule", call.path["id"])
    _ensure_open(schedule, "update")
    for key in ("default_settings", "pause_schedules"):
        if key in params:
            raise unsupported(key)
    now = tx.now()
    previous: dict[str, Any] = {}
    if "metadata" in params:
        previous["metadata"] = copy.deepcopy(schedule["metadata"])
        schedule["metadata"] = apply_metadata(schedule["metadata"], params["metadata"])
    if "end_behavior" in params:
        if params["end_behavior"] not in ("release", "cancel"):
            raise unsupported("end_behavior", "only `release` or `cancel`")
        previous["end_behavior"] = schedule["end_behavior"]
        schedule["end_behavior"] = params["end_behavior"]
    if "phases" in params:
        phases = await _resolve_phases(tx, schedule, params["phases"], now)
        previous["phases"] = copy.deepcopy(schedule["phases"])
        previous["current_phase"] = copy.deepcopy(schedule["current_phase"])
        schedule["phases"] = phases
        schedule["current_phase"] = {"start_date": phases[0]["start_date"], "end_date": phases[0]["end_date"]}
        await tx.save(schedule)
        current = dict(phases[0])
        if "proration_behavior" in params:
            current["proration_behavior"] = params["proration_behavior"]
        await clock.apply_phase(tx, call.config, schedule, current, now)
        schedule = await tx.get("subscription_schedule", schedule["id"])
    changed = {key: value for key, value in previous.items() if schedule.get(key) != value}
    await tx.save(schedule)
    if changed:
        await payments.emit(tx, "subscription_schedule.updated", schedule, changed)
    return schedule


@endpoint("POST", "/v1/subscription_schedules/{id}/release", SubscriptionScheduleReleaseParams)
async def release_schedule(call: Call) -> dict[str, Any]:
    schedule = await call.tx.get("subscription_schedule", call.path["id"])
    return await clock.release_schedule(call.tx, schedule, call.tx.now())


@endpoint("POST", "/v1/subscription_schedules/{id}/cancel", SubscriptionScheduleCancelParams)
async def cancel_schedule(call: Call) -> dict[str, Any]:
    tx = call.tx
    schedule = await tx.get("subscription_schedule", call.path["id"])
    _ensure_open(schedule, "cancel")
    now = tx.now()
    subscription = await tx.find(str(schedule.get("subscription")))
    if subscription is not None and subscription["status"] != "canceled":
        await invoicing.cancel_subscription(
            tx,
            call.config,
            subscription,
            now,
            invoice_now=bool(call.params.get("invoice_now", True)),
            prorate=bool(call.params.get("prorate", True)),
        )
        return await tx.get("subscription_schedule", schedule["id"])
    schedule["status"] = "canceled"
    schedule["canceled_at"] = now
    schedule["current_phase"] = None
    await tx.save(schedule)
    await payments.emit(tx, "subscription_schedule.canceled", schedule)
    return schedule
