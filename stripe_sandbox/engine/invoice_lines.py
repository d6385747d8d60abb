"""Invoice lines (a period's price, metered usage, proration) and pending invoice items."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from stripe_sandbox.engine.payments import emit
from stripe_sandbox.engine.periods import (
    Obj,
    format_amount,
    interval_of,
    licensed_amount,
    price_amount,
    product_id,
    product_name,
    prorated,
    unit_amount,
)
from stripe_sandbox.resources.meters import metered_quantity
from stripe_sandbox.store import Transaction, new_id

TIMES = "\u00d7"  # the multiplication sign of Stripe's line descriptions ("2 x Pro")


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


def line_for_price(
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


def _interval_label(price: Obj) -> str:
    recurring = price.get("recurring")
    if not recurring:
        return ""
    interval, count = interval_of(price)
    return f" / {interval}" if count == 1 else f" / every {count} {interval}s"


def _date_label(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%d %b %Y")


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
    return line_for_price(
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
    return line_for_price(
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
    return line_for_price(
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
