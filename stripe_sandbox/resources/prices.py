"""Prices: create, retrieve, update, list, search.

As in Stripe, a price's amount, currency and recurrence never change after creation (the update
parameters do not include them); lookup keys are unique among all prices, archived ones
included, and move between prices only with `transfer_lookup_key=true`. `tiers` and
`currency_options` are stored but, as Stripe's includable fields, only returned when expanded.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from stripe.params import (
    PriceCreateParams,
    PriceListParams,
    PriceRetrieveParams,
    PriceSearchParams,
    PriceUpdateParams,
)

from stripe_sandbox.api import (
    Call,
    apply_metadata,
    created_filter,
    endpoint,
    paginate,
    search_matcher,
    search_result,
)
from stripe_sandbox.errors import StripeError, parameter_invalid, parameter_missing
from stripe_sandbox.resources.products import new_product, referenced
from stripe_sandbox.store import Transaction, new_id

# The longest interval Stripe allows: three years.
MAX_INTERVAL_COUNT = {"day": 1095, "week": 156, "month": 36, "year": 3}
TAX_BEHAVIORS = ("exclusive", "inclusive", "unspecified")
MAX_LOOKUP_KEYS = 10
_INCLUDABLE = ("currency_options", "tiers")


def _name(prefix: str, key: str) -> str:
    return f"{prefix}[{key}]" if prefix else key


async def new_price(
    tx: Transaction, params: dict[str, Any], *, product_id: str, param: str = ""
) -> dict[str, Any]:
    """A validated price (not yet stored) from create parameters, or `default_price_data`."""
    currency = str(params["currency"]).lower()
    if not re.fullmatch(r"[a-z]{3}", currency):
        raise parameter_invalid(_name(param, "currency"), f"Invalid currency: {params['currency']}")
    scheme = params.get("billing_scheme", "per_unit")
    if scheme not in ("per_unit", "tiered"):
        raise parameter_invalid(
            _name(param, "billing_scheme"), "Invalid billing_scheme: must be one of per_unit or tiered"
        )
    tax_behavior = params.get("tax_behavior", "unspecified")
    if tax_behavior not in TAX_BEHAVIORS:
        raise parameter_invalid(
            _name(param, "tax_behavior"),
            "Invalid tax_behavior: must be one of exclusive, inclusive or unspecified",
        )
    recurring = await _recurring(tx, params.get("recurring"), _name(param, "recurring"))
    price: dict[str, Any] = {
        "id": new_id("price"),
        "object": "price",
        "active": params.get("active", True),
        "billing_scheme": scheme,
        "created": tx.now(),
        "currency": currency,
        "custom_unit_amount": None,
        "livemode": False,
        "lookup_key": None,
        "metadata": apply_metadata({}, params.get("metadata")),
        "nickname": params.get("nickname") or None,
        "product": product_id,
        "recurring": recurring,
        "tax_behavior": tax_behavior,
        "tiers_mode": None,
        "transform_quantity": None,
        "type": "one_time" if recurring is None else "recurring",
        "unit_amount": None,
        "unit_amount_decimal": None,
    }
    if scheme == "per_unit":
        _per_unit_amount(price, params, param)
    else:
        _tiers(price, params, param)
    if "transform_quantity" in params:
        transform = params["transform_quantity"]
        if scheme == "tiered":
            raise parameter_invalid(
                _name(param, "transform_quantity"), "transform_quantity cannot be used with tiered prices."
            )
        if transform["divide_by"] < 1 or transform["round"] not in ("down", "up"):
            raise parameter_invalid(
                _name(param, "transform_quantity"),
                "transform_quantity needs divide_by >= 1 and round of up or down.",
            )
        price["transform_quantity"] = {"divide_by": transform["divide_by"], "round": transform["round"]}
    _set_currency_options(price, params)
    return price


def _set_currency_options(price: dict[str, Any], params: dict[str, Any]) -> None:
    """Stored only when given, so prices read by other sandbox resources carry no extra keys."""
    if "currency_options" in params:
        options = _currency_options(params["currency_options"])
        if options is None:
            price.pop("currency_options", None)
        else:
            price["currency_options"] = options


def _per_unit_amount(price: dict[str, Any], params: dict[str, Any], param: str) -> None:
    given = [key for key in ("unit_amount", "unit_amount_decimal", "custom_unit_amount") if key in params]
    if "tiers" in params or "tiers_mode" in params:
        raise parameter_invalid(
            _name(param, "tiers"), "Tiers can only be set when `billing_scheme` is `tiered`."
        )
    if not given:
        raise parameter_missing(_name(param, "unit_amount"))
    if len(given) > 1:
        raise parameter_invalid(
            _name(param, given[1]),
            "You may only specify one of these parameters: unit_amount, unit_amount_decimal, "
            "custom_unit_amount.",
        )
    if "unit_amount" in params:
        amount = int(params["unit_amount"])
        if amount < 0:
            raise parameter_invalid(
                _name(param, "unit_amount"), "Invalid unit_amount: must be a non-negative integer"
            )
        price["unit_amount"] = amount
        price["unit_amount_decimal"] = str(amount)
    elif "unit_amount_decimal" in params:
        amount_decimal = _decimal(params["unit_amount_decimal"], _name(param, "unit_amount_decimal"))
        price["unit_amount_decimal"] = _decimal_string(amount_decimal)
        price["unit_amount"] = int(amount_decimal) if amount_decimal == amount_decimal.to_integral() else None
    else:
        custom = params["custom_unit_amount"]
        if price["recurring"] is not None:
            raise parameter_invalid(
                _name(param, "custom_unit_amount"),
                "custom_unit_amount is not supported for recurring prices.",
            )
        if not custom.get("enabled"):
            raise parameter_invalid(
                _name(param, "custom_unit_amount[enabled]"),
                "Pass in `true` to enable custom_unit_amount, otherwise omit it.",
            )
        price["custom_unit_amount"] = {
            "maximum": custom.get("maximum"),
            "minimum": custom.get("minimum"),
            "preset": custom.get("preset"),
        }


def _tiers(price: dict[str, Any], params: dict[str, Any], param: str) -> None:
    for key in ("unit_amount", "unit_amount_decimal", "custom_unit_amount"):
        if key in params:
            raise parameter_invalid(
                _name(param, key), f"{key} cannot be set when `billing_scheme` is `tiered`."
            )
    if "tiers_mode" not in params:
        raise parameter_missing(_name(param, "tiers_mode"))
    if params["tiers_mode"] not in ("graduated", "volume"):
        raise parameter_invalid(
            _name(param, "tiers_mode"), "Invalid tiers_mode: must be one of graduated or volume"
        )
    tiers = params.get("tiers") or []
    if not tiers:
        raise parameter_missing(_name(param, "tiers"))
    if tiers[-1]["up_to"] != "inf" or any(tier["up_to"] == "inf" for tier in tiers[:-1]):
        raise parameter_invalid(
            _name(param, "tiers"), "The last tier, and only it, must have `up_to` set to `inf`."
        )
    price["tiers_mode"] = params["tiers_mode"]
    price["tiers"] = [_tier(tier, f"{_name(param, 'tiers')}[{index}]") for index, tier in enumerate(tiers)]


def _tier(tier: dict[str, Any], param: str) -> dict[str, Any]:
    def amount(key: str) -> tuple[int | None, str | None]:
        if key in tier:
            return int(tier[key]), str(int(tier[key]))
        if f"{key}_decimal" in tier:
            value = _decimal(tier[f"{key}_decimal"], f"{param}[{key}_decimal]")
            return (int(value) if value == value.to_integral() else None), _decimal_string(value)
        return None, None

    flat, flat_decimal = amount("flat_amount")
    unit, unit_decimal = amount("unit_amount")
    return {
        "flat_amount": flat,
        "flat_amount_decimal": flat_decimal,
        "unit_amount": unit,
        "unit_amount_decimal": unit_decimal,
        "up_to": None if tier["up_to"] == "inf" else int(tier["up_to"]),
    }


def _currency_options(options: Any) -> dict[str, Any] | None:
    if not options:
        return None
    result: dict[str, Any] = {}
    for currency, option in options.items():
        amount = option.get("unit_amount")
        result[currency.lower()] = {
            "custom_unit_amount": None,
            "tax_behavior": option.get("tax_behavior", "unspecified"),
            "unit_amount": amount,
            "unit_amount_decimal": option.get("unit_amount_decimal")
            or (None if amount is None else str(amount)),
        }
    return result


def _decimal(value: Any, param: str) -> Decimal:
    try:
        parsed = Decimal(str(value))
    except InvalidOperation:
        raise parameter_invalid(param, f"Invalid decimal: {value}") from None
    if not parsed.is_finite() or parsed < 0:
        raise parameter_invalid(param, f"Invalid decimal: {value}")
    return parsed


def _decimal_string(value: Decimal) -> str:
    if value == value.to_integral():
        return str(int(value))
    return format(value.normalize(), "f")


async def _recurring(tx: Transaction, recurring: Any, param: str) -> dict[str, Any] | None:
    if recurring is None:
        return None
    interval = recurring["interval"]
    if interval not in MAX_INTERVAL_COUNT:
        raise parameter_invalid(
            f"{param}[interval]", "Invalid recurring[interval]: must be one of day, week, month or year"
        )
    count = int(recurring.get("interval_count", 1))
    if not 1 <= count <= MAX_INTERVAL_COUNT[interval]:
        raise parameter_invalid(
            f"{param}[interval_count]",
            "The maximum billing interval is three years (3 years, 36 months, 156 weeks or 1095 days).",
        )
    usage_type = recurring.get("usage_type", "licensed")
    if usage_type not in ("licensed", "metered"):
        raise parameter_invalid(
            f"{param}[usage_type]", "Invalid recurring[usage_type]: must be one of licensed or metered"
        )
    meter = recurring.get("meter")
    if usage_type == "metered":
        # Since 2025-03-31.basil metered prices are backed by a billing meter, always.
        if not meter:
            raise StripeError(
                400,
                "Metered prices must be backed by a meter: pass `recurring[meter]`.",
                code="parameter_missing",
                param=f"{param}[meter]",
            )
        await referenced(tx, "billing.meter", meter, f"{param}[meter]")
    elif meter:
        raise parameter_invalid(
            f"{param}[meter]", "`recurring[meter]` can only be set when `recurring[usage_type]` is `metered`."
        )
    return {
        "interval": interval,
        "interval_count": count,
        "meter": meter or None,
        "trial_period_days": recurring.get("trial_period_days"),
        "usage_type": usage_type,
    }


async def _claim_lookup_key(tx: Transaction, price: dict[str, Any], key: str | None, transfer: bool) -> None:
    """Give `price` the lookup key, taking it from the price that has it only if `transfer`."""
    if key is not None and len(key) > 200:
        raise parameter_invalid("lookup_key", "lookup_key must be at most 200 characters.")
    if key is not None:
        holders = await tx.all(
            "price", lambda other: other["lookup_key"] == key and other["id"] != price["id"]
        )
        for holder in holders:
            if not transfer:
                raise StripeError(
                    400,
                    f"A price (`{holder['id']}`) already uses that lookup key. Pass "
                    "`transfer_lookup_key=true` to move it to this price.",
                    param="lookup_key",
                )
            holder["lookup_key"] = None
            await tx.save(holder)
            await tx.emit("price.updated", present(holder), previous_attributes={"lookup_key": key})
    price["lookup_key"] = key


def present(price: dict[str, Any], expand: list[str] | None = None, prefix: str = "") -> dict[str, Any]:
    """The price as the API returns it: includable fields only when expanded."""
    shown = dict(price)
    for name in _INCLUDABLE:
        if f"{prefix}{name}" not in (expand or []):
            shown.pop(name, None)
    return shown


@endpoint("POST", "/v1/prices", PriceCreateParams)
async def create_price(call: Call) -> dict[str, Any]:
    tx, params = call.tx, call.params
    if ("product" in params) == ("product_data" in params):
        raise parameter_invalid(
            "product", "You must specify exactly one of these parameters: product, product_data."
        )
    if "product" in params:
        product_id = (await referenced(tx, "product", params["product"], "product"))["id"]
    else:
        data = params["product_data"]
        if "id" in data and await tx.find(data["id"]) is not None:
            raise StripeError(
                400, "Product already exists.", code="resource_already_exists", param="product_data[id]"
            )
        product = new_product(tx.now(), data)
        await tx.insert(product)
        await tx.emit("product.created", product)
        product_id = product["id"]
    price = await new_price(tx, params, product_id=product_id)
    await tx.insert(price)
    await _claim_lookup_key(
        tx, price, params.get("lookup_key") or None, params.get("transfer_lookup_key", False)
    )
    await tx.save(price)
    await tx.emit("price.created", present(price))
    return present(price, params.get("expand"))


@endpoint("GET", "/v1/prices/{price}", PriceRetrieveParams)
async def retrieve_price(call: Call) -> dict[str, Any]:
    return present(await call.tx.get("price", call.path["price"]), call.params.get("expand"))


@endpoint("POST", "/v1/prices/{price}", PriceUpdateParams)
async def update_price(call: Call) -> dict[str, Any]:
    tx, params = call.tx, call.params
    price = await tx.get("price", call.path["price"])
    before = {key: price.get(key) for key in params if key not in ("expand", "transfer_lookup_key")}
    if params.get("active") is False and price["active"]:
        product = await tx.find(price["product"])
        if product is not None and product.get("default_price") == price["id"]:
            raise parameter_invalid(
                "active", "This price cannot be archived because it is the default price of its product."
            )
    if "tax_behavior" in params and params["tax_behavior"] != price["tax_behavior"]:
        if params["tax_behavior"] not in TAX_BEHAVIORS:
            raise parameter_invalid(
                "tax_behavior", "Invalid tax_behavior: must be one of exclusive, inclusive or unspecified"
            )
        if price["tax_behavior"] != "unspecified":
            raise parameter_invalid(
                "tax_behavior",
                "tax_behavior cannot be changed once it is set to `inclusive` or `exclusive`.",
            )
        price["tax_behavior"] = params["tax_behavior"]
    if "active" in params:
        price["active"] = params["active"]
    if "nickname" in params:
        price["nickname"] = params["nickname"] or None
    if "metadata" in params:
        price["metadata"] = apply_metadata(price["metadata"], params["metadata"])
    _set_currency_options(price, params)
    if "lookup_key" in params and (params["lookup_key"] or None) != price["lookup_key"]:
        await _claim_lookup_key(
            tx, price, params["lookup_key"] or None, params.get("transfer_lookup_key", False)
        )
    changed = {key: value for key, value in before.items() if price.get(key) != value}
    await tx.save(price)
    if changed:
        changed = {key: value for key, value in changed.items() if key not in _INCLUDABLE}
        await tx.emit("price.updated", present(price), previous_attributes=changed)
    return present(price, params.get("expand"))


def _recurring_matches(price: dict[str, Any], wanted: dict[str, Any]) -> bool:
    recurring = price.get("recurring")
    return recurring is not None and all(recurring.get(key) == value for key, value in wanted.items())


@endpoint("GET", "/v1/prices", PriceListParams)
async def list_prices(call: Call) -> dict[str, Any]:
    params = call.params
    lookup_keys = params.get("lookup_keys")
    if lookup_keys is not None and len(lookup_keys) > MAX_LOOKUP_KEYS:
        raise parameter_invalid("lookup_keys", f"You can pass at most {MAX_LOOKUP_KEYS} lookup_keys.")
    in_range = created_filter(params)

    def wanted(price: dict[str, Any]) -> bool:
        return (
            in_range(price)
            and ("active" not in params or price["active"] == params["active"])
            and ("currency" not in params or price["currency"] == str(params["currency"]).lower())
            and ("product" not in params or price["product"] == params["product"])
            and ("type" not in params or price["type"] == params["type"])
            and (lookup_keys is None or price["lookup_key"] in lookup_keys)
            and ("recurring" not in params or _recurring_matches(price, params["recurring"]))
        )

    prices = [present(price, params.get("expand"), "data.") for price in await call.tx.all("price", wanted)]
    return paginate(prices, params, call.url)


@endpoint("GET", "/v1/prices/search", PriceSearchParams)
async def search_prices(call: Call) -> dict[str, Any]:
    matches = await call.tx.all("price", search_matcher(call.params["query"]))
    return search_result([present(price) for price in matches], call.params, call.url)
