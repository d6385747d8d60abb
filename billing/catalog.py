"""`billing catalog sync`: make Stripe's products, prices, meters and portal match the plans file.

One product per tier (its licensed prices) and one per metered feature (its metered prices, one
per tier), so Checkout, the portal and invoices name each line as Stripe shows it: "Pro" once, and
"API calls" at its unit price.

Prices are immutable in Stripe: a changed amount creates a new price, moves the lookup key to
it (`transfer_lookup_key`) and archives the old one, so existing subscribers keep paying the
old price and keep their tier (read from the price's metadata). Objects this service manages
carry `metadata.catalog = "billing"`. A second run finds nothing to change and says so.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import Any

import stripe
from stripe.params.billing_portal import ConfigurationCreateParamsFeatures

from billing.plans import STRIPE_INTERVAL, Catalog, Meter, MeteredPrice, Plan, Price
from billing.stripe_gateway import StripeGateway, idempotency_key
from db.enums import BillingInterval

MANAGED = {"catalog": "billing"}
PAGE = 100
# What Stripe's portal offers when asking why a customer cancels.
CANCELLATION_REASONS = [
    "too_expensive",
    "missing_features",
    "switched_service",
    "unused",
    "customer_service",
    "too_complex",
    "low_quality",
    "other",
]

Progress = Callable[[str], None]


@dataclass
class SyncReport:
    dry_run: bool
    changes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def portal_features() -> ConfigurationCreateParamsFeatures:
    """Cancel at period end (asking why), payment methods and invoices; plan switching off.

    Stripe's portal cannot move a subscription between products (our tiers are products) nor
    update one managed by a schedule, so plan changes go through the `changePlan` mutation.
    """
    return {
        "customer_update": {"enabled": True, "allowed_updates": ["email", "address", "name"]},
        "invoice_history": {"enabled": True},
        "payment_method_update": {"enabled": True},
        "subscription_cancel": {
            "enabled": True,
            "mode": "at_period_end",
            "cancellation_reason": {"enabled": True, "options": CANCELLATION_REASONS},
        },
        "subscription_update": {"enabled": False},
    }


async def sync_catalog(
    *,
    catalog: Catalog,
    gateway: StripeGateway,
    return_url: str,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> SyncReport:
    run = _Sync(catalog, gateway, SyncReport(dry_run), progress or (lambda _line: None))
    products = await run.products()
    metered_products = await run.metered_products()
    meters = await run.meters()
    await run.prices({**products, **metered_products}, meters)
    await run.portal(return_url)
    return run.report


class _Sync:
    def __init__(
        self, catalog: Catalog, gateway: StripeGateway, report: SyncReport, progress: Progress
    ) -> None:
        self.catalog = catalog
        self.gateway = gateway
        self.v1 = gateway.v1
        self.report = report
        self.progress = progress

    async def _change(self, description: str, apply: Callable[[], Awaitable[Any]]) -> Any:
        self.report.changes.append(description)
        self.progress(("would " if self.report.dry_run else "") + description)
        if self.report.dry_run:
            return None
        return await apply()

    # Products: one per tier -------------------------------------------------------------

    async def products(self) -> dict[str, str]:
        """tier -> product id (a placeholder in a dry run when the product does not exist yet)."""
        self.progress("checking products")
        page = await self.gateway.call(
            lambda o: self.v1.products.list_async({"active": True, "limit": PAGE}, o), what="list products"
        )
        existing: dict[str, stripe.Product] = {}
        async for product in page.auto_paging_iter():
            tier = _metadata(product).get("tier")
            if _metadata(product).get("catalog") == "billing" and tier and tier not in existing:
                existing[tier] = product
        ids: dict[str, str] = {}
        for plan in self.catalog.plans.values():
            current = existing.get(plan.tier.value)
            if current is None:
                created = await self._change(
                    f"create product {plan.name} (tier {plan.tier.value})",
                    partial(self._create_product, plan),
                )
                ids[plan.tier.value] = created.id if created else f"<new product {plan.tier.value}>"
                continue
            ids[plan.tier.value] = current.id
            if current.name != plan.name or (current.description or None) != plan.description:
                await self._change(
                    f"update product {current.id} name/description to {plan.name!r}",
                    partial(self._update_product, current.id, plan),
                )
        return ids

    async def _create_product(self, plan: Plan) -> stripe.Product:
        metadata = {**MANAGED, "tier": plan.tier.value}
        return await self.gateway.call(
            lambda o: self.v1.products.create_async(
                {"name": plan.name, "description": plan.description or plan.name, "metadata": metadata}, o
            ),
            idempotency_key=idempotency_key("catalog.product", plan.tier.value, plan.name),
            what="create product",
        )

    async def _update_product(self, product_id: str, plan: Plan) -> stripe.Product:
        return await self.gateway.call(
            lambda o: self.v1.products.update_async(
                product_id, {"name": plan.name, "description": plan.description or plan.name}, o
            ),
            what="update product",
        )

    async def metered_products(self) -> dict[str, str]:
        """metered feature -> product id (named by the meter's display name, e.g. "API calls")."""
        if not self.catalog.meters:
            return {}
        page = await self.gateway.call(
            lambda o: self.v1.products.list_async({"active": True, "limit": PAGE}, o), what="list products"
        )
        existing: dict[str, stripe.Product] = {}
        async for product in page.auto_paging_iter():
            feature = _metadata(product).get("feature")
            if _metadata(product).get("catalog") == "billing" and feature and feature not in existing:
                existing[feature] = product
        ids: dict[str, str] = {}
        for meter in self.catalog.meters.values():
            current = existing.get(meter.feature)
            if current is None:
                created = await self._change(
                    f"create product {meter.display_name} (metered {meter.feature})",
                    partial(self._create_metered_product, meter),
                )
                ids[_metered_key(meter.feature)] = created.id if created else f"<new product {meter.feature}>"
                continue
            ids[_metered_key(meter.feature)] = current.id
            if current.name != meter.display_name:
                await self._change(
                    f"update product {current.id} name to {meter.display_name!r}",
                    partial(self._rename_product, current.id, meter.display_name),
                )
        return ids

    async def _create_metered_product(self, meter: Meter) -> stripe.Product:
        metadata = {**MANAGED, "feature": meter.feature}
        return await self.gateway.call(
            lambda o: self.v1.products.create_async({"name": meter.display_name, "metadata": metadata}, o),
            idempotency_key=idempotency_key("catalog.metered_product", meter.feature, meter.display_name),
            what="create product",
        )

    async def _rename_product(self, product_id: str, name: str) -> stripe.Product:
        return await self.gateway.call(
            lambda o: self.v1.products.update_async(product_id, {"name": name}, o), what="update product"
        )

    # Meters: one per metered feature ----------------------------------------------------

    async def meters(self) -> dict[str, str]:
        """feature -> meter id."""
        if not self.catalog.meters:
            return {}
        self.progress("checking billing meters")
        page = await self.gateway.call(
            lambda o: self.v1.billing.meters.list_async({"status": "active", "limit": PAGE}, o),
            what="list meters",
        )
        by_event = {meter.event_name: meter.id async for meter in page.auto_paging_iter()}
        ids: dict[str, str] = {}
        for meter in self.catalog.meters.values():
            if meter.event_name in by_event:
                ids[meter.feature] = by_event[meter.event_name]
                continue
            created = await self._change(
                f"create billing meter {meter.event_name} ({meter.display_name})",
                partial(self._create_meter, meter),
            )
            ids[meter.feature] = created.id if created else f"<new meter {meter.event_name}>"
        return ids

    async def _create_meter(self, meter: Meter) -> stripe.billing.Meter:
        return await self.gateway.call(
            lambda o: self.v1.billing.meters.create_async(
                {
                    "display_name": meter.display_name,
                    "event_name": meter.event_name,
                    "default_aggregation": {"formula": "sum"},
                    "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
                    "value_settings": {"event_payload_key": "value"},
                },
                o,
            ),
            idempotency_key=idempotency_key("catalog.meter", meter.event_name),
            what="create meter",
        )

    # Prices: per tier and interval, plus metered prices ---------------------------------

    async def prices(self, products: dict[str, str], meters: dict[str, str]) -> None:
        self.progress("checking prices")
        wanted: list[Price | MeteredPrice] = []
        for plan in self.catalog.plans.values():
            wanted.extend(plan.prices.values())
            wanted.extend(plan.metered_prices.values())
        keys = [price.lookup_key for price in wanted]
        page = await self.gateway.call(
            lambda o: self.v1.prices.list_async({"active": True, "lookup_keys": keys, "limit": PAGE}, o),
            what="list prices",
        )
        existing = {price.lookup_key: price async for price in page.auto_paging_iter() if price.lookup_key}
        for price in wanted:
            product = products[
                _metered_key(price.feature) if isinstance(price, MeteredPrice) else price.tier.value
            ]
            meter = meters.get(price.feature) if isinstance(price, MeteredPrice) else None
            current = existing.get(price.lookup_key)
            if current is not None and _price_matches(current, price, product, meter):
                continue
            action = "create" if current is None else f"replace {current.id} with"
            await self._change(
                f"{action} price {price.lookup_key} ({_describe_price(price)})",
                partial(self._replace_price, price, product, meter, current),
            )

    async def _replace_price(
        self, price: Price | MeteredPrice, product: str, meter: str | None, current: stripe.Price | None
    ) -> None:
        params: Any = _price_params(price, product, meter)
        await self.gateway.call(
            lambda o: self.v1.prices.create_async(params, o),
            idempotency_key=idempotency_key("catalog.price", sorted(params.items())),
            what="create price",
        )
        if current is not None:
            # Archived, not deleted: existing subscribers keep paying it and keep their tier.
            await self.gateway.call(
                lambda o: self.v1.prices.update_async(current.id, {"active": False}, o), what="archive price"
            )

    # Portal configuration ----------------------------------------------------------------

    async def portal(self, return_url: str) -> None:
        self.progress("checking the customer portal configuration")
        page = await self.gateway.call(
            lambda o: self.v1.billing_portal.configurations.list_async({"active": True, "limit": PAGE}, o),
            what="list portal configurations",
        )
        managed = [c async for c in page.auto_paging_iter() if _metadata(c).get("catalog") == "billing"]
        if not managed:
            await self._change(
                "create customer portal configuration (cancel at period end, payment methods, "
                "invoices; plan switching off)",
                partial(self._create_portal, return_url),
            )
            return
        current = managed[0]
        if not _portal_matches(current, return_url):
            await self._change(
                f"update customer portal configuration {current.id}",
                partial(self._update_portal, current.id, return_url),
            )

    async def _create_portal(self, return_url: str) -> stripe.billing_portal.Configuration:
        return await self.gateway.call(
            lambda o: self.v1.billing_portal.configurations.create_async(
                {"features": portal_features(), "default_return_url": return_url, "metadata": MANAGED}, o
            ),
            idempotency_key=idempotency_key("catalog.portal", return_url),
            what="create portal configuration",
        )

    async def _update_portal(
        self, configuration_id: str, return_url: str
    ) -> stripe.billing_portal.Configuration:
        params: Any = {"features": portal_features(), "default_return_url": return_url}
        return await self.gateway.call(
            lambda o: self.v1.billing_portal.configurations.update_async(configuration_id, params, o),
            what="update portal configuration",
        )


def _price_params(price: Price | MeteredPrice, product: str, meter: str | None) -> dict[str, Any]:
    common: dict[str, Any] = {
        "product": product,
        "currency": price.currency,
        "lookup_key": price.lookup_key,
        "transfer_lookup_key": True,
        "billing_scheme": "per_unit",
    }
    if isinstance(price, Price):
        return {
            **common,
            "unit_amount": price.amount,
            "recurring": {"interval": STRIPE_INTERVAL[price.interval]},
            "metadata": {
                **MANAGED,
                "tier": price.tier.value,
                "interval": price.interval.value,
                **_seats(price),
            },
        }
    # Usage is billed monthly, whatever the interval of the tier's licensed price.
    return {
        **common,
        "unit_amount_decimal": price.unit_amount_decimal,
        "recurring": {"interval": "month", "usage_type": "metered", "meter": meter},
        "metadata": {
            **MANAGED,
            "tier": price.tier.value,
            "interval": BillingInterval.MONTHLY.value,
            "feature": price.feature,
            "usage_type": "metered",
        },
    }


def _price_matches(
    current: stripe.Price, price: Price | MeteredPrice, product: str, meter: str | None
) -> bool:
    recurring = current.recurring
    if current.currency != price.currency or current.product != product or recurring is None:
        return False
    metadata = _metadata(current)
    if isinstance(price, Price):
        return (
            current.unit_amount == price.amount
            and recurring.interval == STRIPE_INTERVAL[price.interval]
            and recurring.usage_type == "licensed"
            and metadata.get("tier") == price.tier.value
            and metadata.get("interval") == price.interval.value
            and metadata.get("per_seat") == _seats(price).get("per_seat")
        )
    return (
        current.unit_amount_decimal is not None
        and Decimal(str(current.unit_amount_decimal)) == Decimal(price.unit_amount_decimal)
        and recurring.usage_type == "metered"
        and recurring.meter == meter
        and metadata.get("tier") == price.tier.value
    )


def _seats(price: Price) -> dict[str, str]:
    """A per-seat price says so in its metadata (its quantity is the seat count)."""
    return {"per_seat": "true"} if price.per_seat else {}


def _metered_key(feature: str) -> str:
    """The key of a metered feature's product among the tiers' (which are tier names)."""
    return f"metered:{feature}"


def _metadata(obj: Any) -> dict[str, str]:
    metadata = getattr(obj, "metadata", None)
    if metadata is None:
        return {}
    return dict(metadata.to_dict() if hasattr(metadata, "to_dict") else metadata)


def _describe_price(price: Price | MeteredPrice) -> str:
    if isinstance(price, Price):
        return f"{price.amount / 100:.2f} {price.currency.upper()}/{STRIPE_INTERVAL[price.interval]}"
    return f"{price.unit_amount_decimal} cents per {price.feature} unit, billed monthly"


def _portal_matches(current: Any, return_url: str) -> bool:
    actual = current.features.to_dict() if hasattr(current.features, "to_dict") else dict(current.features)
    if (current.default_return_url or "") != return_url:
        return False
    wanted_features: dict[str, Any] = dict(portal_features())
    for name, wanted in wanted_features.items():
        have = actual.get(name) or {}
        for key, value in wanted.items():
            have_value = have.get(key)
            if isinstance(value, list):
                if sorted(have_value or []) != sorted(value):
                    return False
            elif isinstance(value, dict):
                have_dict = have_value or {}
                for sub_key, sub_value in value.items():
                    got = have_dict.get(sub_key)
                    if isinstance(sub_value, list):
                        got = sorted(got or [])
                        sub_value = sorted(sub_value)
                    if got != sub_value:
                        return False
            elif have_value != value:
                return False
    return True
