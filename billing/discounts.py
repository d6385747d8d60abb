"""A subscription's discount terms, as the ledger tracks them and MRR applies them.

The sync lists subscriptions with `expand[]=data.discounts.source.coupon`, so each discount is a
Discount object whose coupon carries the terms: `percent_off`, or `amount_off` in a `currency`,
for a `duration` (`once`, `repeating`, `forever`), and the discount's own `end` (set for a
`repeating` coupon only). A discount Stripe reports only by its id (not expanded) has no terms.

MRR follows ChartMogul's invoice-based rule: a discount reduces MRR for the service periods of
the invoices it discounts. So it stops at `mrr_end`, the billing boundary of the first invoice it
no longer reduces: for `repeating`, the first boundary at or after its `end` (an invoice made
before the end is discounted for its whole period); for `once`, the end of the first paid period
(after a trial, if any); `forever` never stops.
"""

from __future__ import annotations

from calendar import monthrange
from collections.abc import Mapping, Sequence
from datetime import datetime
from fractions import Fraction
from typing import Any

from billing.stripe_objects import field as get
from billing.stripe_objects import object_id, stripe_time

# The subscriptions list call's expansion: the discounts and their coupons (4 levels, Stripe's most).
EXPAND = ["data.discounts.source.coupon"]


def discount_terms(subscription: Any) -> tuple[dict[str, Any], ...]:
    """The subscription's discounts as plain JSON, sorted by id."""
    found: list[dict[str, Any]] = []
    for discount in get(subscription, "discounts") or []:
        discount_id = object_id(discount)
        if not discount_id:
            continue
        if isinstance(discount, str):
            found.append({"id": discount_id})
            continue
        coupon = get(get(discount, "source"), "coupon")
        end = stripe_time(get(discount, "end"))
        stops = _mrr_end(subscription, get(coupon, "duration"), end, stripe_time(get(discount, "start")))
        percent = get(coupon, "percent_off")
        found.append(
            {
                "id": discount_id,
                "coupon": object_id(coupon),
                "promotion_code": object_id(get(discount, "promotion_code")),
                "percent_off": None if percent is None else float(percent),
                "amount_off": get(coupon, "amount_off"),
                "currency": get(coupon, "currency"),
                "duration": get(coupon, "duration"),
                "end": None if end is None else end.isoformat(),
                "mrr_end": None if stops is None else stops.isoformat(),
            }
        )
    return tuple(sorted(found, key=lambda terms: str(terms["id"])))


def _mrr_end(
    subscription: Any, duration: Any, end: datetime | None, start: datetime | None
) -> datetime | None:
    """The first billing boundary whose invoice the discount no longer reduces (None: never)."""
    anchor = stripe_time(get(subscription, "billing_cycle_anchor"))
    recurring = next(
        (
            found
            for item in get(get(subscription, "items"), "data") or []
            if get(found := get(get(item, "price"), "recurring"), "usage_type") != "metered"
        ),
        None,
    )
    if anchor is None or recurring is None or get(recurring, "interval") not in ("month", "year"):
        return end if duration == "repeating" else None
    months = int(get(recurring, "interval_count") or 1) * (12 if get(recurring, "interval") == "year" else 1)
    if duration == "repeating" and end is not None:
        return _boundary(anchor, months, lambda moment: moment >= end)
    if duration == "once" and start is not None:
        paid_from = max(start, stripe_time(get(subscription, "trial_end")) or start)
        return _boundary(anchor, months, lambda moment: moment > paid_from)
    return None


def _boundary(anchor: datetime, months: int, wanted: Any) -> datetime:
    """The first of `anchor` + n x `months` (n >= 0; Stripe's day clamped to the month) that is `wanted`."""
    n = 0
    while True:
        total = anchor.month - 1 + n * months
        year, month = anchor.year + total // 12, total % 12 + 1
        moment = anchor.replace(year=year, month=month, day=min(anchor.day, monthrange(year, month)[1]))
        if wanted(moment):
            return moment
        n += 1


def stops_at(terms: Mapping[str, Any]) -> datetime | None:
    """When the discount stops reducing MRR (`mrr_end`, else Stripe's `end`); None: never."""
    found = terms.get("mrr_end") or terms.get("end")
    return None if not found else datetime.fromisoformat(str(found))


def discount_ends(discounts: Sequence[Any]) -> list[datetime]:
    """When the discounts of a state that stop reducing MRR do."""
    return sorted(
        found for terms in discounts if isinstance(terms, Mapping) and (found := stops_at(terms)) is not None
    )


def discounted(
    gross: Fraction, discounts: Sequence[Any], currency: str | None, at: datetime | None
) -> Fraction:
    """`gross` net of the discounts live at `at` (before `stops_at`, not at it).

    `percent_off` first, then `amount_off` (in the price's currency only), never below 0; a
    discount known only by its id is not applied.
    """
    live = [
        terms
        for terms in discounts
        if isinstance(terms, Mapping) and (at is None or (stops := stops_at(terms)) is None or at < stops)
    ]
    net = gross
    for terms in live:
        if terms.get("percent_off") is not None:
            net -= net * Fraction(str(terms["percent_off"])) / 100
    for terms in live:
        if terms.get("amount_off") is not None and terms.get("currency") in (None, currency):
            net -= int(terms["amount_off"])
    return max(net, Fraction(0))
