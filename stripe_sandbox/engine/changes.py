"""The sandbox's billing engine: periods, proration, invoices, payment, and the passage of time.

Resources (`resources/checkout.py`, `subscriptions.py`, `schedules.py`, `invoices.py`) and the
control routes (`control/lifecycle.py`) call these functions; hosted pages may call them too
(`complete_checkout`, `set_payment_method_fails`, `update_subscription`, `cancel_subscription`,
`advance_clock`). Every function works inside one sandbox `Transaction` and records the events
Stripe would send with `tx.emit`. Arithmetic (periods, proration) is pure.

What is modelled, after Stripe's documentation:

Time
    The sandbox clock is real time plus an offset (state "clock_offset"). What Stripe does on
    its own as time passes happens when `advance_clock` moves the clock past it, in time order,
    each at its own timestamp: Checkout Sessions expire (24 h), `customer.subscription.trial_will_end`
    three days before a trial ends, trials end, schedule phases start, subscriptions renew or
    cancel at the period end, draft invoices finalize, failed payments are retried. Advancing by
    0 seconds catches up with real time.

Periods
    Monthly and yearly periods keep the billing cycle anchor's day of month (clamped to the
    month's last day: Jan 31 -> Feb 28 -> Mar 31) and time of day, in UTC. Each item has its
    own `current_period_start`/`current_period_end` (this API version has no subscription-level
    period); `period_of` is the item period that ends first, the subscription's next invoice.

Billing mode
    `billing_mode.type` is `flexible` unless a request asks for `classic` (this API version's
    default). A `classic` subscription needs one interval across its prices, as before; a
    `flexible` one may mix intervals (an annual licensed price and a monthly metered one): each
    item renews on its own boundaries, all counted from the one billing cycle anchor, and the
    items whose periods end at the same moment share one invoice (so a monthly metered item on
    an annual plan is invoiced every month, in arrears, and at the year's end together with the
    annual renewal). `cancel_at_period_end` resolves to the earliest item period end, as Stripe
    documents for mixed intervals; `cancel_at=max_period_end` to the latest.

Invoices
    A subscription's first invoice and the invoice of an update that bills at once
    (`proration_behavior=always_invoice`, an interval change, `billing_cycle_anchor=now`) are
    finalized and charged immediately. Renewal invoices (and the first one after a trial) are
    created as drafts at the period end and, as Stripe documents for subscriptions, finalized
    and charged one hour later (`automatically_finalizes_at`). Metered items are billed in
    arrears on the renewal invoice: usage of the ended period (from the meters resource) times
    the unit amount. Customer credit balances are applied at finalization. Tax is never
    computed (always 0); there are no charges or payment intents, only the invoice's outcome.

Proration (per second, rounded half up to the cent per line)
    For a change at time t inside the period [start, end): a credit of
    -amount * (end - t) / (end - start) for each licensed item that goes away or changes, and a
    charge of +amount * (end - t) / (end - start) for each that comes in. `create_prorations`
    leaves them as pending invoice items for the next invoice; `always_invoice` invoices and
    charges them now; `none` drops them. An interval change (or `billing_cycle_anchor=now`)
    resets the anchor to now: the unused time of every licensed item is credited (unless
    `none`) and the new period's full price is invoiced and charged now. No proration during a
    trial.

Payment
    A charge fails when the customer was marked with
    `POST /_control/customers/{id}/payment_method {"fails": true}` (or has no payment method at
    all). `payment_behavior=error_if_incomplete` turns a failed charge of an update into a 402
    `card_declined` and leaves everything unchanged; other payment behaviours apply the update
    and make the subscription `past_due` (`pending_if_incomplete`'s pending updates are not
    modelled).

Dunning (modelled on Stripe's custom retry schedule)
    The first attempt is made when the invoice is finalized, at time T. When it fails the
    subscription becomes `past_due` and `invoice.payment_failed` is sent; the payment is retried
    at T + 3 days, T + 5 days and T + 7 days (`invoice.next_payment_attempt`), each failure
    sending `invoice.payment_failed` again. A successful attempt pays the invoice
    (`invoice.paid`, `invoice.payment_succeeded`) and returns the subscription to `active`.
    When the last retry fails the subscription is canceled (`customer.subscription.deleted`,
    `cancellation_details.reason = "payment_failed"`), or set to `unpaid` when the sandbox is
    configured with `dunning_final_action="unpaid"`; the invoice stays open. An unpaid
    subscription keeps renewing, but its invoices are finalized without payment attempts.

Schedules
    `from_subscription` schedules: at the end of each phase the next phase's items replace the
    subscription's (with that phase's `proration_behavior`); after the last phase the schedule is
    released (`end_behavior=release`) or the subscription canceled (`cancel`). Updating a
    scheduled subscription's cancellation is refused, as Stripe does; canceling it cancels the
    schedule too.
"""

from __future__ import annotations

import calendar
import copy
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from stripe_sandbox.api import SandboxConfig, apply_metadata
from stripe_sandbox.errors import (
    StripeError,
    card_declined,
    parameter_invalid,
    parameter_missing,
    resource_missing,
    unsupported,
)
from stripe_sandbox.resources.customers import new_customer
from stripe_sandbox.resources.meters import metered_quantity
from stripe_sandbox.store import Transaction, new_id

Obj = dict[str, Any]

MINUTE = 60
HOUR = 3_600
DAY = 86_400
TRIAL_WILL_END_NOTICE = 3 * DAY
FINALIZE_DELAY = HOUR
RETRY_AFTER_DAYS = (3, 5, 7)  # after the first failed attempt
CHECKOUT_LIFETIME = 24 * HOUR
MAX_CLOCK_STEPS = 20_000
TIMES = "\u00d7"  # the multiplication sign of Stripe's line descriptions ("2 x Pro")

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


def _date_label(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%d %b %Y")


# Prices and items ----------------------------------------------------------------------------


def is_metered(price: Obj) -> bool:
    return bool((price.get("recurring") or {}).get("usage_type") == "metered")


def interval_of(price: Obj) -> tuple[str, int]:
    recurring = price["recurring"]
    return str(recurring["interval"]), int(recurring.get("interval_count") or 1)


def _interval_label(price: Obj) -> str:
    recurring = price.get("recurring")
    if not recurring:
        return ""
    interval, count = interval_of(price)
    return f" / {interval}" if count == 1 else f" / every {count} {interval}s"


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


def _licensed_intervals(items: list[Obj]) -> set[tuple[str, int]]:
    return {interval_of(item["price"]) for item in items if not is_metered(item["price"])}


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


def subscription_of(invoice: Obj) -> str | None:
    details = (invoice.get("parent") or {}).get("subscription_details") or {}
    value = details.get("subscription")
    if isinstance(value, dict):
        return str(value["id"])
    return value if isinstance(value, str) else None


# Events --------------------------------------------------------------------------------------


async def emit(tx: Transaction, event_type: str, obj: Obj, previous: Obj | None = None) -> None:
    """Emit a snapshot: later changes to `obj` in this transaction must not leak into the event."""
    await tx.emit(
        event_type,
        copy.deepcopy(obj),
        previous_attributes=None if previous is None else copy.deepcopy(previous),
    )


async def _reload(tx: Transaction, obj: Obj) -> Obj:
    return await tx.get(str(obj["object"]), str(obj["id"]))


# Payment methods -----------------------------------------------------------------------------


def _fails_key(customer_id: str) -> str:
    return f"pm_fails:{customer_id}"


async def set_payment_method_fails(tx: Transaction, customer_id: str, fails: bool) -> None:
    """Whether charges to this customer fail from now on."""
    await tx.get("customer", customer_id)
    await tx.set_state(_fails_key(customer_id), "1" if fails else "0")


async def payment_method_fails(tx: Transaction, customer_id: str) -> bool:
    return await tx.get_state(_fails_key(customer_id), "0") == "1"


async def _charge_fails(tx: Transaction, invoice: Obj) -> bool:
    customer_id = str(invoice["customer"])
    if await payment_method_fails(tx, customer_id):
        return True
    if invoice.get("default_payment_method"):
        return False
    customer = await tx.find(customer_id)
    default = ((customer or {}).get("invoice_settings") or {}).get("default_payment_method")
    return not default


async def create_payment_method(tx: Transaction, customer_id: str, now: int, email: str | None) -> Obj:
    """The card a customer entered in Checkout, attached to them."""
    method = {
        "id": new_id("pm"),
        "object": "payment_method",
        "allow_redisplay": "always",
        "billing_details": {
            "address": None,
            "email": email,
            "name": None,
            "phone": None,
            "tax_id": None,
        },
        "card": {
            "brand": "visa",
            "checks": {"address_line1_check": None, "address_postal_code_check": None, "cvc_check": "pass"},
            "country": "US",
            "display_brand": "visa",
            "exp_month": 12,
            "exp_year": datetime.fromtimestamp(now, UTC).year + 4,
            "fingerprint": new_id("fp")[3:19],
            "funding": "credit",
            "generated_from": None,
            "last4": "4242",
            "networks": {"available": ["visa"], "preferred": None},
            "regulated_status": "unregulated",
            "three_d_secure_usage": {"supported": True},
            "wallet": None,
        },
        "created": now,
        "customer": customer_id,
        "customer_account": None,
        "livemode": False,
        "metadata": {},
        "type": "card",
    }
    await tx.insert(method)
    await emit(tx, "payment_method.attached", method)
    return method


# Invoice lines -------------------------------------------------------------------------------


@dataclass
class Line:
    """One line of an invoice (or of a pending invoice item) before it is rendered."""

    amount: int
    currency: str
    description: str
    price_id: str | None
    product: str | None
    unit_amount_decimal: str | None
    quantity: int | None
    period: tuple[int, int]
    subscription: str | None
    subscription_item: str | None
    proration: bool = False
    invoice_item: str | None = None
    quantity_decimal: str | None = None


def _line_for_price(
    price: Obj,
    *,
    amount: int,
    description: str,
    quantity: int | None,
    period: tuple[int, int],
    subscription: str | None,
    item: str | None,
    proration: bool = False,
    quantity_decimal: str | None = None,
) -> Line:
    return Line(
        amount=amount,
        currency=str(price.get("currency") or "usd"),
        description=description,
        price_id=str(price["id"]),
        product=product_id(price),
        unit_amount_decimal=None if price.get("billing_scheme") == "tiered" else str(unit_amount(price)),
        quantity=quantity,
        period=period,
        subscription=subscription,
        subscription_item=item,
        proration=proration,
        quantity_decimal=quantity_decimal,
    )


async def period_line(tx: Transaction, item: Obj, period: tuple[int, int], *, trial: bool = False) -> Line:
    """A licensed item's charge for a whole period ($0 in a trial)."""
    price = item["price"]
    name = await product_name(tx, price)
    quantity = int(item.get("quantity") or 0)
    if trial:
        description, amount = f"Trial period for {name}", 0
    else:
        at = format_amount(unit_amount(price), price["currency"])
        description = f"{quantity} {TIMES} {name} (at {at}{_interval_label(price)})"
        amount = licensed_amount(item)
    return _line_for_price(
        price,
        amount=amount,
        description=description,
        quantity=quantity,
        period=period,
        subscription=str(item["subscription"]),
        item=str(item["id"]),
    )


async def usage_line(tx: Transaction, item: Obj, customer_id: str, period: tuple[int, int]) -> Line:
    """A metered item's usage in `period`, billed in arrears."""
    price = item["price"]
    meter = (price.get("recurring") or {}).get("meter")
    used = await metered_quantity(tx, str(meter), customer_id, period[0], period[1]) if meter else 0.0
    amount = price_amount(price, used)
    name = await product_name(tx, price)
    shown = f"{used:,.0f}" if float(used).is_integer() else f"{used:,}"
    each = format_amount(unit_amount(price), price["currency"])
    return _line_for_price(
        price,
        amount=amount,
        description=f"{shown} {TIMES} {name} (at {each} / unit)",
        quantity=round(used),
        quantity_decimal=str(used),
        period=period,
        subscription=str(item["subscription"]),
        item=str(item["id"]),
    )


async def proration_line(
    tx: Transaction, item: Obj, period: tuple[int, int], at: int, *, credit: bool
) -> Line:
    price = item["price"]
    name = await product_name(tx, price)
    quantity = int(item.get("quantity") or 0)
    shown = name if quantity == 1 else f"{quantity} {TIMES} {name}"
    amount = prorated(licensed_amount(item), period[0], period[1], at)
    what = "Unused time on" if credit else "Remaining time on"
    return _line_for_price(
        price,
        amount=-amount if credit else amount,
        description=f"{what} {shown} after {_date_label(at)}",
        quantity=quantity,
        period=(at, period[1]),
        subscription=str(item["subscription"]),
        item=str(item["id"]),
        proration=True,
    )


def render_line(line: Line, invoice_id: str, *, preview: bool = False) -> Obj:
    if line.subscription_item is not None or line.invoice_item is None:
        parent: Obj = {
            "type": "subscription_item_details",
            "invoice_item_details": None,
            "subscription_item_details": {
                "invoice_item": line.invoice_item,
                "proration": line.proration,
                "proration_details": {"credited_items": None},
                "subscription": line.subscription,
                "subscription_item": line.subscription_item,
            },
        }
    else:
        parent = {
            "type": "invoice_item_details",
            "invoice_item_details": {
                "invoice_item": line.invoice_item,
                "proration": line.proration,
                "proration_details": {"credited_items": None},
                "subscription": line.subscription,
            },
            "subscription_item_details": None,
        }
    return {
        "id": new_id("il_tmp" if preview else "il"),
        "object": "line_item",
        "amount": line.amount,
        "currency": line.currency,
        "description": line.description,
        "discount_amounts": [],
        "discountable": not line.proration,
        "discounts": [],
        "invoice": invoice_id,
        "livemode": False,
        "metadata": {},
        "parent": parent,
        "period": {"start": line.period[0], "end": line.period[1]},
        "pretax_credit_amounts": [],
        "pricing": {
            "type": "price_details",
            "price_details": None
            if line.price_id is None
            else {"price": line.price_id, "product": line.product},
            "unit_amount_decimal": line.unit_amount_decimal,
        },
        "quantity": line.quantity,
        "quantity_decimal": line.quantity_decimal
        if line.quantity_decimal is not None
        else (None if line.quantity is None else str(line.quantity)),
        "subscription": line.subscription,
        "subtotal": line.amount,
        "taxes": [],
    }


# Pending invoice items -----------------------------------------------------------------------


async def create_invoice_item(tx: Transaction, customer_id: str, line: Line, now: int) -> Obj:
    """A pending invoice item (a proration, or a one-time price), swept into the next invoice."""
    item = {
        "id": new_id("ii"),
        "object": "invoiceitem",
        "amount": line.amount,
        "currency": line.currency,
        "customer": customer_id,
        "customer_account": None,
        "date": now,
        "description": line.description,
        "discountable": not line.proration,
        "discounts": [],
        "invoice": None,
        "livemode": False,
        "metadata": {},
        "net_amount": line.amount,
        "parent": None
        if line.subscription is None
        else {
            "type": "subscription_details",
            "subscription_details": {
                "subscription": line.subscription,
                "subscription_item": line.subscription_item,
            },
        },
        "period": {"start": line.period[0], "end": line.period[1]},
        "pricing": {
            "type": "price_details",
            "price_details": None
            if line.price_id is None
            else {"price": line.price_id, "product": line.product},
            "unit_amount_decimal": line.unit_amount_decimal,
        },
        "proration": line.proration,
        "proration_details": {"discount_amounts": []},
        "quantity": line.quantity if line.quantity is not None else 1,
        "quantity_decimal": line.quantity_decimal or str(line.quantity if line.quantity is not None else 1),
        "tax_rates": [],
        "test_clock": None,
    }
    line.invoice_item = str(item["id"])
    await tx.insert(item)
    await emit(tx, "invoiceitem.created", item)
    return item


def _item_subscription(item: Obj) -> str | None:
    details = (item.get("parent") or {}).get("subscription_details") or {}
    value = details.get("subscription")
    return value if isinstance(value, str) else None


async def pending_lines(tx: Transaction, subscription_id: str) -> list[Line]:
    """The subscription's pending invoice items, oldest first, as invoice lines."""
    pending = await tx.all(
        "invoiceitem",
        lambda ii: ii.get("invoice") is None and _item_subscription(ii) == subscription_id,
    )
    lines = []
    for ii in reversed(pending):
        pricing = ii.get("pricing") or {}
        details = pricing.get("price_details") or {}
        parent = (ii.get("parent") or {}).get("subscription_details") or {}
        lines.append(
            Line(
                amount=int(ii["amount"]),
                currency=str(ii["currency"]),
                description=str(ii.get("description") or ""),
                price_id=details.get("price"),
                product=details.get("product"),
                unit_amount_decimal=pricing.get("unit_amount_decimal"),
                quantity=ii.get("quantity"),
                period=(int(ii["period"]["start"]), int(ii["period"]["end"])),
                subscription=subscription_id,
                subscription_item=parent.get("subscription_item"),
                proration=bool(ii.get("proration")),
                invoice_item=str(ii["id"]),
                quantity_decimal=ii.get("quantity_decimal"),
            )
        )
    return lines


# Invoices ------------------------------------------------------------------------------------


def _customer_address(customer: Obj) -> Obj | None:
    address = customer.get("address")
    return dict(address) if isinstance(address, dict) else None


def apply_balance(invoice: Obj, balance: int) -> int:
    """Apply the customer's balance (negative = credit) to the invoice; returns the balance left."""
    due = int(invoice["total"]) + balance
    invoice["starting_balance"] = balance
    invoice["amount_due"] = max(due, 0)
    invoice["amount_remaining"] = max(invoice["amount_due"] - invoice["amount_paid"], 0)
    return min(due, 0)


def build_invoice(
    *,
    customer: Obj,
    subscription: Obj | None,
    lines: list[Line],
    billing_reason: str,
    period: tuple[int, int],
    now: int,
    preview: bool = False,
) -> Obj:
    """A draft invoice (not stored) with its lines and amounts."""
    invoice_id = new_id("upcoming_in" if preview else "in")
    total = sum(line.amount for line in lines)
    currency = lines[0].currency if lines else str((subscription or {}).get("currency") or "usd")
    tax_enabled = bool(((subscription or {}).get("automatic_tax") or {}).get("enabled"))
    invoice: Obj = {
        "id": invoice_id,
        "object": "invoice",
        "account_country": "US",
        "account_name": "Stripe sandbox",
        "account_tax_ids": None,
        "amount_due": total,
        "amount_overpaid": 0,
        "amount_paid": 0,
        "amount_remaining": total,
        "amount_shipping": 0,
        "application": None,
        "attempt_count": 0,
        "attempted": False,
        "auto_advance": not preview,
        "automatic_tax": {
            "enabled": tax_enabled,
            "disabled_reason": None,
            "liability": {"type": "self"} if tax_enabled else None,
            "provider": "stripe" if tax_enabled else None,
            "status": "complete" if tax_enabled else None,
        },
        "automatically_finalizes_at": None,
        "billing_reason": billing_reason,
        "collection_method": "charge_automatically",
        "confirmation_secret": None,
        "created": now,
        "currency": currency,
        "custom_fields": None,
        "customer": customer["id"],
        "customer_account": None,
        "customer_address": _customer_address(customer),
        "customer_email": customer.get("email"),
        "customer_name": customer.get("name"),
        "customer_phone": customer.get("phone"),
        "customer_shipping": customer.get("shipping"),
        "customer_tax_exempt": customer.get("tax_exempt", "none"),
        "customer_tax_ids": [],
        "default_payment_method": (subscription or {}).get("default_payment_method"),
        "default_source": None,
        "default_tax_rates": [],
        "description": None,
        "discounts": [],
        "due_date": None,
        "effective_at": None,
        "ending_balance": None,
        "footer": None,
        "from_invoice": None,
        "hosted_invoice_url": None,
        "invoice_pdf": None,
        "issuer": {"type": "self"},
        "last_finalization_error": None,
        "latest_revision": None,
        "lines": {
            "object": "list",
            "data": [render_line(line, invoice_id, preview=preview) for line in lines],
            "has_more": False,
            "total_count": len(lines),
            "url": f"/v1/invoices/{invoice_id}/lines",
        },
        "livemode": False,
        "metadata": {},
        "next_payment_attempt": None,
        "number": None,
        "on_behalf_of": None,
        "parent": None
        if subscription is None
        else {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {
                "metadata": dict(subscription.get("metadata") or {}),
                "subscription": subscription["id"],
            },
        },
        "payment_settings": {
            "default_mandate": None,
            "payment_method_options": None,
            "payment_method_types": None,
        },
        "period_end": period[1],
        "period_start": period[0],
        "post_payment_credit_notes_amount": 0,
        "pre_payment_credit_notes_amount": 0,
        "receipt_number": None,
        "rendering": None,
        "shipping_cost": None,
        "shipping_details": None,
        "starting_balance": 0,
        "statement_descriptor": None,
        "status": "draft",
        "status_transitions": {
            "finalized_at": None,
            "marked_uncollectible_at": None,
            "paid_at": None,
            "voided_at": None,
        },
        # Since 2025-03-31.basil the subscription lives under parent.subscription_details.
        "subscription": None,
        "subtotal": total,
        "subtotal_excluding_tax": total,
        "test_clock": None,
        "total": total,
        "total_discount_amounts": [],
        "total_excluding_tax": total,
        "total_pretax_credit_amounts": [],
        "total_taxes": [],
        "webhooks_delivered_at": None,
    }
    apply_balance(invoice, int(customer.get("balance") or 0))
    return invoice


async def create_invoice(
    tx: Transaction,
    *,
    customer_id: str,
    subscription: Obj | None,
    lines: list[Line],
    billing_reason: str,
    period: tuple[int, int],
    now: int,
    finalize_at: int | None = None,
) -> Obj:
    """Store a draft invoice (emitting `invoice.created`), claiming its pending invoice items."""
    customer = await tx.get("customer", customer_id)
    invoice = build_invoice(
        customer=customer,
        subscription=subscription,
        lines=lines,
        billing_reason=billing_reason,
        period=period,
        now=now,
    )
    invoice["automatically_finalizes_at"] = finalize_at
    return await store_invoice(tx, invoice, lines)


async def store_invoice(tx: Transaction, invoice: Obj, lines: list[Line]) -> Obj:
    """Insert a built invoice, mark its invoice items as invoiced, emit `invoice.created`."""
    await tx.insert(invoice)
    for line in lines:
        if line.invoice_item is not None:
            item = await tx.find(line.invoice_item)
            if item is not None:
                item["invoice"] = invoice["id"]
                await tx.save(item)
    await emit(tx, "invoice.created", invoice)
    return invoice


async def finalize_invoice(tx: Transaction, config: SandboxConfig, invoice: Obj, now: int) -> Obj:
    """Draft -> open: number, hosted URLs, the customer's balance applied; `invoice.finalized`."""
    customer = await tx.get("customer", str(invoice["customer"]))
    sequence = int(customer.get("next_invoice_sequence") or 1)
    invoice["number"] = f"{customer.get('invoice_prefix') or 'SANDBOX'}-{sequence:04d}"
    customer["next_invoice_sequence"] = sequence + 1
    balance = int(customer.get("balance") or 0)
    ending = apply_balance(invoice, balance)
    invoice["ending_balance"] = ending
    customer["balance"] = ending
    await tx.save(customer)
    if ending != balance:
        await emit(tx, "customer.updated", customer, {"balance": balance})
    invoice["status"] = "open"
    invoice["automatically_finalizes_at"] = None
    invoice["effective_at"] = now
    invoice["status_transitions"]["finalized_at"] = now
    invoice["hosted_invoice_url"] = f"{config.base_url}/invoices/{invoice['id']}"
    invoice["invoice_pdf"] = f"{config.base_url}/invoices/{invoice['id']}/pdf"
    await tx.save(invoice)
    await emit(tx, "invoice.finalized", invoice)
    return invoice


def next_retry(invoice: Obj, now: int) -> int | None:
    """When the dunning schedule tries again after a failed attempt (None: retries exhausted)."""
    if subscription_of(invoice) is None:
        return None
    first = int(invoice["status_transitions"].get("finalized_at") or now)
    retries_done = int(invoice["attempt_count"]) - 1
    if retries_done >= len(RETRY_AFTER_DAYS):
        return None
    return max(first + RETRY_AFTER_DAYS[retries_done] * DAY, now + 1)


async def attempt_payment(tx: Transaction, invoice: Obj, now: int, *, succeed: bool | None = None) -> bool:
    """Charge an open invoice; True when it is paid. `succeed` overrides the payment method."""
    if invoice["amount_remaining"] > 0:
        ok = (not await _charge_fails(tx, invoice)) if succeed is None else succeed
        invoice["attempt_count"] = int(invoice["attempt_count"]) + 1
        invoice["attempted"] = True
        if not ok:
            invoice["next_payment_attempt"] = next_retry(invoice, now)
            await tx.save(invoice)
            await emit(tx, "invoice.payment_failed", invoice)
            return False
        invoice["amount_paid"] = int(invoice["amount_paid"]) + int(invoice["amount_remaining"])
        invoice["amount_remaining"] = 0
    invoice["attempted"] = True
    invoice["status"] = "paid"
    invoice["next_payment_attempt"] = None
    invoice["status_transitions"]["paid_at"] = now
    await tx.save(invoice)
    await emit(tx, "invoice.paid", invoice)
    await emit(tx, "invoice.payment_succeeded", invoice)
    return True


async def settle_subscription(
    tx: Transaction, config: SandboxConfig, invoice: Obj, paid: bool, now: int
) -> None:
    """What a payment outcome means for the invoice's subscription (past_due, active, dunning end)."""
    subscription_id = subscription_of(invoice)
    subscription = None if subscription_id is None else await tx.find(subscription_id)
    if subscription is None or subscription.get("object") != "subscription":
        return
    status = subscription["status"]
    if paid:
        if status in ("past_due", "unpaid") and not await _unpaid_invoices(tx, subscription["id"]):
            subscription["status"] = "active"
            await tx.save(subscription)
            await emit(tx, "customer.subscription.updated", subscription, {"status": status})
        return
    if status == "active":
        subscription["status"] = status = "past_due"
        await tx.save(subscription)
        await emit(tx, "customer.subscription.updated", subscription, {"status": "active"})
    if invoice.get("next_payment_attempt") is None and status == "past_due":
        if config.dunning_final_action == "unpaid":
            subscription["status"] = "unpaid"
            await tx.save(subscription)
            await emit(tx, "customer.subscription.updated", subscription, {"status": "past_due"})
        else:
            await cancel_subscription(tx, config, subscription, now, reason="payment_failed")


async def _unpaid_invoices(tx: Transaction, subscription_id: str) -> list[Obj]:
    return await tx.all(
        "invoice",
        lambda inv: (
            inv.get("status") == "open"
            and subscription_of(inv) == subscription_id
            and int(inv.get("amount_remaining") or 0) > 0
        ),
    )


async def finalize_and_charge(
    tx: Transaction, config: SandboxConfig, invoice: Obj, now: int, *, succeed: bool | None = None
) -> bool:
    """Finalize a draft and, unless its subscription is `unpaid`, attempt payment."""
    await finalize_invoice(tx, config, invoice, now)
    subscription_id = subscription_of(invoice)
    subscription = None if subscription_id is None else await tx.find(subscription_id)
    if (
        subscription is not None
        and subscription.get("status") == "unpaid"
        and invoice["amount_remaining"] > 0
    ):
        return False  # Stripe stops attempting payment on an unpaid subscription's invoices
    paid = await attempt_payment(tx, invoice, now, succeed=succeed)
    await settle_subscription(tx, config, invoice, paid, now)
    return paid


async def pay_invoice(tx: Transaction, config: SandboxConfig, invoice: Obj, now: int) -> Obj:
    """`POST /v1/invoices/{id}/pay`: finalize a draft if needed and charge it now."""
    if invoice["status"] == "paid":
        raise StripeError(400, "Invoice is already paid", code="invoice_already_paid")
    if invoice["status"] not in ("draft", "open"):
        raise StripeError(
            400,
            f"You can only pay an invoice that is open, not {invoice['status']}.",
            code="invoice_not_editable",
        )
    if invoice["status"] == "draft":
        await finalize_invoice(tx, config, invoice, now)
    paid = await attempt_payment(tx, invoice, now)
    await settle_subscription(tx, config, invoice, paid, now)
    if not paid:
        raise card_declined()
    return await _reload(tx, invoice)


# Subscriptions: creation ---------------------------------------------------------------------


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
        line = _line_for_price(
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
    subscription["latest_invoice"] = invoice["id"]
    await tx.insert(subscription)
    await emit(tx, "customer.subscription.created", subscription)
    await store_invoice(tx, invoice, lines)
    await finalize_invoice(tx, config, invoice, now)
    await attempt_payment(tx, invoice, now, succeed=True)
    return invoice


# Checkout ------------------------------------------------------------------------------------


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
) -> Obj:
    """The customer submits the Checkout page. `outcome`: "paid" or "declined" (card refused).

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
    invoice = await start_subscription(tx, config, subscription, one_time, now)
    if trial_end is not None and trial_end - TRIAL_WILL_END_NOTICE <= now:
        await notify_trial_will_end(tx, subscription)

    session["status"] = "complete"
    session["payment_status"] = "paid" if invoice["amount_paid"] > 0 else "no_payment_required"
    session["customer"] = customer_id
    session["subscription"] = subscription["id"]
    session["amount_subtotal"] = invoice["subtotal"]
    session["amount_total"] = invoice["total"]
    session["customer_details"] = {
        "address": _customer_address(customer),
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
        "subscription": await _reload(tx, subscription),
        "invoice": await _reload(tx, invoice),
    }


async def expire_checkout(tx: Transaction, session: Obj, now: int) -> Obj:
    if session["status"] != "open":
        raise StripeError(400, 'Only Checkout Sessions with a status in ["open"] can be expired.')
    session["status"] = "expired"
    session["expires_at"] = min(int(session["expires_at"]), now)
    await tx.save(session)
    await emit(tx, "checkout.session.expired", session)
    return session


# Subscriptions: changes ----------------------------------------------------------------------


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
            item["quantity"] = int(spec["quantity"])
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


def check_compatible(prices: list[Obj], param: str, *, billing_mode: str) -> None:
    """One currency always; one interval too in `classic` billing mode (`flexible` mixes them)."""
    intervals = {interval_of(price) for price in prices}
    currencies = {str(price.get("currency")) for price in prices}
    if len(currencies) > 1 or (billing_mode == "classic" and len(intervals) > 1):
        raise parameter_invalid(
            param, "Currency and interval fields must match across all plans on this subscription."
        )


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
        subscription = await _reload(tx, subscription)
        invoice = await _reload(tx, invoice)
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


async def final_invoice(
    tx: Transaction, subscription: Obj, at: int, *, finalize_at: int | None
) -> Obj | None:
    """The draft invoice of a subscription ending at `at`: its pending invoice items and the
    metered usage of the unfinished period (None when there is nothing to bill)."""
    customer_id = str(subscription["customer"])
    lines = await pending_lines(tx, subscription["id"])
    lines += [
        await usage_line(tx, item, customer_id, (item_period(item)[0], at))
        for item in items_of(subscription)
        if is_metered(item["price"])
    ]
    if not lines:
        return None
    invoice = await create_invoice(
        tx,
        customer_id=customer_id,
        subscription=subscription,
        lines=lines,
        billing_reason="subscription_cycle",
        period=(min(item_period(item)[0] for item in items_of(subscription)), at),
        now=at,
        finalize_at=finalize_at,
    )
    subscription["latest_invoice"] = invoice["id"]
    await tx.save(subscription)
    return invoice


async def cancel_subscription(
    tx: Transaction,
    config: SandboxConfig,
    subscription: Obj,
    now: int,
    *,
    reason: str = "cancellation_requested",
    invoice_now: bool = False,
    prorate: bool = False,
    details: Obj | None = None,
) -> Obj:
    """End a subscription now: `customer.subscription.deleted` (and its schedule canceled)."""
    subscription = await _reload(tx, subscription)
    if subscription["status"] == "canceled":
        return subscription
    customer_id = str(subscription["customer"])
    billed = subscription["status"] in BILLED_STATUSES
    if prorate and billed:
        for item in items_of(subscription):
            if not is_metered(item["price"]):
                line = await proration_line(tx, item, item_period(item), now, credit=True)
                if line.amount:
                    await create_invoice_item(tx, customer_id, line, now)
    if invoice_now and billed:
        invoice = await final_invoice(tx, subscription, now, finalize_at=None)
        if invoice is not None:
            await finalize_invoice(tx, config, invoice, now)
            await attempt_payment(tx, invoice, now)
            subscription = await _reload(tx, subscription)
    subscription["status"] = "canceled"
    subscription["canceled_at"] = subscription.get("canceled_at") or now
    subscription["ended_at"] = now
    subscription["cancel_at"] = (
        subscription.get("cancel_at") if subscription.get("cancel_at") == now else None
    )
    subscription["cancellation_details"] = {
        "comment": (details or {}).get("comment")
        or (subscription.get("cancellation_details") or {}).get("comment"),
        "feedback": (details or {}).get("feedback")
        or (subscription.get("cancellation_details") or {}).get("feedback"),
        "reason": reason,
    }
    await tx.save(subscription)
    schedule_id = subscription.get("schedule")
    if schedule_id:
        schedule = await tx.find(str(schedule_id))
        if schedule is not None and schedule["status"] in ("active", "not_started"):
            schedule["status"] = "canceled"
            schedule["canceled_at"] = now
            schedule["current_phase"] = None
            await tx.save(schedule)
            await emit(tx, "subscription_schedule.canceled", schedule)
    await emit(tx, "customer.subscription.deleted", subscription)
    return subscription


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
    return await _reload(tx, subscription)


# Subscriptions: the passage of time ----------------------------------------------------------


async def renew(tx: Transaction, config: SandboxConfig, subscription: Obj, at: int) -> None:
    """The items whose period ends at `at` renew: new periods on their own intervals, and one draft
    renewal invoice for them (usage in arrears, licensed prices ahead) finalized an hour later.
    Items of a longer interval (an annual plan beside a monthly metered item) are not billed."""
    due = [item for item in items_of(subscription) if int(item["current_period_end"]) <= at]
    start = min(item_period(item)[0] for item in due)
    previous: Obj = {
        "items": copy.deepcopy(subscription["items"]),
        "latest_invoice": subscription["latest_invoice"],
    }
    anchor = int(subscription["billing_cycle_anchor"])
    customer_id = str(subscription["customer"])
    lines = await pending_lines(tx, subscription["id"])
    for item in due:
        if is_metered(item["price"]):
            lines.append(await usage_line(tx, item, customer_id, item_period(item)))
    for item in due:
        interval, count = interval_of(item["price"])
        end = int(item["current_period_end"])
        item["current_period_start"], item["current_period_end"] = (
            end,
            next_boundary(anchor, interval, count, end),
        )
    for item in due:
        if not is_metered(item["price"]):
            lines.append(await period_line(tx, item, item_period(item)))
    invoice = await create_invoice(
        tx,
        customer_id=customer_id,
        subscription=subscription,
        lines=lines,
        billing_reason="subscription_cycle",
        period=(start, at),
        now=at,
        finalize_at=at + FINALIZE_DELAY,
    )
    subscription["latest_invoice"] = invoice["id"]
    await tx.save(subscription)
    await emit(tx, "customer.subscription.updated", subscription, previous)


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


def _trial_notice_key(subscription_id: str) -> str:
    return f"trial_will_end:{subscription_id}"


async def notify_trial_will_end(tx: Transaction, subscription: Obj) -> None:
    await tx.set_state(_trial_notice_key(subscription["id"]), str(subscription["trial_end"]))
    await emit(tx, "customer.subscription.trial_will_end", subscription)


# Schedules -----------------------------------------------------------------------------------


def schedule_items_as_params(subscription: Obj, phase: Obj) -> list[Obj]:
    """`items[]` parameters that turn the subscription's items into the phase's."""
    wanted = [dict(item) for item in phase["items"]]
    current = list(items_of(subscription))
    specs: list[Obj] = []
    for item in list(current):
        match = next((w for w in wanted if w["price"] == item["price"]["id"]), None)
        if match is not None:
            wanted.remove(match)
            current.remove(item)
            spec: Obj = {"id": item["id"]}
            if match.get("quantity") is not None and not is_metered(item["price"]):
                spec["quantity"] = match["quantity"]
            specs.append(spec)
    for item, want in zip(list(current), list(wanted), strict=False):
        spec = {"id": item["id"], "price": want["price"]}
        if want.get("quantity") is not None:
            spec["quantity"] = want["quantity"]
        specs.append(spec)
        current.remove(item)
        wanted.remove(want)
    specs += [{"id": item["id"], "deleted": True} for item in current]
    for want in wanted:
        spec = {"price": want["price"]}
        if want.get("quantity") is not None:
            spec["quantity"] = want["quantity"]
        specs.append(spec)
    return specs


async def apply_phase(
    tx: Transaction, config: SandboxConfig, schedule: Obj, phase: Obj, now: int
) -> Obj | None:
    """Make the schedule's subscription match `phase` (prorating per the phase's behaviour)."""
    subscription = await tx.find(str(schedule.get("subscription")))
    if subscription is None or subscription["status"] == "canceled":
        return None
    specs = schedule_items_as_params(subscription, phase)
    items = await resolve_items(tx, subscription, specs, now, param="phases")
    change = await plan_change(
        tx,
        subscription,
        items,
        proration_behavior=str(phase.get("proration_behavior") or "create_prorations"),
        now=now,
    )
    if not change.reset_anchor and not items_differ(items_of(subscription), change.items):
        return subscription
    subscription, previous, _invoice = await apply_change(tx, config, subscription, change)
    await emit(tx, "customer.subscription.updated", subscription, previous)
    return subscription


async def advance_schedule(tx: Transaction, config: SandboxConfig, schedule: Obj, at: int) -> None:
    """The current phase ends at `at`: start the next one, or end the schedule."""
    phases = schedule["phases"]
    index = next(
        (i for i, phase in enumerate(phases) if int(phase["start_date"]) <= at < int(phase["end_date"])),
        None,
    )
    if index is not None:
        previous = {"current_phase": copy.deepcopy(schedule["current_phase"])}
        phase = phases[index]
        schedule["current_phase"] = {"start_date": phase["start_date"], "end_date": phase["end_date"]}
        await tx.save(schedule)
        await apply_phase(tx, config, schedule, phase, at)
        await emit(tx, "subscription_schedule.updated", schedule, previous)
        return
    subscription_id = schedule.get("subscription")
    subscription = None if subscription_id is None else await tx.find(str(subscription_id))
    if schedule["end_behavior"] == "cancel" and subscription is not None:
        schedule["status"] = "completed"
        schedule["completed_at"] = at
        schedule["current_phase"] = None
        await tx.save(schedule)
        await cancel_subscription(tx, config, subscription, at)
        await emit(tx, "subscription_schedule.completed", schedule)
        return
    await release_schedule(tx, schedule, at)


async def release_schedule(tx: Transaction, schedule: Obj, now: int) -> Obj:
    if schedule["status"] not in ("not_started", "active"):
        raise StripeError(
            400,
            "You cannot release a subscription schedule that is currently in the "
            f"`{schedule['status']}` status.",
        )
    subscription_id = schedule.get("subscription")
    schedule["status"] = "released"
    schedule["released_at"] = now
    schedule["released_subscription"] = subscription_id
    schedule["subscription"] = None
    schedule["current_phase"] = None
    await tx.save(schedule)
    if subscription_id:
        subscription = await tx.find(str(subscription_id))
        if subscription is not None and subscription.get("schedule") == schedule["id"]:
            subscription["schedule"] = None
            await tx.save(subscription)
            await emit(tx, "customer.subscription.updated", subscription, {"schedule": schedule["id"]})
    await emit(tx, "subscription_schedule.released", schedule)
    return schedule


# The clock -----------------------------------------------------------------------------------

# Order of things due at the same second.
_PRIORITY = {
    "checkout_expiry": 0,
    "schedule_phase": 1,
    "trial_will_end": 2,
    "trial_end": 3,
    "cancel_at": 4,
    "renewal": 5,
    "finalize": 6,
    "retry": 7,
}


@dataclass(order=True)
class Due:
    at: int
    priority: int
    kind: str = field(compare=False)
    object_id: str = field(compare=True)


async def _due(tx: Transaction, until: int) -> list[Due]:
    """Everything Stripe would do on its own by `until`, in no particular order."""
    due: list[Due] = []

    def add(at: int, kind: str, object_id: str) -> None:
        if at <= until:
            due.append(Due(at, _PRIORITY[kind], kind, object_id))

    for session in await tx.all("checkout.session", lambda s: s.get("status") == "open"):
        add(int(session["expires_at"]), "checkout_expiry", session["id"])
    for schedule in await tx.all("subscription_schedule", lambda s: s.get("status") == "active"):
        if schedule.get("current_phase"):
            add(int(schedule["current_phase"]["end_date"]), "schedule_phase", schedule["id"])
    for subscription in await tx.all("subscription", lambda s: s.get("status") in LIVE_STATUSES):
        status = subscription["status"]
        if status == "trialing" and subscription.get("trial_end"):
            trial_end = int(subscription["trial_end"])
            notified = await tx.get_state(_trial_notice_key(subscription["id"]), "")
            if notified != str(trial_end):
                notice = max(trial_end - TRIAL_WILL_END_NOTICE, int(subscription.get("trial_start") or 0))
                add(min(notice, trial_end), "trial_will_end", subscription["id"])
            add(trial_end, "trial_end", subscription["id"])
            continue
        if status not in BILLED_STATUSES:
            continue
        end = period_of(subscription)[1]
        cancel_at = subscription.get("cancel_at")
        if cancel_at is not None and int(cancel_at) <= end:
            add(int(cancel_at), "cancel_at", subscription["id"])
        else:
            add(end, "renewal", subscription["id"])
    for invoice in await tx.all("invoice", lambda i: i.get("status") in ("draft", "open")):
        if invoice["status"] == "draft" and invoice.get("automatically_finalizes_at"):
            add(int(invoice["automatically_finalizes_at"]), "finalize", invoice["id"])
        elif invoice["status"] == "open" and invoice.get("next_payment_attempt"):
            add(int(invoice["next_payment_attempt"]), "retry", invoice["id"])
    return due


async def _perform(tx: Transaction, config: SandboxConfig, due: Due) -> None:
    at = due.at
    obj = await tx.find(due.object_id)
    if obj is None:
        return
    if due.kind == "checkout_expiry":
        await expire_checkout(tx, obj, at)
    elif due.kind == "schedule_phase":
        await advance_schedule(tx, config, obj, at)
    elif due.kind == "trial_will_end":
        await notify_trial_will_end(tx, obj)
    elif due.kind == "trial_end":
        await end_trial(tx, config, obj, at)
    elif due.kind == "cancel_at":
        await _cancel_at_period_end(tx, config, obj, at)
    elif due.kind == "renewal":
        await renew(tx, config, obj, at)
    elif due.kind == "finalize":
        await finalize_and_charge(tx, config, obj, at)
    elif due.kind == "retry":
        paid = await attempt_payment(tx, obj, at)
        await settle_subscription(tx, config, obj, paid, at)


async def _cancel_at_period_end(tx: Transaction, config: SandboxConfig, subscription: Obj, at: int) -> None:
    """A subscription set to cancel ends; metered usage and pending items get a final invoice."""
    await final_invoice(tx, subscription, at, finalize_at=at + FINALIZE_DELAY)
    await cancel_subscription(tx, config, subscription, at, reason="cancellation_requested")


async def advance_clock(tx: Transaction, config: SandboxConfig, seconds: int) -> Obj:
    """Move the sandbox clock forward and do, in time order, what Stripe would meanwhile.

    Returns {"now", "advanced_by", "events": [{"id", "type", "created"}...]}.
    """
    if seconds < 0:
        raise parameter_invalid("seconds", "The sandbox clock only moves forward.")
    start = tx.now()
    target = start + seconds
    offset = tx.clock_offset
    first_event = len(tx.emitted)
    steps = 0
    while True:
        pending = await _due(tx, target)
        if not pending:
            break
        step = min(pending)
        with tx.at(max(step.at, start)):  # events carry the time they happened at
            await _perform(tx, config, step)
        steps += 1
        if steps > MAX_CLOCK_STEPS:
            raise StripeError(500, "The sandbox clock did not settle.", type="api_error")
    tx.clock_offset = offset + seconds
    await tx.set_state("clock_offset", str(tx.clock_offset))
    return {
        "now": tx.now(),
        "advanced_by": seconds,
        "events": [
            {"id": event["id"], "type": event["type"], "created": event["created"]}
            for event in tx.emitted[first_event:]
        ],
    }
