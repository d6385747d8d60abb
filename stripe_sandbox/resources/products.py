"""Products: create, retrieve, update, delete, list, search."""

from __future__ import annotations

from typing import Any

from stripe.params import (
    ProductCreateParams,
    ProductDeleteParams,
    ProductListParams,
    ProductRetrieveParams,
    ProductSearchParams,
    ProductUpdateParams,
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
from stripe_sandbox.errors import StripeError, parameter_invalid, resource_missing
from stripe_sandbox.store import Transaction, new_id

# Fields whose empty value ('' where the API allows it) reads back as null.
_NULLABLE_FIELDS = ("description", "statement_descriptor", "tax_code", "unit_label", "url")


async def referenced(tx: Transaction, object_type: str, object_id: str, param: str) -> dict[str, Any]:
    """An object named by a request parameter: Stripe's `resource_missing`, as a 400, if absent.

    (An id in the URL path that names nothing is a 404; one in the parameters is a 400.)
    """
    found = await tx.find(object_id)
    if found is None or found.get("object") != object_type or found.get("deleted"):
        missing = resource_missing(object_type.split(".")[-1], object_id, param)
        raise StripeError(400, missing.message, code=missing.code, param=param)
    return found


def new_product(now: int, params: dict[str, Any]) -> dict[str, Any]:
    product: dict[str, Any] = {
        "id": params.get("id") or new_id("prod"),
        "object": "product",
        "active": True,
        "created": now,
        "default_price": None,
        "description": None,
        "images": [],
        "livemode": False,
        "marketing_features": [],
        "metadata": {},
        "name": params["name"],
        "package_dimensions": None,
        "shippable": None,
        "statement_descriptor": None,
        "tax_code": None,
        "tax_details": None,
        "type": "service",
        "unit_label": None,
        "updated": now,
        "url": None,
    }
    if params.get("type", "service") not in ("good", "service"):
        raise parameter_invalid("type", "Invalid type: must be one of good or service")
    product["type"] = params.get("type", "service")
    return _apply(product, params)


def _apply(product: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    if "name" in params:
        if not params["name"]:
            raise parameter_invalid("name", "You must provide a non-empty name for the product.")
        product["name"] = params["name"]
    for name in _NULLABLE_FIELDS:
        if name in params:
            product[name] = params[name] or None
    if "active" in params:
        product["active"] = params["active"]
    if "shippable" in params:
        product["shippable"] = params["shippable"]
    if "images" in params:
        product["images"] = params["images"] or []
    if "marketing_features" in params:
        product["marketing_features"] = [{"name": f["name"]} for f in params["marketing_features"] or []]
    if "package_dimensions" in params:
        product["package_dimensions"] = params["package_dimensions"] or None
    if "tax_details" in params:
        details = params["tax_details"] or None
        product["tax_details"] = (
            None
            if details is None
            else {
                "performance_location": details.get("performance_location"),
                "tax_code": details.get("tax_code") or None,
            }
        )
    if "metadata" in params:
        product["metadata"] = apply_metadata(product["metadata"], params["metadata"])
    return product


@endpoint("POST", "/v1/products", ProductCreateParams)
async def create_product(call: Call) -> dict[str, Any]:
    from stripe_sandbox.resources.prices import new_price

    tx = call.tx
    if "id" in call.params and await tx.find(call.params["id"]) is not None:
        raise StripeError(400, "Product already exists.", code="resource_already_exists", param="id")
    product = new_product(tx.now(), call.params)
    await tx.insert(product)
    await tx.emit("product.created", product)
    if "default_price_data" in call.params:
        price = await new_price(
            tx, call.params["default_price_data"], product_id=product["id"], param="default_price_data"
        )
        await tx.insert(price)
        await tx.emit("price.created", price)
        product["default_price"] = price["id"]
        await tx.save(product)
    return product


@endpoint("GET", "/v1/products/{id}", ProductRetrieveParams)
async def retrieve_product(call: Call) -> dict[str, Any]:
    return await call.tx.get("product", call.path["id"])


@endpoint("POST", "/v1/products/{id}", ProductUpdateParams)
async def update_product(call: Call) -> dict[str, Any]:
    tx = call.tx
    product = await tx.get("product", call.path["id"])
    if "default_price" in call.params:
        price = await referenced(tx, "price", call.params["default_price"], "default_price")
        if price["product"] != product["id"]:
            raise parameter_invalid(
                "default_price",
                f"The price `{price['id']}` does not belong to the product `{product['id']}`.",
            )
    before = {key: product.get(key) for key in call.params if key != "expand"}
    _apply(product, call.params)
    if "default_price" in call.params:
        product["default_price"] = call.params["default_price"]
    changed = {key: value for key, value in before.items() if product.get(key) != value}
    if changed:
        product["updated"] = tx.now()
    await tx.save(product)
    if changed:
        await tx.emit("product.updated", product, previous_attributes=changed)
    return product


@endpoint("DELETE", "/v1/products/{id}", ProductDeleteParams)
async def delete_product(call: Call) -> dict[str, Any]:
    tx = call.tx
    product = await tx.get("product", call.path["id"])
    if await tx.all("price", lambda price: price.get("product") == product["id"]):
        raise StripeError(
            400, "This product cannot be deleted because it has one or more user-created prices."
        )
    await tx.remove(product["id"])
    await tx.emit("product.deleted", product)
    return {"id": product["id"], "object": "product", "deleted": True}


@endpoint("GET", "/v1/products", ProductListParams)
async def list_products(call: Call) -> dict[str, Any]:
    params = call.params
    if "ids" in params and ("starting_after" in params or "ending_before" in params):
        raise parameter_invalid("ids", "`ids` cannot be used with `starting_after` or `ending_before`.")
    in_range = created_filter(params)
    ids = set(params["ids"]) if "ids" in params else None

    def wanted(product: dict[str, Any]) -> bool:
        return (
            in_range(product)
            and (ids is None or product["id"] in ids)
            and all(
                product.get(name) == params[name]
                for name in ("active", "shippable", "type", "url")
                if name in params
            )
        )

    return paginate(await call.tx.all("product", wanted), params, call.url)


@endpoint("GET", "/v1/products/search", ProductSearchParams)
async def search_products(call: Call) -> dict[str, Any]:
    matches = await call.tx.all("product", search_matcher(call.params["query"]))
    return search_result(matches, call.params, call.url)
