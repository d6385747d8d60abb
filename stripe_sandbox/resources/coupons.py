"""Coupons and promotion codes: create, retrieve, list (and delete a coupon).

A coupon is `percent_off`, or `amount_off` with a `currency`, for a `duration` of `once`,
`repeating` (`duration_in_months`) or `forever`. A promotion code is a customer-facing code for
a coupon (`promotion: {type: coupon, coupon}`). Applying them is `engine.discounts`.
"""

from __future__ import annotations

from typing import Any

from stripe.params import (
    CouponCreateParams,
    CouponDeleteParams,
    CouponListParams,
    CouponRetrieveParams,
    PromotionCodeCreateParams,
    PromotionCodeListParams,
    PromotionCodeRetrieveParams,
)

from stripe_sandbox.api import Call, created_filter, endpoint, paginate
from stripe_sandbox.errors import StripeError, parameter_invalid, parameter_missing, unsupported
from stripe_sandbox.store import new_id


@endpoint("POST", "/v1/coupons", CouponCreateParams)
async def create_coupon(call: Call) -> dict[str, Any]:
    params = call.params
    for key in ("applies_to", "currency_options"):
        if key in params:
            raise unsupported(key)
    percent, amount = params.get("percent_off"), params.get("amount_off")
    if (percent is None) == (amount is None):
        raise parameter_invalid("percent_off", "You must specify either percent_off or amount_off.")
    if percent is not None and not 0 < float(percent) <= 100:
        raise parameter_invalid("percent_off", "percent_off must be greater than 0 and at most 100.")
    if amount is not None and "currency" not in params:
        raise parameter_missing("currency")
    duration = params.get("duration", "once")
    if duration not in ("once", "repeating", "forever"):
        raise parameter_invalid("duration", "duration must be one of once, repeating, forever.")
    months = params.get("duration_in_months")
    if (duration == "repeating") != (months is not None):
        raise parameter_invalid(
            "duration_in_months", "duration_in_months is required with, and only with, duration=repeating."
        )
    coupon_id = str(params.get("id") or new_id("co")[3:11])
    if await call.tx.find(coupon_id) is not None:
        raise StripeError(400, "Coupon already exists.", code="resource_already_exists", param="id")
    coupon = {
        "id": coupon_id,
        "object": "coupon",
        "amount_off": None if amount is None else int(amount),
        "created": call.tx.now(),
        "currency": None if amount is None else str(params["currency"]).lower(),
        "duration": duration,
        "duration_in_months": None if months is None else int(months),
        "livemode": False,
        "max_redemptions": params.get("max_redemptions"),
        "metadata": dict(params.get("metadata") or {}),
        "name": params.get("name"),
        "percent_off": None if percent is None else float(percent),
        "redeem_by": params.get("redeem_by"),
        "times_redeemed": 0,
        "valid": True,
    }
    await call.tx.insert(coupon)
    return coupon


@endpoint("GET", "/v1/coupons/{id}", CouponRetrieveParams)
async def retrieve_coupon(call: Call) -> dict[str, Any]:
    return await call.tx.get("coupon", call.path["id"])


@endpoint("GET", "/v1/coupons", CouponListParams)
async def list_coupons(call: Call) -> dict[str, Any]:
    return paginate(await call.tx.all("coupon", created_filter(call.params)), call.params, call.url)


@endpoint("DELETE", "/v1/coupons/{id}", CouponDeleteParams)
async def delete_coupon(call: Call) -> dict[str, Any]:
    """Deleting a coupon stops new redemptions; discounts already made keep applying (Stripe)."""
    coupon = await call.tx.get("coupon", call.path["id"])
    coupon["valid"] = False
    await call.tx.save(coupon)
    return {"id": coupon["id"], "object": "coupon", "deleted": True}


@endpoint("POST", "/v1/promotion_codes", PromotionCodeCreateParams)
async def create_promotion_code(call: Call) -> dict[str, Any]:
    params = call.params
    promotion = params.get("promotion") or {}
    if promotion.get("type") != "coupon" or not promotion.get("coupon"):
        raise parameter_missing("promotion[coupon]")
    for key in ("customer", "customer_account", "restrictions"):
        if key in params:
            raise unsupported(key)
    coupon = await call.tx.find(str(promotion["coupon"]))
    if coupon is None or coupon.get("object") != "coupon":
        raise StripeError(
            400,
            f"No such coupon: '{promotion['coupon']}'",
            code="resource_missing",
            param="promotion[coupon]",
        )
    code = str(params.get("code") or new_id("PROMO")[6:14].upper())
    taken = await call.tx.all("promotion_code", lambda found: found["code"].lower() == code.lower())
    if any(found["active"] for found in taken):
        raise parameter_invalid("code", f"An active promotion code with `code: {code}` already exists.")
    promotion_code: dict[str, Any] = {
        "id": new_id("promo"),
        "object": "promotion_code",
        "active": bool(params.get("active", True)),
        "code": code,
        "created": call.tx.now(),
        "customer": None,
        "customer_account": None,
        "expires_at": params.get("expires_at"),
        "livemode": False,
        "max_redemptions": params.get("max_redemptions"),
        "metadata": dict(params.get("metadata") or {}),
        "promotion": {"coupon": coupon["id"], "type": "coupon"},
        "restrictions": {
            "currency_options": {},
            "first_time_transaction": False,
            "minimum_amount": None,
            "minimum_amount_currency": None,
        },
        "times_redeemed": 0,
    }
    await call.tx.insert(promotion_code)
    return promotion_code


@endpoint("GET", "/v1/promotion_codes/{id}", PromotionCodeRetrieveParams)
async def retrieve_promotion_code(call: Call) -> dict[str, Any]:
    return await call.tx.get("promotion_code", call.path["id"])


@endpoint("GET", "/v1/promotion_codes", PromotionCodeListParams)
async def list_promotion_codes(call: Call) -> dict[str, Any]:
    params = call.params
    in_range = created_filter(params)

    def wanted(found: dict[str, Any]) -> bool:
        return (
            in_range(found)
            and params.get("code") in (None, found["code"])
            and params.get("coupon") in (None, found["promotion"]["coupon"])
            and params.get("active") in (None, found["active"])
        )

    return paginate(await call.tx.all("promotion_code", wanted), params, call.url)
