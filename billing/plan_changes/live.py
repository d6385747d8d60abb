"""The account and its subscription as Stripe has it now, and the item changes a plan change makes."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from billing.errors import BillingError, ErrorCode
from billing.plan_changes.model import ChangeKind, PlanKey, classify
from billing.plans import Catalog, plan_of_price
from billing.stripe_gateway import StripeGateway
from billing.stripe_objects import field as get
from billing.stripe_objects import metadata, object_id
from billing.stripe_state import LIVE_STATUSES, licensed_item
from db.engine import Database
from db.enums import BillingInterval, SubscriptionStatus, Tier
from db.models import account_table

log = logging.getLogger("billing.plan_changes")


# The account and its live subscription ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    user_id: str
    customer_id: str
    subscription_id: str


@dataclass(frozen=True, slots=True)
class LiveSubscription:
    account: Account
    subscription: Any
    status: SubscriptionStatus
    item: Any  # the licensed item: the plan
    plan: PlanKey | None
    period: tuple[int, int]
    schedule_id: str | None

    @property
    def trialing(self) -> bool:
        return self.status is SubscriptionStatus.TRIALING

    @property
    def cancel_pending(self) -> bool:
        return bool(get(self.subscription, "cancel_at_period_end") or get(self.subscription, "cancel_at"))

    @property
    def price_id(self) -> str | None:
        return object_id(get(self.item, "price"))

    @property
    def mixed_periods(self) -> bool:
        """Some item's period ends before the plan item's (monthly metered items on an annual plan)."""
        ends = {
            int(get(item, "current_period_end") or 0)
            for item in get(get(self.subscription, "items"), "data") or []
        }
        return any(end and end != self.period[1] for end in ends)


def _no_subscription(detail: str = "") -> BillingError:
    return BillingError(f"No live subscription to change{detail}.", code=ErrorCode.NO_SUBSCRIPTION)


async def load_account(database: Database, user_id: str) -> Account:
    c = account_table.c
    query = select(c.id, c.stripe_customer_id, c.stripe_subscription_id, c.status).where(c.user_id == user_id)
    async with database.read() as conn:
        row = (await conn.execute(query)).first()
    if (
        row is None
        or not row.stripe_customer_id
        or not row.stripe_subscription_id
        or SubscriptionStatus(row.status) not in LIVE_STATUSES
    ):
        raise _no_subscription()
    return Account(int(row.id), user_id, str(row.stripe_customer_id), str(row.stripe_subscription_id))


async def load_live(
    database: Database, gateway: StripeGateway, account: Account, statuses: frozenset[SubscriptionStatus]
) -> LiveSubscription:
    """The subscription as Stripe has it now (the database may lag the webhooks)."""
    subscription = await gateway.call(
        lambda o: gateway.v1.subscriptions.retrieve_async(account.subscription_id, None, o),
        what="retrieve subscription",
    )
    status = SubscriptionStatus(get(subscription, "status"))
    if status not in statuses:
        raise _no_subscription(f" (the subscription is {status.value})")
    item = licensed_item(subscription)
    if item is None:
        raise _no_subscription(" (the subscription has no plan item)")
    start = get(item, "current_period_start") or get(subscription, "current_period_start")
    end = get(item, "current_period_end") or get(subscription, "current_period_end")
    return LiveSubscription(
        account=account,
        subscription=subscription,
        status=status,
        item=item,
        plan=plan_of_price(get(item, "price")),
        period=(int(start), int(end)),
        schedule_id=object_id(get(subscription, "schedule")),
    )


def target_plan(catalog: Catalog, tier: Tier, interval: BillingInterval) -> PlanKey:
    if tier is Tier.NONE or tier not in catalog.plans:
        raise BillingError(
            "Choose a paid tier; to stop paying, cancel the subscription.", code=ErrorCode.INVALID_PLAN
        )
    return tier, interval


def classify_change(live: LiveSubscription, target: PlanKey) -> ChangeKind:
    if live.cancel_pending and live.plan != target:
        raise BillingError(
            "The subscription ends at the period end: resume it before changing plans.",
            code=ErrorCode.INVALID_PLAN,
        )
    return classify(live.plan, target, trialing=live.trialing, pending=live.schedule_id is not None)


def change_lock(customer_id: str) -> str:
    # Apart from the sync's own lock, which the change takes again when it syncs.
    return f"{customer_id}:plan-change"


# Prices and items -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prices:
    licensed: Any
    metered: Mapping[str, Any]  # feature -> the target tier's metered price


async def load_prices(gateway: StripeGateway, catalog: Catalog, target: PlanKey) -> Prices:
    plan = catalog.plan(target[0])
    licensed_key = plan.prices[target[1]].lookup_key
    metered_keys = {price.lookup_key: feature for feature, price in plan.metered_prices.items()}
    params: Any = {"lookup_keys": [licensed_key, *metered_keys], "active": True, "limit": 100}
    page = await gateway.call(lambda o: gateway.v1.prices.list_async(params, o), what="list prices")
    by_key = {get(price, "lookup_key"): price for price in get(page, "data") or []}
    if licensed_key not in by_key:
        raise BillingError(
            f"The {target[0].value} {target[1].value} plan is not on sale (no active price {licensed_key}).",
            code=ErrorCode.INVALID_PLAN,
        )
    return Prices(
        licensed=by_key[licensed_key],
        metered={feature: by_key[key] for key, feature in metered_keys.items() if key in by_key},
    )


@dataclass(frozen=True, slots=True)
class ItemChange:
    item: Any  # the subscription item; None for an item the change adds
    price: str | None  # its price on the target plan; None: the item goes

    @property
    def changed(self) -> bool:
        return self.item is None or self.price != object_id(get(self.item, "price"))

    @property
    def metered(self) -> bool:
        return bool(get(get(get(self.item, "price"), "recurring"), "usage_type") == "metered")


def item_changes(subscription: Any, prices: Prices, target: PlanKey) -> list[ItemChange]:
    """Every item of the subscription with its price on the target plan, and the items it adds.

    The plan item takes the target price. Metered items follow the tier: the target tier's
    metered price of each feature (monthly on every plan, annual ones included, as checkout makes
    them). Items that are not ours stay as they are.
    """
    plan_item = licensed_item(subscription)
    fitting = {feature: object_id(price) for feature, price in prices.metered.items()}
    changes = []
    for item in get(get(subscription, "items"), "data") or []:
        price = get(item, "price")
        if get(item, "id") == get(plan_item, "id"):
            changes.append(ItemChange(item, object_id(prices.licensed)))
        elif get(get(price, "recurring"), "usage_type") == "metered":
            changes.append(ItemChange(item, fitting.pop(metadata(price).get("feature", ""), None)))
        else:
            changes.append(ItemChange(item, object_id(price)))
    changes += [ItemChange(None, price) for price in fitting.values()]
    return changes


def update_items(changes: Sequence[ItemChange]) -> list[dict[str, Any]]:
    """`items[]` of a subscription update (or preview) making the changes."""
    items: list[dict[str, Any]] = []
    for change in changes:
        if change.item is None:
            items.append({"price": change.price})
        elif change.price is None:
            items.append({"id": get(change.item, "id"), "deleted": True})
        elif change.changed:
            items.append({"id": get(change.item, "id"), "price": change.price})
    return items


def phase_items(changes: Sequence[ItemChange], *, after: bool) -> list[dict[str, Any]]:
    """A schedule phase's items: the subscription's now, or (`after`) those of the target plan."""
    items: list[dict[str, Any]] = []
    for change in changes:
        if after:
            price, metered = change.price, change.item is None or change.metered
        else:
            price, metered = object_id(get(change.item, "price")), change.metered
        if price is None:
            continue
        entry: dict[str, Any] = {"price": price}
        if not metered:
            entry["quantity"] = int(get(change.item, "quantity") or 1)
        items.append(entry)
    return items
