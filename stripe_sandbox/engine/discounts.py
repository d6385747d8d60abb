"""Discounts: a coupon (or a promotion code's coupon) applied to a subscription and its invoices.

A discount is its own object (`di_...`): `source.coupon`, `promotion_code`, `start`, and `end`
(`start` + `duration_in_months` for a `repeating` coupon; null for `once` and `forever`, as on
Stripe). Each invoice of the subscription applies it to its discountable lines (not prorations):
`percent_off` line by line, `amount_off` once per invoice, spread over the lines. A `repeating`
discount is removed by the first invoice made at or after its `end`; a `once` discount by the
invoice after the first one it reduced. Removing emits `customer.discount.deleted`; the caller
saves the subscription and emits its `customer.subscription.updated`.
"""

from __future__ import annotations

from stripe_sandbox.engine.invoice_lines import Line
from stripe_sandbox.engine.payments import emit
from stripe_sandbox.engine.periods import Obj, add_intervals
from stripe_sandbox.errors import StripeError, parameter_invalid
from stripe_sandbox.store import Transaction, new_id


def _used_key(discount_id: str) -> str:
    return f"discount_used:{discount_id}"


async def resolve(tx: Transaction, specs: list[Obj], param: str) -> list[tuple[Obj, Obj | None]]:
    """`discounts=[{coupon} | {promotion_code}]` as (coupon, promotion code); at most one."""
    if len(specs) > 1:
        raise parameter_invalid(param, "Only one discount may be specified.")
    found: list[tuple[Obj, Obj | None]] = []
    for index, spec in enumerate(specs):
        name = f"{param}[{index}]"
        if spec.get("coupon") and spec.get("promotion_code"):
            raise parameter_invalid(name, "You may only specify one of: coupon, promotion_code.")
        if spec.get("promotion_code"):
            code = await _referenced(
                tx, "promotion_code", str(spec["promotion_code"]), f"{name}[promotion_code]"
            )
            check_promotion_code(code, tx.now())
            coupon = await tx.get("coupon", str(code["promotion"]["coupon"]))
            found.append((_check_coupon(coupon, tx.now(), f"{name}[promotion_code]"), code))
        elif spec.get("coupon"):
            coupon = await _referenced(tx, "coupon", str(spec["coupon"]), f"{name}[coupon]")
            found.append((_check_coupon(coupon, tx.now(), f"{name}[coupon]"), None))
        else:
            raise parameter_invalid(name, "A discount needs a coupon or a promotion_code.")
    return found


async def _referenced(tx: Transaction, object_type: str, object_id: str, param: str) -> Obj:
    found = await tx.find(object_id)
    if found is None or found.get("object") != object_type or found.get("deleted"):
        raise StripeError(
            400,
            f"No such {object_type.replace('_', ' ')}: '{object_id}'",
            code="resource_missing",
            param=param,
        )
    return found


def check_promotion_code(code: Obj, now: int) -> None:
    usable = (
        code.get("active")
        and (code.get("expires_at") is None or now < int(code["expires_at"]))
        and (code.get("max_redemptions") is None or code["times_redeemed"] < code["max_redemptions"])
    )
    if not usable:
        raise StripeError(
            400, f"This promotion code cannot be redeemed: {code['code']}.", param="promotion_code"
        )


def _check_coupon(coupon: Obj, now: int, param: str) -> Obj:
    redeem_by = coupon.get("redeem_by")
    limit = coupon.get("max_redemptions")
    if (redeem_by is not None and now >= int(redeem_by)) or (
        limit is not None and int(coupon["times_redeemed"]) >= int(limit)
    ):
        coupon["valid"] = False
    if not coupon.get("valid", True):
        raise StripeError(400, f"Coupon is not valid: {coupon['id']}.", param=param)
    return coupon


async def attach(
    tx: Transaction, subscription: Obj, resolved: list[tuple[Obj, Obj | None]], now: int
) -> list[Obj]:
    """Create the discounts of a new subscription (`customer.discount.created` each), redeeming
    their coupons and promotion codes; sets `subscription["discounts"]`."""
    made: list[Obj] = []
    for coupon, code in resolved:
        end = None
        if coupon.get("duration") == "repeating":
            end = add_intervals(now, "month", 1, int(coupon.get("duration_in_months") or 1))
        discount: Obj = {
            "id": new_id("di"),
            "object": "discount",
            "checkout_session": None,
            "customer": subscription["customer"],
            "customer_account": None,
            "end": end,
            "invoice": None,
            "invoice_item": None,
            "promotion_code": None if code is None else code["id"],
            "source": {"coupon": coupon["id"], "type": "coupon"},
            "start": now,
            "subscription": subscription["id"],
            "subscription_item": None,
        }
        await tx.insert(discount)
        coupon["times_redeemed"] = int(coupon.get("times_redeemed") or 0) + 1
        await tx.save(coupon)
        if code is not None:
            code["times_redeemed"] = int(code.get("times_redeemed") or 0) + 1
            await tx.save(code)
        await emit(tx, "customer.discount.created", discount)
        made.append(discount)
    subscription["discounts"] = [discount["id"] for discount in made]
    return made


async def apply_to_invoice(
    tx: Transaction, invoice: Obj, lines: list[Line], subscription: Obj | None
) -> None:
    """Apply the subscription's live discounts to a draft invoice (built, not yet stored): each
    discountable line's `discount_amounts`, the invoice's `discounts`, `total_discount_amounts`,
    `total` and `amount_due`. Ended discounts are removed from `subscription` first."""
    if subscription is None or not subscription.get("discounts"):
        return
    now = int(invoice["created"])
    live: list[tuple[Obj, Obj]] = []
    for discount_id in list(subscription["discounts"]):
        discount = await tx.find(str(discount_id))
        if discount is None:
            continue
        coupon = await tx.get("coupon", str(discount["source"]["coupon"]))
        ended = discount.get("end") is not None and now >= int(discount["end"])
        used_once = (
            coupon.get("duration") == "once" and await tx.get_state(_used_key(discount["id"]), "") == "1"
        )
        if ended or used_once:
            subscription["discounts"] = [d for d in subscription["discounts"] if d != discount_id]
            await emit(tx, "customer.discount.deleted", discount)
            continue
        live.append((discount, coupon))
    rendered = invoice["lines"]["data"]
    totals: dict[str, int] = {}
    for discount, coupon in live:
        amounts = _line_discounts(coupon, [line.amount if not line.proration else 0 for line in lines])
        for shown, amount in zip(rendered, amounts, strict=True):
            if shown["discountable"]:
                shown["discount_amounts"].append({"amount": amount, "discount": discount["id"]})
                shown["discounts"].append(discount["id"])
        totals[discount["id"]] = sum(amounts)
        if coupon.get("duration") == "once" and sum(amounts) > 0:
            await tx.set_state(_used_key(discount["id"]), "1")
    if not live:
        return
    off = sum(totals.values())
    invoice["discounts"] = [discount["id"] for discount, _ in live]
    invoice["total_discount_amounts"] = [
        {"amount": amount, "discount": key} for key, amount in totals.items()
    ]
    invoice["total"] = invoice["total_excluding_tax"] = int(invoice["subtotal"]) - off
    due = int(invoice["total"]) + int(invoice.get("starting_balance") or 0)
    invoice["amount_due"] = max(due, 0)
    invoice["amount_remaining"] = max(invoice["amount_due"] - int(invoice["amount_paid"]), 0)


def _line_discounts(coupon: Obj, amounts: list[int]) -> list[int]:
    """Each line's share of the coupon: `percent_off` of each, or `amount_off` spread pro rata."""
    positive = [max(amount, 0) for amount in amounts]
    if coupon.get("percent_off") is not None:
        return [round(amount * float(coupon["percent_off"]) / 100) for amount in positive]
    total = sum(positive)
    off = min(int(coupon.get("amount_off") or 0), total)
    if total == 0:
        return [0 for _ in amounts]
    shares = [off * amount // total for amount in positive]
    rest = off - sum(shares)
    for index, amount in enumerate(positive):  # the cents left go to the first lines with an amount
        if rest == 0:
            break
        if amount > shares[index]:
            shares[index] += 1
            rest -= 1
    return shares


def describe(coupon: Obj) -> str:
    if coupon.get("percent_off") is not None:
        return f"{coupon['percent_off']:g}% off"
    return f"{int(coupon.get('amount_off') or 0) / 100:.2f} {str(coupon.get('currency') or '').upper()} off"


__all__ = ["apply_to_invoice", "attach", "check_promotion_code", "describe", "resolve"]
