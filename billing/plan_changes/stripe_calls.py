"""The Stripe calls of a plan change: apply now, schedule for the period end, release and put back a
schedule, and the sync after the change."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from stripe import RequestOptions

from billing.access import SubscriptionState, load_subscription
from billing.clock import Clock
from billing.customer_locks import CustomerLocks
from billing.errors import BillingError, ErrorCode
from billing.ledger import MUTATION
from billing.plan_changes.live import Account, ItemChange, LiveSubscription, phase_items, update_items
from billing.stripe_gateway import StripeGateway, random_idempotency_key
from billing.stripe_objects import field as get
from billing.stripe_objects import object_id
from billing.sync import sync_customer
from db.engine import Database

log = logging.getLogger("billing.plan_changes")


async def stripe_preview(
    gateway: StripeGateway,
    live: LiveSubscription,
    changes: Sequence[ItemChange],
    proration_behavior: str,
    proration_date: int | None,
) -> Any:
    params: dict[str, Any] = {"subscription": live.account.subscription_id}
    items = update_items(changes)
    if items:
        details: dict[str, Any] = {"items": items, "proration_behavior": proration_behavior}
        if proration_date is not None:
            details["proration_date"] = proration_date
        params["subscription_details"] = details
    sent: Any = params
    return await gateway.call(
        lambda o: gateway.v1.invoices.create_preview_async(sent, o), what="preview invoice"
    )


async def apply_now(
    gateway: StripeGateway, live: LiveSubscription, changes: Sequence[ItemChange], proration_date: int | None
) -> None:
    """The update itself: charged now, or refused (402 CARD_DECLINED) with nothing changed."""
    params: dict[str, Any] = {
        "items": update_items(changes),
        "proration_behavior": "always_invoice",
        "payment_behavior": "error_if_incomplete",
    }
    if proration_date is not None:
        params["proration_date"] = proration_date
    sent: Any = params
    await gateway.call(
        lambda o: gateway.v1.subscriptions.update_async(live.account.subscription_id, sent, o),
        idempotency_key=random_idempotency_key("subscription.change_plan"),
        what="change plan",
    )


async def schedule_change(
    gateway: StripeGateway, live: LiveSubscription, changes: Sequence[ItemChange]
) -> None:
    """The change at the period end: the schedule's current phase ends then, the next has the new items."""
    created: str | None = None
    if live.schedule_id is None:
        params: Any = {"from_subscription": live.account.subscription_id}
        schedule = await gateway.call(
            lambda o: gateway.v1.subscription_schedules.create_async(params, o),
            idempotency_key=random_idempotency_key("subscription_schedule.create"),
            what="create subscription schedule",
        )
        schedule_id = created = str(get(schedule, "id"))
    else:
        schedule_id = live.schedule_id
        schedule = await gateway.call(
            lambda o: gateway.v1.subscription_schedules.retrieve_async(schedule_id, None, o),
            what="retrieve subscription schedule",
        )
    current = get(schedule, "current_phase") or (get(schedule, "phases") or [{}])[0]
    update: Any = {
        "phases": [
            {
                "items": phase_items(changes, after=False),
                "start_date": int(get(current, "start_date") or live.period[0]),
                "end_date": live.period[1],
            },
            {"items": phase_items(changes, after=True), "proration_behavior": "none"},
        ],
        "end_behavior": "release",
        "proration_behavior": "none",
    }
    try:
        await gateway.call(
            lambda o: gateway.v1.subscription_schedules.update_async(schedule_id, update, o),
            idempotency_key=random_idempotency_key("subscription_schedule.update"),
            what="schedule plan change",
        )
    except BillingError:
        if created is not None:  # leave no empty schedule behind
            await release_quietly(gateway, created)
        raise


async def release_schedule(gateway: StripeGateway, schedule_id: str) -> Any:
    """Release the schedule: the subscription stays as it is now, the pending change is dropped."""
    return await gateway.call(
        lambda o: gateway.v1.subscription_schedules.release_async(schedule_id, None, o),
        idempotency_key=random_idempotency_key("subscription_schedule.release"),
        what="release subscription schedule",
    )


async def release_quietly(gateway: StripeGateway, schedule_id: str) -> None:
    try:
        await release_schedule(gateway, schedule_id)
    except BillingError as exc:
        log.error("could not release subscription schedule %s: %s", schedule_id, exc.message)


async def released_then(
    gateway: StripeGateway,
    live: LiveSubscription,
    operation: Callable[[RequestOptions], Awaitable[Any]],
    what: str,
) -> None:
    """Release a pending schedule, then run `operation`; if that fails, put the schedule back."""
    released = await release_schedule(gateway, live.schedule_id) if live.schedule_id is not None else None
    try:
        await gateway.call(
            operation, idempotency_key=random_idempotency_key("subscription.update"), what=what
        )
    except BillingError:
        if released is not None:
            await _restore_schedule(gateway, live, released)
        raise


async def _restore_schedule(gateway: StripeGateway, live: LiveSubscription, released: Any) -> None:
    """Best effort: the released schedule's phases on a new schedule of the same subscription."""
    phases: list[dict[str, Any]] = []
    for index, phase in enumerate(get(released, "phases") or []):
        if int(get(phase, "end_date") or 0) <= live.period[0]:
            continue  # already over
        entry: dict[str, Any] = {
            "items": [
                {
                    key: value
                    for key, value in (
                        ("price", object_id(get(item, "price"))),
                        ("quantity", get(item, "quantity")),
                    )
                    if value is not None
                }
                for item in get(phase, "items") or []
            ],
            "end_date": int(get(phase, "end_date")),
            "proration_behavior": get(phase, "proration_behavior") or "none",
        }
        if index == 0 or not phases:
            entry["start_date"] = int(get(phase, "start_date"))
        phases.append(entry)
    try:
        params: Any = {"from_subscription": live.account.subscription_id}
        schedule = await gateway.call(
            lambda o: gateway.v1.subscription_schedules.create_async(params, o),
            idempotency_key=random_idempotency_key("subscription_schedule.create"),
            what="restore subscription schedule",
        )
        update: Any = {"phases": phases, "end_behavior": get(released, "end_behavior") or "release"}
        await gateway.call(
            lambda o: gateway.v1.subscription_schedules.update_async(str(get(schedule, "id")), update, o),
            idempotency_key=random_idempotency_key("subscription_schedule.update"),
            what="restore subscription schedule phases",
        )
    except BillingError as exc:
        log.error(
            "could not restore the pending plan change of %s after a failed call: %s",
            live.account.subscription_id,
            exc.message,
        )


async def synced_state(
    database: Database, gateway: StripeGateway, locks: CustomerLocks, clock: Clock, account: Account
) -> SubscriptionState:
    """The account after the change. The change is made: if Stripe cannot be read back right now,
    the stored state is returned and the webhooks bring it in line."""
    try:
        await sync_customer(
            database=database,
            gateway=gateway,
            locks=locks,
            customer_id=account.customer_id,
            now=clock(),
            user_id_hint=account.user_id,
            cause=MUTATION,
        )
    except BillingError as exc:
        if exc.code is not ErrorCode.BILLING_PROVIDER_UNAVAILABLE:
            raise
        log.warning("sync of %s after a subscription change failed: %s", account.customer_id, exc.message)
    return await load_subscription(database, account.user_id)
