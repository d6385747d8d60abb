"""Periods and money: billing intervals and boundaries, items and their periods, billing mode,
and what prices cost (tiers, proration per second, rounding to the cent)."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from stripe_sandbox.errors import parameter_invalid, parameter_missing
from stripe_sandbox.store import Transaction, new_id

Obj = dict[str, Any]

MINUTE = 60
HOUR = 3_600
DAY = 86_400
TRIAL_WILL_END_NOTICE = 3 * DAY
FINALIZE_DELAY = HOUR

LIVE_STATUSES = ("trialing", "active", "past_due", "unpaid", "paused", "incomplete")
BILLED_STATUSES = ("active", "past_due", "unpaid")


# Time ----------------------------------------------------------------------------------------


def _months_later(ts: int, months: int) -> int:
    moment = datetime.fromtimestamp(ts, UTC)
    years, month0 = divmod(moment.month - 1 + months, 12)
    year = moment.year + years
    day = min(moment.day, calendar.monthrange(year, month0 + 1)[1])
    return int(moment.replace(year=year, month=month0 + 1, day=day).timestamp())


def add_intervals(anchor: int, interval: str, count: int, n: int) -> int:
    """The `n`-th billing boundary after `anchor` for an `interval` of `count` units."""
    if interval == "day":
        return anchor + n * count * DAY
    if interval == "week":
        return anchor + n * count * 7 * DAY
    if interval == "month":
        return _months_later(anchor, n * count)
    if interval == "year":
        return _months_later(anchor, 12 * n * count)
    raise ValueError(f"unknown interval {interval!r}")


_LONGEST = {"day": DAY, "week": 7 * DAY, "month": 31 * DAY, "year": 366 * DAY}


def next_boundary(anchor: int, interval: str, count: int, after: int) -> int:
    """The first billing boundary of the cycle anchored at `anchor` strictly after `after`."""
    n = max(0, (after - anchor) // (_LONGEST[interval] * count))
    while (boundary := add_intervals(anchor, interval, count, n)) <= after:
        n += 1
    return boundary


# Money ---------------------------------------------------------------------------------------


def round_cents(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def prorated(amount: int, start: int, end: int, at: int) -> int:
    """`amount` for the part of [start, end) left after `at`, per second, rounded to the cent."""
    if end <= start:
        return 0
    remaining = min(max(end - at, 0), end - start)
    return round_cents(Decimal(amount) * remaining / (end - start))


def unit_amount(price: Obj) -> Decimal:
    if price.get("unit_amount_decimal") not in (None, ""):
        return Decimal(str(price["unit_amount_decimal"]))
    return Decimal(price.get("unit_amount") or 0)


def _tier_value(tier: Obj, key: str) -> Decimal:
    value = tier.get(f"{key}_decimal")
    if value in (None, ""):
        value = tier.get(key)
    return Decimal(str(value or 0))


def price_amount(price: Obj, quantity: Decimal | int | float) -> int:
    """What `quantity` units of a price cost, in cents: per unit (with `transform_quantity`) or tiered."""
    units = Decimal(str(quantity))
    tiers = price.get("tiers")
    if price.get("billing_scheme") == "tiered" and tiers:
        if price.get("tiers_mode") == "volume":
            tier = next(t for t in tiers if t.get("up_to") is None or units <= t["up_to"])
            flat = _tier_value(tier, "flat_amount") if units > 0 else Decimal(0)
            return round_cents(units * _tier_value(tier, "unit_amount") + flat)
        total, lower = Decimal(0), Decimal(0)
        for tier in tiers:
            if units <= lower:
                break
            upper = units if tier.get("up_to") is None else min(units, Decimal(tier["up_to"]))
            total += (upper - lower) * _tier_value(tier, "unit_amount") + _tier_value(tier, "flat_amount")
            lower = upper
        return round_cents(total)
    transform = price.get("transform_quantity")
    if transform:
        rounding = "ROUND_CEILING" if transform.get("round") == "up" else "ROUND_FLOOR"
        units = (units / Decimal(transform["divide_by"])).quantize(Decimal(1), rounding=rounding)
    return round_cents(unit_amount(price) * units)


def format_amount(amount: Decimal | int, currency: str) -> str:
    value = Decimal(amount) / 100
    text = f"{value:,.2f}" if value == value.quantize(Decimal("0.01")) else f"{value:,f}"
    symbol = {"usd": "$", "eur": "€", "gbp": "£"}.get(currency.lower())
    return f"{symbol}{text}" if symbol else f"{text} {currency.upper()}"


# Prices and items ----------------------------------------------------------------------------


def is_metered(price: Obj) -> bool:
    return bool((price.get("recurring") or {}).get("usage_type") == "metered")


def interval_of(price: Obj) -> tuple[str, int]:
    recurring = price["recurring"]
    return str(recurring["interval"]), int(recurring.get("interval_count") or 1)


def product_id(price: Obj) -> str | None:
    product = price.get("product")
    if isinstance(product, dict):
        return str(product["id"])
    return product if isinstance(product, str) else None


async def product_name(tx: Transaction, price: Obj) -> str:
    product = price.get("product")
    if isinstance(product, str):
        product = await tx.find(product)
    if isinstance(product, dict) and product.get("name"):
        return str(product["name"])
    return str(price.get("nickname") or price["id"])


async def get_price(tx: Transaction, price_id: str, param: str, *, recurring: bool = True) -> Obj:
    price = await tx.get("price", price_id, param=param)
    if recurring and not price.get("recurring"):
        raise parameter_invalid(
            param,
            "The price specified is set to `type=one_time` but this field only accepts prices with "
            "`type=recurring`.",
        )
    if not price.get("active", True):
        raise parameter_invalid(
            param, "The price specified is inactive. This field only accepts active prices."
        )
    return price


def plan_from_price(price: Obj) -> Obj:
    """The legacy `plan` view Stripe still returns next to an item's `price`."""
    recurring = price.get("recurring") or {}
    return {
        "id": price["id"],
        "object": "plan",
        "active": price.get("active", True),
        "amount": price.get("unit_amount"),
        "amount_decimal": price.get("unit_amount_decimal"),
        "billing_scheme": price.get("billing_scheme", "per_unit"),
        "created": price.get("created"),
        "currency": price.get("currency"),
        "interval": recurring.get("interval"),
        "interval_count": recurring.get("interval_count", 1),
        "livemode": False,
        "metadata": price.get("metadata", {}),
        "meter": recurring.get("meter"),
        "nickname": price.get("nickname"),
        "product": price.get("product"),
        "tiers_mode": price.get("tiers_mode"),
        "transform_usage": None,
        "trial_period_days": recurring.get("trial_period_days"),
        "usage_type": recurring.get("usage_type", "licensed"),
    }


def licensed_amount(item: Obj) -> int:
    if is_metered(item["price"]):
        return 0
    return price_amount(item["price"], int(item.get("quantity") or 0))


def embedded_price(price: Obj) -> Obj:
    """A price as an item shows it: includable fields left out (tiers kept for tiered prices)."""
    shown = {key: value for key, value in price.items() if key != "currency_options"}
    if shown.get("billing_scheme") != "tiered":
        shown.pop("tiers", None)
    return shown


def new_item(
    subscription_id: str,
    price: Obj,
    quantity: int | None,
    period: tuple[int, int],
    now: int,
    metadata: dict[str, str] | None = None,
) -> Obj:
    return {
        "id": new_id("si"),
        "object": "subscription_item",
        "billing_thresholds": None,
        "created": now,
        "current_period_end": period[1],
        "current_period_start": period[0],
        "discounts": [],
        "metadata": metadata or {},
        "plan": plan_from_price(price),
        "price": embedded_price(price),
        "quantity": None if is_metered(price) else (1 if quantity is None else quantity),
        "subscription": subscription_id,
        "tax_rates": [],
    }


def items_of(subscription: Obj) -> list[Obj]:
    items: list[Obj] = subscription["items"]["data"]
    return items


def item_list(subscription_id: str, items: list[Obj]) -> Obj:
    return {
        "object": "list",
        "data": items,
        "has_more": False,
        "total_count": len(items),
        "url": f"/v1/subscription_items?subscription={subscription_id}",
    }


def item_period(item: Obj) -> tuple[int, int]:
    return int(item["current_period_start"]), int(item["current_period_end"])


def period_of(subscription: Obj) -> tuple[int, int]:
    """The item period that ends first: the subscription's next invoice (one period in classic mode)."""
    first = min(items_of(subscription), key=lambda item: int(item["current_period_end"]))
    return item_period(first)


def latest_period_end(subscription: Obj) -> int:
    return max(int(item["current_period_end"]) for item in items_of(subscription))


def period_for_new_item(subscription: Obj, price: Obj, now: int) -> tuple[int, int]:
    """A new item's first period: the period of the items already on its interval, else (flexible
    billing mode, a new interval) from now to its next boundary counted from the anchor."""
    wanted = interval_of(price)
    for item in items_of(subscription):
        if interval_of(item["price"]) == wanted:
            return item_period(item)
    if subscription["status"] == "trialing" and subscription.get("trial_end"):
        return now, int(subscription["trial_end"])
    interval, count = wanted
    return now, next_boundary(int(subscription["billing_cycle_anchor"]), interval, count, now)


# Billing mode --------------------------------------------------------------------------------

BILLING_MODES = ("classic", "flexible")
DEFAULT_BILLING_MODE = "flexible"  # this API version's default when a request names none


def billing_mode_param(value: Any, param: str) -> str:
    """The `billing_mode[type]` a request asks for (`flexible` when it names none)."""
    if value is None:
        return DEFAULT_BILLING_MODE
    kind = value.get("type") if isinstance(value, dict) else None
    if kind is None:
        raise parameter_missing(f"{param}[type]")
    if kind not in BILLING_MODES:
        raise parameter_invalid(
            f"{param}[type]", f"Invalid {param}[type]: must be one of classic, or flexible"
        )
    return str(kind)


def billing_mode_object(kind: str, now: int) -> Obj:
    if kind == "flexible":
        return {"type": "flexible", "flexible": {"proration_discounts": "included"}, "updated_at": now}
    return {"type": "classic", "flexible": None, "updated_at": None}


def billing_mode_of(subscription: Obj) -> str:
    return str((subscription.get("billing_mode") or {}).get("type") or DEFAULT_BILLING_MODE)


def check_compatible(prices: list[Obj], param: str, *, billing_mode: str) -> None:
    """One currency always; one interval too in `classic` billing mode (`flexible` mixes them)."""
    intervals = {interval_of(price) for price in prices}
    currencies = {str(price.get("currency")) for price in prices}
    if len(currencies) > 1 or (billing_mode == "classic" and len(intervals) > 1):
        raise parameter_invalid(
            param, "Currency and interval fields must match across all plans on this subscription."
        )
