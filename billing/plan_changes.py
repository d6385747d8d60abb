"""Plan changes, cancellation and resumption of a user's subscription, through Stripe's API.

Stripe's customer portal cannot move a subscription between products (one product per tier
here), so plan changes go through the API:

- An **upgrade** (a higher tier, or monthly -> annual of the same tier) applies now:
  `proration_behavior=always_invoice` bills the prorated difference at once and
  `payment_behavior=error_if_incomplete` makes a declined card refuse the whole update
  (Stripe's default would apply the plan and leave the subscription past_due). A change of
  interval resets the billing cycle anchor to now, as Stripe does: the unused time is credited
  and the new period billed in full. During a trial every change applies now (nothing is paid).
- A **downgrade** (a lower tier, or annual -> monthly) applies at the period end, so nobody loses
  paid time: the subscription gets a schedule (`from_subscription`) whose current phase keeps
  the current items until the period ends and whose next phase has the new ones. The sync reads
  that next phase as the account's pending change. Another change replaces the pending one;
  asking for the current plan while a change is pending drops it (the schedule is released).
- **Previews** come from `invoices.create_preview` with the same items and proration settings.
  Stripe prorates per second, so the preview's proration date is kept (a `plan_change_quote`
  row per account and target plan, for `QUOTE_TTL`, in the database so any service process
  can use it) and sent with the update: the change charges exactly what the preview showed.
- **Cancel** (at the plan's period end, or now) and **resume** (clear a pending cancellation, or
  resume a paused subscription) release a pending schedule first, as Stripe refuses to change
  the cancellation of a subscription a schedule manages; if the cancellation then fails, the
  pending change is put back.

Metered items follow the plan: each is moved to the new tier's metered price of its feature
(or removed when the new tier has none). Metered prices are monthly on every plan, so an annual
plan's subscription mixes intervals (Stripe's flexible billing mode): the plan item renews
yearly, the metered items are invoiced monthly. The plan item's period is the subscription's
period here; Stripe's own "period end" for such a subscription is the earliest item's (the
month's), so cancelling at the period end names the plan's period end (`cancel_at`), and
previews of a change at the period end of an annual plan are computed from the target price
(Stripe's upcoming invoice would be the next month's usage).

Each function reads the subscription from Stripe (the database may lag the webhooks), makes the
change, then brings the account in line with `sync_customer` and returns the stored state.
Changes of one customer are serialised (a lock of their own, apart from the sync's). No
database transaction is ever open across a Stripe call.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from stripe import RequestOptions

from billing.access import SubscriptionState, add_months, load_subscription
from billing.clock import Clock, utcnow
from billing.errors import BillingError, ErrorCode
from billing.plans import Catalog, plan_of_price, tier_rank
from billing.stripe_gateway import StripeGateway, random_idempotency_key
from billing.stripe_objects import field as get
from billing.stripe_objects import metadata, object_id, stripe_time
from billing.sync import LIVE_STATUSES, CustomerLocks, licensed_item, sync_customer
from db.engine import Database
from db.enums import BillingInterval, SubscriptionStatus, Tier
from db.models import account_table, quote_table

log = logging.getLogger("billing.plan_changes")

PlanKey = tuple[Tier, BillingInterval]

QUOTE_TTL = timedelta(minutes=5)
# A plan can change while the subscription bills normally, or during its trial.
CHANGEABLE_STATUSES = frozenset(
    {SubscriptionStatus.ACTIVE, SubscriptionStatus.TRIALING, SubscriptionStatus.PAST_DUE}
)


class ChangeKind(StrEnum):
    NOW = "now"  # an upgrade, or any change during a trial: applied now, the difference charged now
    PERIOD_END = "period_end"  # a downgrade: the schedule's next phase
    DROP_PENDING = "drop_pending"  # the current plan while a change is pending: that change is dropped


@dataclass(frozen=True, slots=True)
class PreviewLine:
    description: str
    amount: int  # cents; negative for a credit
    proration: bool
    period_start: datetime | None
    period_end: datetime | None


@dataclass(frozen=True, slots=True)
class PlanChangePreview:
    tier: Tier
    interval: BillingInterval
    kind: ChangeKind
    effective_at: datetime | None  # when the new plan starts
    currency: str
    amount_due: int  # charged now, in cents
    next_invoice_amount: int  # the invoice after that (the licensed price; metered usage comes on top)
    next_invoice_at: datetime | None
    lines: tuple[PreviewLine, ...]  # of the invoice due now, or of the next one when nothing is due now

    @property
    def immediate(self) -> bool:
        return self.kind is not ChangeKind.PERIOD_END


def is_upgrade(current: PlanKey, target: PlanKey) -> bool:
    """A higher tier, or the same tier billed annually instead of monthly."""
    if current[0] != target[0]:
        return tier_rank(target[0]) > tier_rank(current[0])
    return current[1] is BillingInterval.MONTHLY and target[1] is BillingInterval.ANNUAL


def classify(current: PlanKey | None, target: PlanKey, *, trialing: bool, pending: bool) -> ChangeKind:
    if current == target:
        if pending:
            return ChangeKind.DROP_PENDING
        raise BillingError("The subscription is already on this plan.", code=ErrorCode.INVALID_PLAN)
    if current is None or trialing or is_upgrade(current, target):
        return ChangeKind.NOW
    return ChangeKind.PERIOD_END


# The public functions ---------------------------------------------------------------------------


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
    target = _target(catalog, tier, interval)
    live = await _live(database, gateway, await _account(database, user_id), CHANGEABLE_STATUSES)
    kind = _classify(live, target)
    prices = await _prices(gateway, catalog, target)
    changes = _item_changes(live.subscription, prices, target)
    if kind is ChangeKind.NOW:
        now = clock()
        quoted = await _valid_quote(database, live, target, now)
        preview = await _create_preview(gateway, live, changes, "always_invoice", quoted)
        proration_date = quoted if quoted is not None else _proration_time(preview)
        if quoted is None:
            await _save_quote(database, live, target, proration_date, now)
        return _preview_now(live, target, prices, preview, proration_date)
    if _next_plan_invoice_is_computed(live, target):  # nothing is due now (the upgrades returned)
        return _preview_from_price(live, target, kind, prices, catalog, clock())
    preview = await _create_preview(
        gateway, live, changes if kind is ChangeKind.PERIOD_END else [], "none", None
    )
    return _preview_next(live, target, kind, preview)


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
    target = _target(catalog, tier, interval)
    account = await _account(database, user_id)
    async with locks.hold(_change_lock(account.customer_id)):
        live = await _live(database, gateway, account, CHANGEABLE_STATUSES)
        kind = _classify(live, target)
        if kind is ChangeKind.DROP_PENDING:
            assert live.schedule_id is not None
            await _release(gateway, live.schedule_id)
        else:
            prices = await _prices(gateway, catalog, target)
            changes = _item_changes(live.subscription, prices, target)
            if kind is ChangeKind.NOW:
                quoted = await _valid_quote(database, live, target, clock())
                await _apply_now(gateway, live, changes, quoted)
                if live.schedule_id is not None:  # the upgrade replaces a pending downgrade
                    # Made after the charge, so a declined card keeps the pending change. If this
                    # fails, the change stays pending (and shown): the upgrade itself is done.
                    await _release_quietly(gateway, live.schedule_id)
            else:
                await _schedule(gateway, live, changes)
        await _forget_quotes(database, account.id)
        return await _synced(database, gateway, locks, clock, account)


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
    account = await _account(database, user_id)
    async with locks.hold(_change_lock(account.customer_id)):
        live = await _live(database, gateway, account, LIVE_STATUSES)
        subscription_id = account.subscription_id
        already = live.cancel_pending and live.schedule_id is None
        if at_period_end and not already:
            # Stripe's `cancel_at_period_end` is the earliest item's period end: with monthly
            # metered items on an annual plan that is the month's. Name the plan's period end then.
            params: Any = (
                {"cancel_at": live.period[1]} if live.mixed_periods else {"cancel_at_period_end": True}
            )
            await _released_then(
                gateway,
                live,
                lambda o: gateway.v1.subscriptions.update_async(subscription_id, params, o),
                "cancel subscription at period end",
            )
        elif not at_period_end:
            await _released_then(
                gateway,
                live,
                lambda o: gateway.v1.subscriptions.cancel_async(subscription_id, {}, o),
                "cancel subscription",
            )
        return await _synced(database, gateway, locks, clock, account)


async def resume_subscription(
    *,
    database: Database,
    gateway: StripeGateway,
    locks: CustomerLocks,
    clock: Clock = utcnow,
    user_id: str,
) -> SubscriptionState:
    """Clear a pending cancellation, or resume a paused subscription; otherwise change nothing."""
    account = await _account(database, user_id)
    async with locks.hold(_change_lock(account.customer_id)):
        live = await _live(database, gateway, account, LIVE_STATUSES)
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
            await _released_then(
                gateway,
                live,
                lambda o: gateway.v1.subscriptions.update_async(subscription_id, params, o),
                "clear pending cancellation",
            )
        return await _synced(database, gateway, locks, clock, account)


# The account and its live subscription ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Account:
    id: int
    user_id: str
    customer_id: str
    subscription_id: str


@dataclass(frozen=True, slots=True)
class _Live:
    account: _Account
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


async def _account(database: Database, user_id: str) -> _Account:
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
    return _Account(int(row.id), user_id, str(row.stripe_customer_id), str(row.stripe_subscription_id))


async def _live(
    database: Database, gateway: StripeGateway, account: _Account, statuses: frozenset[SubscriptionStatus]
) -> _Live:
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
    return _Live(
        account=account,
        subscription=subscription,
        status=status,
        item=item,
        plan=plan_of_price(get(item, "price")),
        period=(int(start), int(end)),
        schedule_id=object_id(get(subscription, "schedule")),
    )


def _target(catalog: Catalog, tier: Tier, interval: BillingInterval) -> PlanKey:
    if tier is Tier.NONE or tier not in catalog.plans:
        raise BillingError(
            "Choose a paid tier; to stop paying, cancel the subscription.", code=ErrorCode.INVALID_PLAN
        )
    return tier, interval


def _classify(live: _Live, target: PlanKey) -> ChangeKind:
    if live.cancel_pending and live.plan != target:
        raise BillingError(
            "The subscription ends at the period end: resume it before changing plans.",
            code=ErrorCode.INVALID_PLAN,
        )
    return classify(live.plan, target, trialing=live.trialing, pending=live.schedule_id is not None)


def _change_lock(customer_id: str) -> str:
    # Apart from the sync's own lock, which the change takes again when it syncs.
    return f"{customer_id}:plan-change"


# Prices and items -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Prices:
    licensed: Any
    metered: Mapping[str, Any]  # feature -> the target tier's metered price


async def _prices(gateway: StripeGateway, catalog: Catalog, target: PlanKey) -> _Prices:
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
    return _Prices(
        licensed=by_key[licensed_key],
        metered={feature: by_key[key] for key, feature in metered_keys.items() if key in by_key},
    )


@dataclass(frozen=True, slots=True)
class _ItemChange:
    item: Any  # the subscription item; None for an item the change adds
    price: str | None  # its price on the target plan; None: the item goes

    @property
    def changed(self) -> bool:
        return self.item is None or self.price != object_id(get(self.item, "price"))

    @property
    def metered(self) -> bool:
        return bool(get(get(get(self.item, "price"), "recurring"), "usage_type") == "metered")


def _item_changes(subscription: Any, prices: _Prices, target: PlanKey) -> list[_ItemChange]:
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
            changes.append(_ItemChange(item, object_id(prices.licensed)))
        elif get(get(price, "recurring"), "usage_type") == "metered":
            changes.append(_ItemChange(item, fitting.pop(metadata(price).get("feature", ""), None)))
        else:
            changes.append(_ItemChange(item, object_id(price)))
    changes += [_ItemChange(None, price) for price in fitting.values()]
    return changes


def _update_items(changes: Sequence[_ItemChange]) -> list[dict[str, Any]]:
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


def _phase_items(changes: Sequence[_ItemChange], *, after: bool) -> list[dict[str, Any]]:
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


# Stripe calls -----------------------------------------------------------------------------------


async def _create_preview(
    gateway: StripeGateway,
    live: _Live,
    changes: Sequence[_ItemChange],
    proration_behavior: str,
    proration_date: int | None,
) -> Any:
    params: dict[str, Any] = {"subscription": live.account.subscription_id}
    items = _update_items(changes)
    if items:
        details: dict[str, Any] = {"items": items, "proration_behavior": proration_behavior}
        if proration_date is not None:
            details["proration_date"] = proration_date
        params["subscription_details"] = details
    sent: Any = params
    return await gateway.call(
        lambda o: gateway.v1.invoices.create_preview_async(sent, o), what="preview invoice"
    )


async def _apply_now(
    gateway: StripeGateway, live: _Live, changes: Sequence[_ItemChange], proration_date: int | None
) -> None:
    """The update itself: charged now, or refused (402 CARD_DECLINED) with nothing changed."""
    params: dict[str, Any] = {
        "items": _update_items(changes),
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


async def _schedule(gateway: StripeGateway, live: _Live, changes: Sequence[_ItemChange]) -> None:
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
                "items": _phase_items(changes, after=False),
                "start_date": int(get(current, "start_date") or live.period[0]),
                "end_date": live.period[1],
            },
            {"items": _phase_items(changes, after=True), "proration_behavior": "none"},
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
            await _release_quietly(gateway, created)
        raise


async def _release(gateway: StripeGateway, schedule_id: str) -> Any:
    """Release the schedule: the subscription stays as it is now, the pending change is dropped."""
    return await gateway.call(
        lambda o: gateway.v1.subscription_schedules.release_async(schedule_id, None, o),
        idempotency_key=random_idempotency_key("subscription_schedule.release"),
        what="release subscription schedule",
    )


async def _release_quietly(gateway: StripeGateway, schedule_id: str) -> None:
    try:
        await _release(gateway, schedule_id)
    except BillingError as exc:
        log.error("could not release subscription schedule %s: %s", schedule_id, exc.message)


async def _released_then(
    gateway: StripeGateway, live: _Live, operation: Callable[[RequestOptions], Awaitable[Any]], what: str
) -> None:
    """Release a pending schedule, then run `operation`; if that fails, put the schedule back."""
    released = await _release(gateway, live.schedule_id) if live.schedule_id is not None else None
    try:
        await gateway.call(
            operation, idempotency_key=random_idempotency_key("subscription.update"), what=what
        )
    except BillingError:
        if released is not None:
            await _restore_schedule(gateway, live, released)
        raise


async def _restore_schedule(gateway: StripeGateway, live: _Live, released: Any) -> None:
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


async def _synced(
    database: Database, gateway: StripeGateway, locks: CustomerLocks, clock: Clock, account: _Account
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
        )
    except BillingError as exc:
        if exc.code is not ErrorCode.BILLING_PROVIDER_UNAVAILABLE:
            raise
        log.warning("sync of %s after a subscription change failed: %s", account.customer_id, exc.message)
    return await load_subscription(database, account.user_id)


# Quotes: the proration date of a preview, kept so the change charges what it showed -------------


async def _valid_quote(database: Database, live: _Live, target: PlanKey, now: datetime) -> int | None:
    """The proration date of an unexpired preview of this change from this very state, if any."""
    q = quote_table.c
    query = select(q.stripe_subscription_id, q.stripe_price_id, q.proration_date, q.expires_at).where(
        and_(q.account_id == live.account.id, q.tier == target[0].value, q.interval == target[1].value)
    )
    async with database.read() as conn:
        row = (await conn.execute(query)).first()
    if row is None or row.expires_at <= now:
        return None
    proration_date = int(row.proration_date.timestamp())
    if (
        row.stripe_subscription_id != live.account.subscription_id
        or row.stripe_price_id != live.price_id
        or not live.period[0] <= proration_date <= live.period[1]
    ):
        return None
    return proration_date


async def _save_quote(
    database: Database, live: _Live, target: PlanKey, proration_date: int, now: datetime
) -> None:
    values = {
        "stripe_subscription_id": live.account.subscription_id,
        "stripe_price_id": live.price_id or "",
        "proration_date": stripe_time(proration_date),
        "expires_at": now + QUOTE_TTL,
        "created_at": now,
    }
    insert = (postgresql.insert if database.is_postgres else sqlite.insert)(quote_table).values(
        account_id=live.account.id, tier=target[0].value, interval=target[1].value, **values
    )
    q = quote_table.c
    async with database.write() as conn:
        await conn.execute(
            delete(quote_table).where(and_(q.account_id == live.account.id, q.expires_at <= now))
        )
        await conn.execute(
            insert.on_conflict_do_update(index_elements=["account_id", "tier", "interval"], set_=values)
        )


async def _forget_quotes(database: Database, account_id: int) -> None:
    async with database.write() as conn:
        await conn.execute(delete(quote_table).where(quote_table.c.account_id == account_id))


# Reading previews -------------------------------------------------------------------------------


def _proration_time(preview: Any) -> int:
    """The moment Stripe prorated the preview at (Stripe's clock, which may not be ours)."""
    found = get(get(get(preview, "parent"), "subscription_details"), "subscription_proration_date")
    if found:
        return int(found)
    for line in get(get(preview, "lines"), "data") or []:
        if _is_proration(line):
            return int(get(get(line, "period"), "start"))
    return int(get(preview, "created"))


def _is_proration(line: Any) -> bool:
    parent = get(line, "parent")
    for key in ("subscription_item_details", "invoice_item_details"):
        details = get(parent, key)
        if details is not None:
            return bool(get(details, "proration"))
    return bool(get(line, "proration"))  # older API versions


def _lines(preview: Any) -> tuple[PreviewLine, ...]:
    return tuple(
        PreviewLine(
            description=str(get(line, "description") or ""),
            amount=int(get(line, "amount") or 0),
            proration=_is_proration(line),
            period_start=stripe_time(get(get(line, "period"), "start")),
            period_end=stripe_time(get(get(line, "period"), "end")),
        )
        for line in get(get(preview, "lines"), "data") or []
    )


def _preview_now(
    live: _Live, target: PlanKey, prices: _Prices, preview: Any, proration_date: int
) -> PlanChangePreview:
    currency = str(get(preview, "currency") or get(prices.licensed, "currency") or "usd")
    at = stripe_time(proration_date)
    if live.trialing or get(preview, "billing_reason") == "upcoming":
        # Nothing is billed now (a trial): the preview is the next invoice.
        return PlanChangePreview(
            tier=target[0],
            interval=target[1],
            kind=ChangeKind.NOW,
            effective_at=at,
            currency=currency,
            amount_due=0,
            next_invoice_amount=int(get(preview, "amount_due") or 0),
            next_invoice_at=stripe_time(live.period[1]),
            lines=_lines(preview),
        )
    lines = _lines(preview)
    next_at = stripe_time(live.period[1])
    if live.plan is None or live.plan[1] != target[1]:  # a new billing period starts now
        licensed = object_id(prices.licensed)
        new_period = [
            line
            for raw, line in zip(get(get(preview, "lines"), "data") or [], lines, strict=True)
            if not line.proration and _line_price(raw) == licensed
        ]
        next_at = new_period[0].period_end if new_period else None
    # A credit larger than the charge stays on the customer's balance and pays the next invoice.
    left = min(0, int(get(preview, "total") or 0) + int(get(preview, "starting_balance") or 0))
    amount = int(get(prices.licensed, "unit_amount") or 0)
    return PlanChangePreview(
        tier=target[0],
        interval=target[1],
        kind=ChangeKind.NOW,
        effective_at=at,
        currency=currency,
        amount_due=int(get(preview, "amount_due") or 0),
        next_invoice_amount=max(0, amount + left),
        next_invoice_at=next_at,
        lines=lines,
    )


def _line_price(line: Any) -> str | None:
    details = get(get(line, "pricing"), "price_details")
    return object_id(get(details, "price")) or object_id(get(line, "price"))


def _preview_next(live: _Live, target: PlanKey, kind: ChangeKind, preview: Any) -> PlanChangePreview:
    """Nothing due now: the next invoice (at the new price for a downgrade)."""
    period_end = stripe_time(live.period[1])
    return PlanChangePreview(
        tier=target[0],
        interval=target[1],
        kind=kind,
        effective_at=period_end if kind is ChangeKind.PERIOD_END else stripe_time(get(preview, "created")),
        currency=str(get(preview, "currency") or "usd"),
        amount_due=0,
        next_invoice_amount=int(get(preview, "amount_due") or 0),
        next_invoice_at=period_end,
        lines=_lines(preview),
    )


def _next_plan_invoice_is_computed(live: _Live, target: PlanKey) -> bool:
    """Whether Stripe's preview cannot show the plan's next invoice: a change of interval, or an
    annual plan whose upcoming invoice is the next month's metered usage."""
    return live.plan is not None and (
        live.plan[1] != target[1] or (target[1] is BillingInterval.ANNUAL and live.mixed_periods)
    )


def _preview_from_price(
    live: _Live, target: PlanKey, kind: ChangeKind, prices: _Prices, catalog: Catalog, now: datetime
) -> PlanChangePreview:
    """The plan's next invoice at the period end, from the target price (metered usage on top).

    For a downgrade that changes the interval (annual -> monthly) Stripe's subscription preview
    would start the new interval now; the schedule starts it at the period end, with one invoice
    of the new price for the first new period. For an annual plan with monthly metered items
    Stripe's upcoming invoice is the next month's usage, not the plan's renewal.
    """
    start = live.period[1]
    end = int(
        add_months(
            datetime.fromtimestamp(start, UTC), 12 if target[1] is BillingInterval.ANNUAL else 1
        ).timestamp()
    )
    amount = int(get(prices.licensed, "unit_amount") or 0)
    line = PreviewLine(
        description=f"1 \u00d7 {catalog.plan(target[0]).name} ({target[1].value})",
        amount=amount,
        proration=False,
        period_start=stripe_time(start),
        period_end=stripe_time(end),
    )
    return PlanChangePreview(
        tier=target[0],
        interval=target[1],
        kind=kind,
        effective_at=stripe_time(start) if kind is ChangeKind.PERIOD_END else now,
        currency=str(get(prices.licensed, "currency") or catalog.currency),
        amount_due=0,
        next_invoice_amount=amount,
        next_invoice_at=stripe_time(start),
        lines=(line,),
    )
