"""An account's subscription state as Stripe's objects say it: what `sync_customer` writes.

Pure functions of Stripe's subscriptions (and their schedules): the live subscription, its
licensed item, tier, interval and pending change. No database, no Stripe calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from billing import discounts
from billing.ledger import (
    update_invoice_time,
)
from billing.plans import plan_of_price, tier_rank
from billing.stripe_objects import field as get
from billing.stripe_objects import object_id, stripe_time
from db.enums import BillingInterval, SubscriptionStatus, Tier

# Statuses of a subscription that still exists and may bill: at most one should exist per user.
LIVE_STATUSES = frozenset(
    {
        SubscriptionStatus.TRIALING,
        SubscriptionStatus.ACTIVE,
        SubscriptionStatus.PAST_DUE,
        SubscriptionStatus.UNPAID,
        SubscriptionStatus.PAUSED,
        SubscriptionStatus.INCOMPLETE,
    }
)
STATE_FIELDS = (
    "stripe_subscription_id",
    "stripe_price_id",
    "tier",
    "interval",
    "status",
    "current_period_start",
    "current_period_end",
    "trial_end",
    "cancel_at_period_end",
    "canceled_at",
    "trial_used",
    "stripe_schedule_id",
    "pending_tier",
    "pending_interval",
    "pending_change_at",
)


@dataclass(frozen=True)
class StripeState:
    """The subscription state Stripe reports for a customer, as the account row stores it."""

    stripe_subscription_id: str | None = None
    stripe_price_id: str | None = None
    tier: Tier = Tier.NONE
    interval: BillingInterval | None = None
    status: SubscriptionStatus = SubscriptionStatus.NONE
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    trial_end: datetime | None = None
    cancel_at_period_end: bool = False
    canceled_at: datetime | None = None
    trial_used: bool = False
    # A plan change at the period end: the next phase of the subscription's schedule.
    stripe_schedule_id: str | None = None
    pending_tier: Tier | None = None
    pending_interval: BillingInterval | None = None
    pending_change_at: datetime | None = None
    live_subscription_ids: tuple[str, ...] = ()
    # Not on the account row; the ledger tracks them (billing/ledger.py STRIPE_FIELDS).
    quantity: int | None = None
    unit_amount: int | None = None
    currency: str | None = None
    discounts: tuple[dict[str, Any], ...] = ()  # billing/discounts.py `discount_terms`
    started_at: datetime | None = None  # `start_date`
    updated_by_invoice: datetime | None = None  # billing/ledger.py `update_invoice_time`
    ended_at: datetime | None = None

    def moments(self) -> dict[str, datetime | None]:
        """The subscription's times that date a change (billing/ledger.py `transition_time`)."""
        return {
            "start_date": self.started_at,
            "trial_end": self.trial_end,
            "canceled_at": self.canceled_at,
            "ended_at": self.ended_at,
            "current_period_start": self.current_period_start,
            "updated_by_invoice": self.updated_by_invoice,
        }

    def stripe_values(self) -> dict[str, Any]:
        """The ledger's `STRIPE_FIELDS`: what only Stripe's subscription holds."""
        return {
            "quantity": self.quantity,
            "unit_amount": self.unit_amount,
            "currency": self.currency,
            "discounts": list(self.discounts),
        }

    def values(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in STATE_FIELDS}
        values["tier"] = self.tier.value
        values["status"] = self.status.value
        values["interval"] = self.interval.value if self.interval else None
        values["pending_tier"] = self.pending_tier.value if self.pending_tier else None
        values["pending_interval"] = self.pending_interval.value if self.pending_interval else None
        return values


def licensed_item(subscription: Any) -> Any:
    """The item that carries the plan: not a metered item, and preferably one of our prices."""
    items = get(get(subscription, "items"), "data") or []
    licensed = [
        item for item in items if get(get(get(item, "price"), "recurring"), "usage_type") != "metered"
    ]
    for item in licensed:
        if plan_of_price(get(item, "price")) is not None:
            return item
    return licensed[0] if licensed else None


def pending_change(
    schedule: Any, current: tuple[Tier, BillingInterval] | None
) -> tuple[Tier, BillingInterval, datetime | None] | None:
    """The plan of the schedule's next phase and when it starts, when it changes the plan.

    Retrieve the schedule with `expand=["phases.items.price"]`: the plan is in price metadata.
    """
    if get(schedule, "status") not in ("not_started", "active"):
        return None
    current_start = int(get(get(schedule, "current_phase"), "start_date") or 0)
    upcoming = [p for p in get(schedule, "phases") or [] if int(get(p, "start_date") or 0) > current_start]
    if not upcoming:
        return None
    phase = min(upcoming, key=lambda p: int(get(p, "start_date")))
    prices = [get(item, "price") for item in get(phase, "items") or []]
    licensed = [p for p in prices if get(get(p, "recurring"), "usage_type") != "metered"]
    plan = next((found for found in map(plan_of_price, licensed) if found is not None), None)
    if plan is None or plan == current:
        return None
    return plan[0], plan[1], stripe_time(get(phase, "start_date"))


def subscription_state(subscription: Any, schedule: Any = None) -> StripeState:
    item = licensed_item(subscription)
    price = get(item, "price")
    plan = plan_of_price(price) if price is not None else None
    pending = pending_change(schedule, plan) if schedule is not None else None
    # Current period lives on the item in this API version; older payloads had it on the subscription.
    period_start = get(item, "current_period_start") or get(subscription, "current_period_start")
    period_end = get(item, "current_period_end") or get(subscription, "current_period_end")
    return StripeState(
        stripe_subscription_id=get(subscription, "id"),
        stripe_price_id=object_id(price),
        tier=plan[0] if plan else Tier.NONE,
        interval=plan[1] if plan else None,
        status=SubscriptionStatus(get(subscription, "status")),
        current_period_start=stripe_time(period_start),
        current_period_end=stripe_time(period_end),
        trial_end=stripe_time(get(subscription, "trial_end")),
        # Or `cancel_at` the plan's period end: how a subscription with monthly metered items on an
        # annual plan is cancelled at the end of what was paid for (Stripe's `cancel_at_period_end`
        # would end it at the earliest item's, the month's, period end).
        cancel_at_period_end=bool(get(subscription, "cancel_at_period_end"))
        or (period_end is not None and get(subscription, "cancel_at") == period_end),
        canceled_at=stripe_time(get(subscription, "canceled_at")),
        trial_used=get(subscription, "trial_start") is not None or get(subscription, "trial_end") is not None,
        stripe_schedule_id=object_id(schedule),
        pending_tier=pending[0] if pending else None,
        pending_interval=pending[1] if pending else None,
        pending_change_at=pending[2] if pending else None,
        quantity=_int_or_none(get(item, "quantity")),
        unit_amount=_int_or_none(get(price, "unit_amount")),
        currency=get(price, "currency"),
        started_at=stripe_time(get(subscription, "start_date") or get(subscription, "created")),
        ended_at=stripe_time(get(subscription, "ended_at")),
        updated_by_invoice=update_invoice_time(subscription),
        discounts=discounts.discount_terms(subscription),
    )


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def customer_state(subscriptions: Sequence[Any], schedules: Mapping[str, Any] | None = None) -> StripeState:
    """The account's state from all of a customer's subscriptions (and their schedules, by id).

    With several live subscriptions (two checkouts paid in two tabs, one made in the
    dashboard) the account follows the highest tier; the caller flags it.
    """
    schedules = schedules or {}
    states = [
        subscription_state(s, schedules.get(object_id(get(s, "schedule")) or "")) for s in subscriptions
    ]
    trial_used = any(state.trial_used for state in states)
    live = [state for state in states if state.status in LIVE_STATUSES]
    created = {get(s, "id"): int(get(s, "created") or 0) for s in subscriptions}
    if live:
        chosen = max(live, key=lambda s: (tier_rank(s.tier), created.get(s.stripe_subscription_id, 0)))
    elif states:
        chosen = max(states, key=lambda s: created.get(s.stripe_subscription_id, 0))
    else:
        return StripeState(trial_used=trial_used)
    live_ids = tuple(sorted(s.stripe_subscription_id for s in live if s.stripe_subscription_id))
    return StripeState(**{**chosen.__dict__, "trial_used": trial_used, "live_subscription_ids": live_ids})
