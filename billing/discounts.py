"""A subscription's discount terms, as the ledger tracks them and MRR applies them.

The sync lists subscriptions with `expand[]=data.discounts.source.coupon`, so each discount is a
Discount object whose coupon carries the terms: `percent_off`, or `amount_off` in a `currency`,
for a `duration` (`once`, `repeating`, `forever`), and the discount's own `end` (set for a
`repeating` coupon only). A discount Stripe reports only by its id (not expanded) has no terms.
"""

from __future__ import annotations

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
            }
        )
    return tuple(sorted(found, key=lambda terms: str(terms["id"])))


def discount_ends(discounts: Sequence[Any]) -> list[datetime]:
    """When the discounts that have an end (repeating coupons) stop discounting."""
    return sorted(
        datetime.fromisoformat(str(terms["end"]))
        for terms in discounts
        if isinstance(terms, Mapping) and terms.get("end")
    )


def discounted(
    gross: Fraction, discounts: Sequence[Any], currency: str | None, at: datetime | None
) -> Fraction:
    """`gross` net of the discounts live at `at` (a discount applies before its `end`, not at it).

    `percent_off` first, then `amount_off` (in the price's currency only), never below 0; a
    discount known only by its id is not applied.
    """
    live = [
        terms
        for terms in discounts
        if isinstance(terms, Mapping)
        and (at is None or not terms.get("end") or at < datetime.fromisoformat(str(terms["end"])))
    ]
    net = gross
    for terms in live:
        if terms.get("percent_off") is not None:
            net -= net * Fraction(str(terms["percent_off"])) / 100
    for terms in live:
        if terms.get("amount_off") is not None and terms.get("currency") in (None, currency):
            net -= int(terms["amount_off"])
    return max(net, Fraction(0))
