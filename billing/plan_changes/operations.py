"""Preview, change, cancel and resume: the functions the GraphQL layer calls (the package docstring
says how each works)."""

from __future__ import annotations

from typing import Any

from billing.access import SubscriptionState
from billing.clock import Clock, utcnow
from billing.customer_locks import CustomerLocks
from billing.plan_changes.live import (
    change_lock,
    classify_change,
    item_changes,
    load_account,
    load_live,
    load_prices,
    target_plan,
)
from billing.plan_changes.model import CHANGEABLE_STATUSES, ChangeKind, PlanChangePreview
from billing.plan_changes.previews import (
    forget_quotes,
    next_plan_invoice_is_computed,
    preview_from_price,
    preview_next,
    preview_now,
    proration_time,
    save_quote,
    valid_quote,
)
from billing.plan_changes.stripe_calls import (
    apply_now,
    release_quietly,
    release_schedule,
    released_then,
    schedule_change,
    stripe_preview,
    synced_state,
)
from billing.plans import Catalog
from billing.stripe_gateway import StripeGateway, random_idempotency_key
from billing.stripe_objects import field as get
from billing.stripe_state import LIVE_STATUSES
from db.engine import Database
from db.enums import BillingInterval, SubscriptionStatus, Tier


async def preview_plan_change(
    *,
    database: Database,
    gateway: StripeGateway,
    catalog: Catalog,
    clock: Clock = utcnow,
    user_id: str,
    tier: Tier,
    interval: BillingInterval,
) -> PlanChangePreview:
    """What changing to `tier` at `interval` charges now and next; keeps the proration date."""
    target = target_plan(catalog, tier, interval)
    live = await load_live(database, gateway, await load_account(database, user_id), CHANGEABLE_STATUSES)
    kind = classify_change(live, target)
    prices = await load_prices(gateway, catalog, target)
    changes = item_changes(live.subscription, prices, target)
    if kind is ChangeKind.NOW:
        now = clock()
        quoted = await valid_quote(database, live, target, now)
        preview = await stripe_preview(gateway, live, changes, "always_invoice", quoted)
        proration_date = quoted if quoted is not None else proration_time(preview)
        if quoted is None:
            await save_quote(database, live, target, proration_date, now)
        return preview_now(live, target, prices, preview, proration_date)
    if next_plan_invoice_is_computed(live, target):  # nothing is due now (the upgrades returned)
        return preview_from_price(live, target, kind, prices, catalog, clock())
    preview = await stripe_preview(
        gateway, live, changes if kind is ChangeKind.PERIOD_END else [], "none", None
    )
    return preview_next(live, target, kind, preview)


async def change_plan(
    *,
    database: Database,
    gateway: StripeGateway,
    locks: CustomerLocks,
    catalog: Catalog,
    clock: Clock = utcnow,
    user_id: str,
    tier: Tier,
    interval: BillingInterval,
) -> SubscriptionState:
    """Upgrade now (charged as previewed), downgrade at the period end, or drop a pending change."""
    target = target_plan(catalog, tier, interval)
    account = await load_account(database, user_id)
    async with locks.hold(change_lock(account.customer_id)):
        live = await load_live(database, gateway, account, CHANGEABLE_STATUSES)
        kind = classify_change(live, target)
        if kind is ChangeKind.DROP_PENDING:
            assert live.schedule_id is not None
            await release_schedule(gateway, live.schedule_id)
        else:
            prices = await load_prices(gateway, catalog, target)
            changes = item_changes(live.subscription, prices, target)
            if kind is ChangeKind.NOW:
                quoted = await valid_quote(database, live, target, clock())
                await apply_now(gateway, live, changes, quoted)
                if live.schedule_id is not None:  # the upgrade replaces a pending downgrade
                    # Made after the charge, so a declined card keeps the pending change. If this
                    # fails, the change stays pending (and shown): the upgrade itself is done.
                    await release_quietly(gateway, live.schedule_id)
            else:
                await schedule_change(gateway, live, changes)
        await forget_quotes(database, account.id)
        return await synced_state(database, gateway, locks, clock, account)


async def cancel_subscription(
    *,
    database: Database,
    gateway: StripeGateway,
    locks: CustomerLocks,
    clock: Clock = utcnow,
    user_id: str,
    at_period_end: bool = True,
) -> SubscriptionState:
    """Cancel at the period end (the user keeps what they paid for) or now."""
    account = await load_account(database, user_id)
    async with locks.hold(change_lock(account.customer_id)):
        live = await load_live(database, gateway, account, LIVE_STATUSES)
        subscription_id = account.subscription_id
        already = live.cancel_pending and live.schedule_id is None
        if at_period_end and not already:
            # Stripe's `cancel_at_period_end` is the earliest item's period end: with monthly
            # metered items on an annual plan that is the month's. Name the plan's period end then.
            params: Any = (
                {"cancel_at": live.period[1]} if live.mixed_periods else {"cancel_at_period_end": True}
            )
            await released_then(
                gateway,
                live,
                lambda o: gateway.v1.subscriptions.update_async(subscription_id, params, o),
                "cancel subscription at period end",
            )
        elif not at_period_end:
            await released_then(
                gateway,
                live,
                lambda o: gateway.v1.subscriptions.cancel_async(subscription_id, {}, o),
                "cancel subscription",
            )
        return await synced_state(database, gateway, locks, clock, account)


async def resume_subscription(
    *,
    database: Database,
    gateway: StripeGateway,
    locks: CustomerLocks,
    clock: Clock = utcnow,
    user_id: str,
) -> SubscriptionState:
    """Clear a pending cancellation, or resume a paused subscription; otherwise change nothing."""
    account = await load_account(database, user_id)
    async with locks.hold(change_lock(account.customer_id)):
        live = await load_live(database, gateway, account, LIVE_STATUSES)
        subscription_id = account.subscription_id
        if live.status is SubscriptionStatus.PAUSED:
            await gateway.call(
                lambda o: gateway.v1.subscriptions.resume_async(subscription_id, {}, o),
                idempotency_key=random_idempotency_key("subscription.resume"),
                what="resume subscription",
            )
        elif live.cancel_pending:
            params: Any = (
                {"cancel_at_period_end": False}
                if get(live.subscription, "cancel_at_period_end")
                else {"cancel_at": ""}
            )
            await released_then(
                gateway,
                live,
                lambda o: gateway.v1.subscriptions.update_async(subscription_id, params, o),
                "clear pending cancellation",
            )
        return await synced_state(database, gateway, locks, clock, account)
