"""Subscriptions: retrieve, list, search, update (plan changes with proration), cancel, resume,
and migrate (`classic` -> `flexible` billing mode; there is no way back, as on Stripe).

Subscriptions are created by completing a Checkout Session
(`engine.creation.complete_checkout`); the billing logic lives in `stripe_sandbox.engine`.
"""

from __future__ import annotations

import copy
from typing import Any

from stripe.params import (
    SubscriptionCancelParams,
    SubscriptionListParams,
    SubscriptionMigrateParams,
    SubscriptionResumeParams,
    SubscriptionRetrieveParams,
    SubscriptionSearchParams,
    SubscriptionUpdateParams,
)

from stripe_sandbox.api import (
    Call,
    created_filter,
    endpoint,
    paginate,
    search_matcher,
    search_result,
)
from stripe_sandbox.engine import changes, invoicing, payments, periods
from stripe_sandbox.errors import StripeError, parameter_invalid, unsupported


@endpoint("GET", "/v1/subscriptions/{id}", SubscriptionRetrieveParams)
async def retrieve_subscription(call: Call) -> dict[str, Any]:
    return await call.tx.get("subscription", call.path["id"])


def _status_matches(wanted: str | None, status: str) -> bool:
    if wanted is None:
        return status not in ("canceled", "incomplete_expired")
    if wanted == "all":
        return True
    if wanted == "ended":
        return status in ("canceled", "incomplete_expired")
    return status == wanted


def _period_filter(condition: Any, value: int) -> bool:
    if condition is None:
        return True
    if isinstance(condition, int):
        return value == condition
    return (
        ("gt" not in condition or value > int(condition["gt"]))
        and ("gte" not in condition or value >= int(condition["gte"]))
        and ("lt" not in condition or value < int(condition["lt"]))
        and ("lte" not in condition or value <= int(condition["lte"]))
    )


@endpoint("GET", "/v1/subscriptions", SubscriptionListParams)
async def list_subscriptions(call: Call) -> dict[str, Any]:
    params = call.params
    in_range = created_filter(params)
    price = params.get("price") or params.get("plan")

    def wanted(subscription: dict[str, Any]) -> bool:
        start, end = periods.period_of(subscription)
        return (
            in_range(subscription)
            and params.get("customer") in (None, subscription.get("customer"))
            and _status_matches(params.get("status"), subscription["status"])
            and (
                price is None or any(item["price"]["id"] == price for item in periods.items_of(subscription))
            )
            and params.get("collection_method") in (None, subscription.get("collection_method"))
            and _period_filter(params.get("current_period_start"), start)
            and _period_filter(params.get("current_period_end"), end)
        )

    return paginate(await call.tx.all("subscription", wanted), params, call.url)


@endpoint("GET", "/v1/subscriptions/search", SubscriptionSearchParams)
async def search_subscriptions(call: Call) -> dict[str, Any]:
    matches = await call.tx.all("subscription", search_matcher(call.params["query"]))
    return search_result(matches, call.params, call.url)


@endpoint("POST", "/v1/subscriptions/{id}", SubscriptionUpdateParams)
async def update_subscription(call: Call) -> dict[str, Any]:
    return await changes.update_subscription(call.tx, call.config, call.path["id"], call.params)


@endpoint("DELETE", "/v1/subscriptions/{id}", SubscriptionCancelParams)
async def cancel_subscription(call: Call) -> dict[str, Any]:
    subscription = await call.tx.get("subscription", call.path["id"])
    if subscription["status"] in ("canceled", "incomplete_expired"):
        raise StripeError(
            400,
            f"This subscription has already been canceled: {subscription['id']}.",
            param="subscription",
        )
    return await invoicing.cancel_subscription(
        call.tx,
        call.config,
        subscription,
        call.tx.now(),
        invoice_now=bool(call.params.get("invoice_now", False)),
        prorate=bool(call.params.get("prorate", False)),
        details=call.params.get("cancellation_details"),
    )


@endpoint("POST", "/v1/subscriptions/{id}/resume", SubscriptionResumeParams)
async def resume_subscription(call: Call) -> dict[str, Any]:
    subscription = await call.tx.get("subscription", call.path["id"])
    for key in ("proration_behavior", "proration_date"):
        if key in call.params:
            raise unsupported(key, "resuming always starts a new period now")
    return await changes.resume_subscription(call.tx, call.config, subscription, call.tx.now(), call.params)


@endpoint("POST", "/v1/subscriptions/{id}/migrate", SubscriptionMigrateParams)
async def migrate_subscription(call: Call) -> dict[str, Any]:
    """`classic` -> `flexible` billing mode (then prices of different intervals may be mixed)."""
    tx = call.tx
    subscription = await tx.get("subscription", call.path["id"])
    mode = periods.billing_mode_param(call.params.get("billing_mode") or {}, "billing_mode")
    if mode != "flexible":
        raise parameter_invalid("billing_mode[type]", "Subscriptions can only be migrated to `flexible`.")
    if periods.billing_mode_of(subscription) == "flexible":
        return subscription
    previous = {"billing_mode": copy.deepcopy(subscription["billing_mode"])}
    subscription["billing_mode"] = periods.billing_mode_object("flexible", tx.now())
    await tx.save(subscription)
    await payments.emit(tx, "customer.subscription.updated", subscription, previous)
    return subscription
