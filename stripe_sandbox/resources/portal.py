"""Customer portal: configurations (create, retrieve, update, list) and sessions (create).

The first configuration created is the default one (in Stripe, the one saved in the dashboard's
portal settings); a session without `configuration` uses it, and without any configuration Stripe
refuses to create sessions. A session's `url` is the sandbox's own portal page, built elsewhere.
"""

from __future__ import annotations

import copy
from typing import Any

from stripe.params.billing_portal import (
    ConfigurationCreateParams,
    ConfigurationListParams,
    ConfigurationRetrieveParams,
    ConfigurationUpdateParams,
)
from stripe.params.billing_portal import SessionCreateParams as PortalSessionCreateParams

from stripe_sandbox.api import Call, apply_metadata, endpoint, paginate
from stripe_sandbox.errors import StripeError, parameter_invalid, parameter_missing
from stripe_sandbox.resources.products import referenced
from stripe_sandbox.store import Transaction, new_id

_CONFIGURATION = "billing_portal.configuration"
# Not returned unless expanded (Stripe: "This field is not included by default").
_PRODUCTS_PATH = "features.subscription_update.products"
NO_DEFAULT_CONFIGURATION = (
    "You can't create a portal session in test mode until you save your customer portal settings "
    "in test mode at https://dashboard.stripe.com/test/settings/billing/portal."
)


def _default_features() -> dict[str, Any]:
    return {
        "customer_update": {"allowed_updates": [], "enabled": False},
        "invoice_history": {"enabled": False},
        "payment_method_update": {"enabled": False, "payment_method_configuration": None},
        "subscription_cancel": {
            "cancellation_reason": {"enabled": False, "options": []},
            "enabled": False,
            "mode": "at_period_end",
            "proration_behavior": "none",
        },
        "subscription_pause": {"duration": {"interval_options": [], "type": "indefinite"}, "enabled": False},
        "subscription_update": {
            "billing_cycle_anchor": None,
            "default_allowed_updates": [],
            "enabled": False,
            "products": [],
            "proration_behavior": "none",
            "schedule_at_period_end": {"conditions": []},
            "trial_update_behavior": "end_trial",
        },
    }


_ENUMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("subscription_cancel", "mode"): ("at_period_end", "immediately"),
    ("subscription_cancel", "proration_behavior"): ("always_invoice", "create_prorations", "none"),
    ("subscription_update", "proration_behavior"): ("always_invoice", "create_prorations", "none"),
    ("subscription_update", "billing_cycle_anchor"): ("now", "unchanged"),
    ("subscription_update", "trial_update_behavior"): ("continue_trial", "end_trial"),
}
_LIST_ENUMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("customer_update", "allowed_updates"): ("address", "email", "name", "phone", "shipping", "tax_id"),
    ("subscription_update", "default_allowed_updates"): ("price", "promotion_code", "quantity"),
}


async def _apply_features(tx: Transaction, features: dict[str, Any], given: dict[str, Any]) -> None:
    """Merge the `features` parameter into a configuration's features, validating as Stripe does."""
    for feature, settings in given.items():
        current = features[feature]
        for key, value in settings.items():
            param = f"features[{feature}][{key}]"
            if (feature, key) in _ENUMS and value not in _ENUMS[feature, key]:
                raise parameter_invalid(
                    param, f"Invalid {param}: must be one of {', '.join(_ENUMS[feature, key])}"
                )
            if (feature, key) in _LIST_ENUMS:
                value = value or []
                for item in value:
                    if item not in _LIST_ENUMS[feature, key]:
                        raise parameter_invalid(param, f"Invalid {param}: {item!r} is not allowed")
            if feature == "subscription_update" and key == "products":
                value = [await _update_product(tx, product, param) for product in value or []]
            elif feature == "subscription_update" and key == "schedule_at_period_end":
                value = {"conditions": [{"type": c["type"]} for c in value.get("conditions") or []]}
            elif feature == "subscription_cancel" and key == "cancellation_reason":
                value = {
                    "enabled": value["enabled"],
                    "options": value.get("options") or [],
                    **(
                        {"feedback_options": value["feedback_options"] or None}
                        if "feedback_options" in value
                        else {}
                    ),
                }
            elif key == "payment_method_configuration":
                value = value or None
            current[key] = value


async def _update_product(tx: Transaction, given: dict[str, Any], param: str) -> dict[str, Any]:
    product = await referenced(tx, "product", given["product"], f"{param}[product]")
    for price_id in given["prices"]:
        price = await referenced(tx, "price", price_id, f"{param}[prices]")
        if price["product"] != product["id"]:
            raise parameter_invalid(
                f"{param}[prices]",
                f"The price `{price_id}` does not belong to the product `{product['id']}`.",
            )
    adjustable = given.get("adjustable_quantity") or {"enabled": False}
    return {
        "adjustable_quantity": {
            "enabled": adjustable["enabled"],
            "maximum": adjustable.get("maximum"),
            "minimum": adjustable.get("minimum", 0),
        },
        "prices": list(given["prices"]),
        "product": product["id"],
    }


def _login_page(configuration_id: str, enabled: bool, base_url: str) -> dict[str, Any]:
    return {"enabled": enabled, "url": f"{base_url}/portal/login/{configuration_id}" if enabled else None}


async def _apply(call: Call, configuration: dict[str, Any]) -> None:
    params = call.params
    if "features" in params:
        await _apply_features(call.tx, configuration["features"], params["features"])
    if "business_profile" in params:
        profile = configuration["business_profile"]
        for key, value in params["business_profile"].items():
            profile[key] = value or None
    if "default_return_url" in params:
        configuration["default_return_url"] = params["default_return_url"] or None
    if "name" in params:
        configuration["name"] = params["name"] or None
    if "metadata" in params:
        configuration["metadata"] = apply_metadata(configuration["metadata"] or {}, params["metadata"])
    if "login_page" in params:
        configuration["login_page"] = _login_page(
            configuration["id"], params["login_page"]["enabled"], call.config.base_url
        )
    if "active" in params:
        configuration["active"] = params["active"]


def present(
    configuration: dict[str, Any], expand: list[str] | None = None, prefix: str = ""
) -> dict[str, Any]:
    """The configuration as the API returns it: `products` only when expanded."""
    if f"{prefix}{_PRODUCTS_PATH}" in (expand or []):
        return configuration
    shown = copy.deepcopy(configuration)
    shown["features"]["subscription_update"].pop("products", None)
    return shown


@endpoint("POST", "/v1/billing_portal/configurations", ConfigurationCreateParams)
async def create_configuration(call: Call) -> dict[str, Any]:
    tx = call.tx
    now = tx.now()
    is_default = not await tx.all(_CONFIGURATION)
    configuration: dict[str, Any] = {
        "id": new_id("bpc"),
        "object": _CONFIGURATION,
        "active": True,
        "application": None,
        "business_profile": {"headline": None, "privacy_policy_url": None, "terms_of_service_url": None},
        "created": now,
        "default_return_url": None,
        "features": _default_features(),
        "is_default": is_default,
        "livemode": False,
        "login_page": {"enabled": False, "url": None},
        "metadata": {},
        "name": None,
        "updated": now,
    }
    await _apply(call, configuration)
    await tx.insert(configuration)
    await tx.emit("billing_portal.configuration.created", present(configuration))
    return present(configuration, call.params.get("expand"))


@endpoint("GET", "/v1/billing_portal/configurations/{configuration}", ConfigurationRetrieveParams)
async def retrieve_configuration(call: Call) -> dict[str, Any]:
    configuration = await call.tx.get(_CONFIGURATION, call.path["configuration"])
    return present(configuration, call.params.get("expand"))


@endpoint("POST", "/v1/billing_portal/configurations/{configuration}", ConfigurationUpdateParams)
async def update_configuration(call: Call) -> dict[str, Any]:
    tx = call.tx
    configuration = await tx.get(_CONFIGURATION, call.path["configuration"])
    before = copy.deepcopy({key: configuration.get(key) for key in call.params if key != "expand"})
    await _apply(call, configuration)
    changed = {key: value for key, value in before.items() if configuration.get(key) != value}
    if changed:
        configuration["updated"] = tx.now()
    await tx.save(configuration)
    if changed:
        if "features" in changed:
            changed["features"] = present({"features": changed["features"]})["features"]
        await tx.emit(
            "billing_portal.configuration.updated", present(configuration), previous_attributes=changed
        )
    return present(configuration, call.params.get("expand"))


@endpoint("GET", "/v1/billing_portal/configurations", ConfigurationListParams)
async def list_configurations(call: Call) -> dict[str, Any]:
    params = call.params
    configurations = await call.tx.all(
        _CONFIGURATION,
        lambda c: all(c[name] == params[name] for name in ("active", "is_default") if name in params),
    )
    shown = [present(c, params.get("expand"), "data.") for c in configurations]
    return paginate(shown, params, call.url)


# Sessions ---------------------------------------------------------------------------------------

_FLOW_SUBSCRIPTION_TYPES = (
    "subscription_cancel",
    "subscription_pause",
    "subscription_update",
    "subscription_update_confirm",
)
_FLOW_TYPES = ("customer_update", "payment_method_update", *_FLOW_SUBSCRIPTION_TYPES)


async def _flow(tx: Transaction, given: dict[str, Any] | None) -> dict[str, Any] | None:
    if given is None:
        return None
    flow_type = given["type"]
    if flow_type not in _FLOW_TYPES:
        raise parameter_invalid(
            "flow_data[type]", f"Invalid flow_data[type]: must be one of {', '.join(_FLOW_TYPES)}"
        )
    after = given.get("after_completion") or {"type": "portal_homepage"}
    if after["type"] not in ("hosted_confirmation", "portal_homepage", "redirect"):
        raise parameter_invalid(
            "flow_data[after_completion][type]",
            "Invalid type: must be one of hosted_confirmation, portal_homepage or redirect",
        )
    if after["type"] == "redirect" and "redirect" not in after:
        raise parameter_missing("flow_data[after_completion][redirect]")
    flow: dict[str, Any] = {
        "after_completion": {
            "hosted_confirmation": (
                {"custom_message": (after.get("hosted_confirmation") or {}).get("custom_message")}
                if after["type"] == "hosted_confirmation"
                else None
            ),
            "redirect": {"return_url": after["redirect"]["return_url"]}
            if after["type"] == "redirect"
            else None,
            "type": after["type"],
        },
        "customer_update": None,
        "subscription_cancel": None,
        "subscription_pause": None,
        "subscription_update": None,
        "subscription_update_confirm": None,
        "type": flow_type,
    }
    if flow_type in _FLOW_SUBSCRIPTION_TYPES:
        details = given.get(flow_type)
        if details is None:
            raise parameter_missing(f"flow_data[{flow_type}]")
        await referenced(tx, "subscription", details["subscription"], f"flow_data[{flow_type}][subscription]")
        shown: dict[str, Any] = {"subscription": details["subscription"]}
        if flow_type == "subscription_cancel":
            retention = details.get("retention")
            shown["retention"] = (
                None
                if retention is None
                else {
                    "coupon_offer": {"coupon": retention["coupon_offer"]["coupon"]},
                    "type": retention["type"],
                }
            )
        if flow_type == "subscription_update_confirm":
            shown["items"] = [
                {"id": item["id"], "price": item.get("price"), "quantity": item.get("quantity")}
                for item in details["items"]
            ]
            shown["discounts"] = [
                {"coupon": d.get("coupon"), "promotion_code": d.get("promotion_code")}
                for d in details.get("discounts") or []
            ] or None
        flow[flow_type] = shown
    return flow


@endpoint("POST", "/v1/billing_portal/sessions", PortalSessionCreateParams)
async def create_session(call: Call) -> dict[str, Any]:
    tx, params = call.tx, call.params
    if "customer" not in params:
        raise parameter_missing("customer")
    customer = await referenced(tx, "customer", params["customer"], "customer")
    if "configuration" in params:
        configuration = await referenced(tx, _CONFIGURATION, params["configuration"], "configuration")
        if not configuration["active"]:
            raise parameter_invalid(
                "configuration", f"The configuration `{configuration['id']}` is not active."
            )
    else:
        defaults = await tx.all(_CONFIGURATION, lambda c: c["is_default"])
        if not defaults:
            raise StripeError(400, NO_DEFAULT_CONFIGURATION)
        configuration = defaults[0]
    return_url = params.get("return_url") or configuration["default_return_url"]
    if not return_url:
        raise parameter_missing("return_url")
    session_id = new_id("bps")
    after_expiration = params.get("after_expiration")
    session = {
        "id": session_id,
        "object": "billing_portal.session",
        "after_expiration": None
        if after_expiration is None
        else {
            "customer_login": (
                {"expires_at": after_expiration["customer_login"].get("expires_at")}
                if "customer_login" in after_expiration
                else None
            ),
            "type": after_expiration["type"],
        },
        "configuration": configuration["id"],
        "created": tx.now(),
        "customer": customer["id"],
        "customer_account": None,
        "flow": await _flow(tx, params.get("flow_data")),
        "livemode": False,
        "locale": params.get("locale"),
        "on_behalf_of": params.get("on_behalf_of"),
        "return_url": return_url,
        "url": f"{call.config.base_url}/portal/{session_id}",
    }
    await tx.insert(session)
    await tx.emit("billing_portal.session.created", session)
    return session
