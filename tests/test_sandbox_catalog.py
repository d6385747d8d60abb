"""The sandbox's catalog resources answer the real SDK as Stripe documents: products, prices,
billing meters and meter events, the customer portal, and events. Each test starts from an
empty sandbox (the service's own catalog sync is off in tests).
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import pytest
import stripe

from billing.stripe_gateway import StripeGateway
from stripe_sandbox.resources.meters import metered_quantity
from stripe_sandbox.store import Store
from tests.conftest import Service
from tests.stripe_shapes import missing_keys

DAY = 86400


@pytest.fixture
def gateway(stripe_gateway: StripeGateway) -> StripeGateway:
    return stripe_gateway


async def _product(gateway: StripeGateway, **params: Any) -> stripe.Product:
    return await gateway.v1.products.create_async({"name": "Widget", **params})


async def _price(gateway: StripeGateway, product: str, **params: Any) -> stripe.Price:
    values: Any = {"product": product, "currency": "usd", "unit_amount": 1000, **params}
    return await gateway.v1.prices.create_async({k: v for k, v in values.items() if v is not None})


async def _meter(gateway: StripeGateway, event_name: str = "api_calls", formula: str = "sum") -> Any:
    params: Any = {
        "display_name": "API calls",
        "event_name": event_name,
        "default_aggregation": {"formula": formula},
    }
    return await gateway.v1.billing.meters.create_async(params)


async def _invalid(call: Any) -> stripe.InvalidRequestError:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await call
    return caught.value


# Products and prices -------------------------------------------------------------------------


async def test_a_product_and_its_recurring_price_round_trip(gateway: StripeGateway) -> None:
    product = await _product(gateway, description="A widget", metadata={"tier": "starter"})
    price = await _price(
        gateway,
        product.id,
        currency="USD",
        unit_amount=2900,
        recurring={"interval": "month"},
        lookup_key="widget_monthly",
        nickname="Monthly",
        metadata={"tier": "starter"},
    )
    fetched = await gateway.v1.prices.retrieve_async(price.id)
    assert product.id.startswith("prod_") and price.id.startswith("price_")
    assert (fetched.product, fetched.currency, fetched.unit_amount) == (product.id, "usd", 2900)
    assert fetched.unit_amount_decimal == Decimal("2900")
    assert fetched.type == "recurring" and fetched.active is True
    assert fetched.recurring is not None
    assert (fetched.recurring.interval, fetched.recurring.interval_count) == ("month", 1)
    assert (fetched.recurring.usage_type, fetched.recurring.meter) == ("licensed", None)
    assert (fetched.lookup_key, fetched.nickname, fetched.tax_behavior) == (
        "widget_monthly",
        "Monthly",
        "unspecified",
    )
    assert fetched.metadata.to_dict() == {"tier": "starter"}
    assert "tiers" not in fetched.to_dict()  # includable: only when expanded


async def test_tiers_of_a_tiered_price_are_returned_only_when_expanded(gateway: StripeGateway) -> None:
    product = await _product(gateway)
    tiers: Any = [{"up_to": 10, "unit_amount": 100}, {"up_to": "inf", "unit_amount": 80, "flat_amount": 500}]
    price = await gateway.v1.prices.create_async(
        {
            "product": product.id,
            "currency": "usd",
            "billing_scheme": "tiered",
            "tiers_mode": "graduated",
            "tiers": tiers,
            "recurring": {"interval": "month"},
        }
    )
    plain = await gateway.v1.prices.retrieve_async(price.id)
    expanded = await gateway.v1.prices.retrieve_async(price.id, {"expand": ["tiers"]})
    assert (plain.billing_scheme, plain.tiers_mode, plain.unit_amount) == ("tiered", "graduated", None)
    assert "tiers" not in plain.to_dict()
    assert expanded.tiers is not None
    assert [(t.up_to, t.unit_amount, t.flat_amount) for t in expanded.tiers] == [
        (10, 100, None),
        (None, 80, 500),
    ]


async def test_a_product_update_changes_only_what_is_named(gateway: StripeGateway) -> None:
    product = await _product(gateway, description="Old", metadata={"a": "1", "b": "2"})
    updated = await gateway.v1.products.update_async(
        product.id, {"name": "Gadget", "description": "", "metadata": {"a": "", "c": "3"}}
    )
    fetched = await gateway.v1.products.retrieve_async(product.id)
    assert (updated.name, updated.description) == ("Gadget", None)
    assert fetched.metadata.to_dict() == {"b": "2", "c": "3"}
    assert fetched.active is True and fetched.type == "service"


async def test_products_list_filters_by_active_and_ids(gateway: StripeGateway) -> None:
    kept = await _product(gateway, name="kept")
    archived = await _product(gateway, name="archived", active=False)
    other = await _product(gateway, name="other")
    inactive = await gateway.v1.products.list_async({"active": False})
    by_ids = await gateway.v1.products.list_async({"ids": [kept.id, archived.id]})
    assert [p.id for p in inactive.data] == [archived.id]
    assert [p.id for p in by_ids.data] == [archived.id, kept.id]
    assert other.id not in [p.id for p in by_ids.data]


async def test_a_price_can_create_its_product_and_a_product_its_default_price(gateway: StripeGateway) -> None:
    price = await gateway.v1.prices.create_async(
        {"currency": "usd", "unit_amount": 500, "product_data": {"name": "Inline"}}
    )
    inline = await gateway.v1.products.retrieve_async(str(price.product))
    product = await gateway.v1.products.create_async(
        {"name": "Bundled", "default_price_data": {"currency": "eur", "unit_amount": 700}}
    )
    default = await gateway.v1.prices.retrieve_async(str(product.default_price))
    assert inline.name == "Inline" and price.type == "one_time"
    assert (default.product, default.currency, default.unit_amount) == (product.id, "eur", 700)


async def test_prices_are_filtered_by_lookup_keys(gateway: StripeGateway) -> None:
    product = await _product(gateway)
    first = await _price(gateway, product.id, lookup_key="lk_first")
    second = await _price(gateway, product.id, lookup_key="lk_second")
    await _price(gateway, product.id, lookup_key="lk_third")
    await _price(gateway, product.id)
    found = await gateway.v1.prices.list_async({"lookup_keys": ["lk_first", "lk_second", "lk_unknown"]})
    assert sorted(p.id for p in found.data) == sorted([first.id, second.id])


async def test_a_used_lookup_key_is_refused_unless_transferred(gateway: StripeGateway) -> None:
    product = await _product(gateway)
    old = await _price(gateway, product.id, lookup_key="pro_monthly_test")
    refused = await _invalid(_price(gateway, product.id, unit_amount=1200, lookup_key="pro_monthly_test"))
    new = await _price(
        gateway, product.id, unit_amount=1200, lookup_key="pro_monthly_test", transfer_lookup_key=True
    )
    old_now = await gateway.v1.prices.retrieve_async(old.id)
    found = await gateway.v1.prices.list_async({"lookup_keys": ["pro_monthly_test"]})
    assert refused.http_status == 400
    assert refused.param == "lookup_key"
    assert "already uses that lookup key" in (refused.user_message or "")
    assert old.id in (refused.user_message or "")
    assert old_now.lookup_key is None
    assert new.lookup_key == "pro_monthly_test"
    assert [p.id for p in found.data] == [new.id]


async def test_updating_a_price_to_a_used_lookup_key_needs_a_transfer(gateway: StripeGateway) -> None:
    product = await _product(gateway)
    holder = await _price(gateway, product.id, lookup_key="moving_key")
    other = await _price(gateway, product.id)
    refused = await _invalid(gateway.v1.prices.update_async(other.id, {"lookup_key": "moving_key"}))
    moved = await gateway.v1.prices.update_async(
        other.id, {"lookup_key": "moving_key", "transfer_lookup_key": True}
    )
    assert refused.http_status == 400 and refused.param == "lookup_key"
    assert moved.lookup_key == "moving_key"
    assert (await gateway.v1.prices.retrieve_async(holder.id)).lookup_key is None


async def test_a_price_amount_cannot_change(gateway: StripeGateway) -> None:
    product = await _product(gateway)
    price = await _price(gateway, product.id, unit_amount=1000)
    refused = await _invalid(
        gateway.v1.prices.update_async(price.id, {"unit_amount": 2000})  # type: ignore[typeddict-unknown-key]
    )
    assert (refused.http_status, refused.code, refused.param) == (400, "parameter_unknown", "unit_amount")
    assert (await gateway.v1.prices.retrieve_async(price.id)).unit_amount == 1000


async def test_an_archived_price_is_still_retrievable_with_its_metadata(gateway: StripeGateway) -> None:
    product = await _product(gateway)
    price = await _price(gateway, product.id, recurring={"interval": "year"}, metadata={"tier": "pro"})
    await gateway.v1.prices.update_async(price.id, {"active": False})
    fetched = await gateway.v1.prices.retrieve_async(price.id)
    active = await gateway.v1.prices.list_async({"product": product.id, "active": True})
    archived = await gateway.v1.prices.list_async({"product": product.id, "active": False})
    assert fetched.active is False
    assert fetched.metadata.to_dict() == {"tier": "pro"}
    assert active.data == []
    assert [p.id for p in archived.data] == [price.id]


async def test_the_default_price_of_a_product_cannot_be_archived(gateway: StripeGateway) -> None:
    product = await gateway.v1.products.create_async(
        {"name": "Defaulted", "default_price_data": {"currency": "usd", "unit_amount": 100}}
    )
    refused = await _invalid(gateway.v1.prices.update_async(str(product.default_price), {"active": False}))
    assert refused.http_status == 400 and refused.param == "active"


async def test_a_product_with_prices_cannot_be_deleted(gateway: StripeGateway) -> None:
    priced = await _product(gateway)
    await _price(gateway, priced.id)
    bare = await _product(gateway)
    refused = await _invalid(gateway.v1.products.delete_async(priced.id))
    deleted = await gateway.v1.products.delete_async(bare.id)
    missing = await _invalid(gateway.v1.products.retrieve_async(bare.id))
    assert refused.http_status == 400
    assert deleted.deleted is True
    assert (missing.http_status, missing.code) == (404, "resource_missing")


async def test_price_lists_paginate_newest_first(gateway: StripeGateway) -> None:
    product = await _product(gateway)
    ids = [(await _price(gateway, product.id, unit_amount=100 + i)).id for i in range(5)]
    pages = [await gateway.v1.prices.list_async({"product": product.id, "limit": 2})]
    while pages[-1].has_more:
        after = pages[-1].data[-1].id
        pages.append(
            await gateway.v1.prices.list_async({"product": product.id, "limit": 2, "starting_after": after})
        )
    first = await gateway.v1.prices.list_async({"product": product.id, "limit": 2})
    iterated = [p.id async for p in first.auto_paging_iter()]
    before = await gateway.v1.prices.list_async({"product": product.id, "limit": 2, "ending_before": ids[1]})
    assert [p.id for page in pages for p in page.data] == list(reversed(ids)) == iterated
    assert [len(page.data) for page in pages] == [2, 2, 1]
    assert [p.id for p in before.data] == [ids[3], ids[2]]


async def test_prices_list_by_type_and_recurring(gateway: StripeGateway) -> None:
    product = await _product(gateway)
    monthly = await _price(gateway, product.id, recurring={"interval": "month"})
    yearly = await _price(gateway, product.id, recurring={"interval": "year"})
    once = await _price(gateway, product.id)
    one_time = await gateway.v1.prices.list_async({"product": product.id, "type": "one_time"})
    yearly_only = await gateway.v1.prices.list_async(
        {"product": product.id, "recurring": {"interval": "year"}}
    )
    assert [p.id for p in one_time.data] == [once.id]
    assert [p.id for p in yearly_only.data] == [yearly.id]
    assert monthly.id not in [p.id for p in yearly_only.data]


async def test_lists_expand_the_product_of_each_price(gateway: StripeGateway) -> None:
    product = await _product(gateway, name="Expanded")
    price = await _price(gateway, product.id)
    listed = await gateway.v1.prices.list_async({"product": product.id, "expand": ["data.product"]})
    retrieved = await gateway.v1.prices.retrieve_async(price.id, {"expand": ["product"]})
    plain = await gateway.v1.prices.retrieve_async(price.id)
    assert isinstance(listed.data[0].product, stripe.Product)
    assert listed.data[0].product.name == "Expanded"
    assert isinstance(retrieved.product, stripe.Product) and retrieved.product.id == product.id
    assert plain.product == product.id


# Meters and usage -----------------------------------------------------------------------------


async def test_a_metered_price_needs_an_existing_meter(gateway: StripeGateway) -> None:
    product = await _product(gateway)
    metered: Any = {"interval": "month", "usage_type": "metered"}
    without = await _invalid(_price(gateway, product.id, recurring=metered))
    unknown = await _invalid(_price(gateway, product.id, recurring={**metered, "meter": "mtr_nope"}))
    meter = await _meter(gateway, "metered_price_calls")
    price = await _price(
        gateway,
        product.id,
        unit_amount=None,
        unit_amount_decimal="0.05",
        recurring={**metered, "meter": meter.id},
    )
    assert (without.http_status, without.param) == (400, "recurring[meter]")
    assert (unknown.http_status, unknown.code, unknown.param) == (400, "resource_missing", "recurring[meter]")
    assert price.recurring is not None
    assert (price.recurring.usage_type, price.recurring.meter) == ("metered", meter.id)
    assert (price.unit_amount, price.unit_amount_decimal) == (None, Decimal("0.05"))


async def test_meter_event_names_are_unique_among_active_meters(gateway: StripeGateway) -> None:
    first = await _meter(gateway, "unique_calls")
    refused = await _invalid(_meter(gateway, "unique_calls"))
    await gateway.v1.billing.meters.deactivate_async(first.id)
    second = await _meter(gateway, "unique_calls")
    reactivation = await _invalid(gateway.v1.billing.meters.reactivate_async(first.id))
    inactive = await gateway.v1.billing.meters.list_async({"status": "inactive"})
    deactivated = await gateway.v1.billing.meters.retrieve_async(first.id)
    assert refused.http_status == 400 and refused.param == "event_name"
    assert reactivation.http_status == 400
    assert second.status == "active"
    assert [m.id for m in inactive.data] == [first.id]
    assert deactivated.status == "inactive" and deactivated.status_transitions.deactivated_at is not None
    await gateway.v1.billing.meters.deactivate_async(second.id)
    reactivated = await gateway.v1.billing.meters.reactivate_async(first.id)
    assert reactivated.status == "active" and reactivated.status_transitions.deactivated_at is None


async def test_meter_events_add_up_in_event_summaries(service: Service, gateway: StripeGateway) -> None:
    meter = await _meter(gateway, "summary_calls")
    customer = await gateway.v1.customers.create_async({"name": "user"})
    someone_else = await gateway.v1.customers.create_async({"name": "other"})
    today = int(time.time()) // DAY * DAY
    usage = [(customer.id, today - 2 * DAY + 60, "5"), (customer.id, today - DAY + 120, "7.5")]
    usage += [(customer.id, today - DAY + 3600, "2.5"), (someone_else.id, today - DAY + 60, "100")]
    for who, when, value in usage:
        await gateway.v1.billing.meter_events.create_async(
            {
                "event_name": "summary_calls",
                "payload": {"stripe_customer_id": who, "value": value},
                "timestamp": when,
            }
        )
    total = await gateway.v1.billing.meters.event_summaries.list_async(
        meter.id, {"customer": customer.id, "start_time": today - 3 * DAY, "end_time": today + DAY}
    )
    daily = await gateway.v1.billing.meters.event_summaries.list_async(
        meter.id,
        {
            "customer": customer.id,
            "start_time": today - 3 * DAY,
            "end_time": today + DAY,
            "value_grouping_window": "day",
        },
    )
    assert [s.aggregated_value for s in total.data] == [15]
    assert (total.data[0].start_time, total.data[0].end_time, total.data[0].meter) == (
        today - 3 * DAY,
        today + DAY,
        meter.id,
    )
    assert [(s.start_time, s.aggregated_value) for s in daily.data] == [
        (today - DAY, 10),
        (today - 2 * DAY, 5),
    ]
    store = Store(service.sandbox_db.url, schema=service.sandbox_db.schema)
    try:
        async with store.transaction() as tx:
            billed = await metered_quantity(tx, meter.id, customer.id, today - DAY, today)
    finally:
        await store.dispose()
    assert billed == 10.0


async def test_count_and_last_meters_aggregate_by_their_formula(gateway: StripeGateway) -> None:
    counter = await _meter(gateway, "count_calls", "count")
    latest = await _meter(gateway, "last_seats", "last")
    customer = await gateway.v1.customers.create_async({})
    now = int(time.time())
    for offset, value in ((300, "4"), (200, "9"), (100, "6")):
        for name in ("count_calls", "last_seats"):
            await gateway.v1.billing.meter_events.create_async(
                {
                    "event_name": name,
                    "payload": {"stripe_customer_id": customer.id, "value": value},
                    "timestamp": now - offset,
                }
            )
    window = {"customer": customer.id, "start_time": now // 60 * 60 - 3600, "end_time": now // 60 * 60 + 60}
    counted = await gateway.v1.billing.meters.event_summaries.list_async(counter.id, dict(window))  # type: ignore[arg-type]
    last = await gateway.v1.billing.meters.event_summaries.list_async(latest.id, dict(window))  # type: ignore[arg-type]
    assert counted.data[0].aggregated_value == 3
    assert last.data[0].aggregated_value == 6


async def test_a_meter_event_outside_stripes_time_window_is_refused(gateway: StripeGateway) -> None:
    await _meter(gateway, "window_calls")
    customer = await gateway.v1.customers.create_async({})
    now = int(time.time())

    def event(timestamp: int) -> Any:
        payload = {"stripe_customer_id": customer.id, "value": "1"}
        return gateway.v1.billing.meter_events.create_async(
            {"event_name": "window_calls", "payload": payload, "timestamp": timestamp}
        )

    too_old = await _invalid(event(now - 36 * DAY))
    too_new = await _invalid(event(now + 3600))
    oldest_allowed = await event(now - 34 * DAY)
    assert (too_old.http_status, too_old.param, too_old.code) == (
        400,
        "timestamp",
        "timestamp_too_far_in_past",
    )
    assert (too_new.http_status, too_new.code) == (400, "timestamp_in_future")
    assert oldest_allowed.timestamp == now - 34 * DAY


async def test_meter_events_need_an_active_meter_and_a_known_customer(gateway: StripeGateway) -> None:
    meter = await _meter(gateway, "checked_calls")
    customer = await gateway.v1.customers.create_async({})

    def event(name: str, customer_id: str, value: str = "1") -> Any:
        return gateway.v1.billing.meter_events.create_async(
            {"event_name": name, "payload": {"stripe_customer_id": customer_id, "value": value}}
        )

    unknown_customer = await _invalid(event("checked_calls", "cus_nope"))
    not_a_number = await _invalid(event("checked_calls", customer.id, "lots"))
    no_meter = await _invalid(event("nobody_meters_this", customer.id))
    await gateway.v1.billing.meters.deactivate_async(meter.id)
    inactive = await _invalid(event("checked_calls", customer.id))
    assert (unknown_customer.http_status, unknown_customer.param) == (400, "payload[stripe_customer_id]")
    assert not_a_number.param == "payload[value]"
    assert no_meter.param == "event_name"
    assert inactive.param == "event_name"


async def test_a_repeated_meter_event_identifier_is_refused(gateway: StripeGateway) -> None:
    meter = await _meter(gateway, "dedup_calls")
    customer = await gateway.v1.customers.create_async({})
    params: Any = {
        "event_name": "dedup_calls",
        "identifier": "usage-42",
        "payload": {"stripe_customer_id": customer.id, "value": "3"},
    }
    first = await gateway.v1.billing.meter_events.create_async(params)
    again = await _invalid(gateway.v1.billing.meter_events.create_async(params))
    now = int(time.time()) // 60 * 60
    summary = await gateway.v1.billing.meters.event_summaries.list_async(
        meter.id, {"customer": customer.id, "start_time": now - 3600, "end_time": now + 120}
    )
    assert first.identifier == "usage-42"
    assert (again.http_status, again.code, again.param) == (400, "resource_already_exists", "identifier")
    assert summary.data[0].aggregated_value == 3


async def test_a_cancelled_meter_event_no_longer_counts(gateway: StripeGateway) -> None:
    meter = await _meter(gateway, "cancel_calls")
    customer = await gateway.v1.customers.create_async({})
    for identifier, value in (("keep", "2"), ("drop", "40")):
        await gateway.v1.billing.meter_events.create_async(
            {
                "event_name": "cancel_calls",
                "identifier": identifier,
                "payload": {"stripe_customer_id": customer.id, "value": value},
            }
        )
    adjustment = await gateway.v1.billing.meter_event_adjustments.create_async(
        {"event_name": "cancel_calls", "type": "cancel", "cancel": {"identifier": "drop"}}
    )
    now = int(time.time()) // 60 * 60
    summary = await gateway.v1.billing.meters.event_summaries.list_async(
        meter.id, {"customer": customer.id, "start_time": now - 3600, "end_time": now + 120}
    )
    assert adjustment.cancel is not None and adjustment.cancel.identifier == "drop"
    assert summary.data[0].aggregated_value == 2


async def test_event_summary_times_must_align_with_the_window(gateway: StripeGateway) -> None:
    meter = await _meter(gateway, "aligned_calls")
    customer = await gateway.v1.customers.create_async({})
    today = int(time.time()) // DAY * DAY
    refused = await _invalid(
        gateway.v1.billing.meters.event_summaries.list_async(
            meter.id,
            {
                "customer": customer.id,
                "start_time": today + 3600,
                "end_time": today + DAY,
                "value_grouping_window": "day",
            },
        )
    )
    assert (refused.http_status, refused.param) == (400, "start_time")


# Customer portal -----------------------------------------------------------------------------


async def test_a_portal_session_opens_the_sandbox_portal(service: Service, gateway: StripeGateway) -> None:
    configuration = await gateway.v1.billing_portal.configurations.create_async(
        {
            "features": {
                "invoice_history": {"enabled": True},
                "subscription_cancel": {"enabled": True, "mode": "immediately"},
            },
            "business_profile": {"headline": "Acme billing"},
            "default_return_url": "https://app.test/account",
        }
    )
    customer = await gateway.v1.customers.create_async({})
    session = await gateway.v1.billing_portal.sessions.create_async(
        {"customer": customer.id, "configuration": configuration.id}
    )
    stored = await gateway.v1.billing_portal.configurations.retrieve_async(configuration.id)
    assert stored.features.subscription_cancel.mode == "immediately"
    assert stored.features.invoice_history.enabled is True
    assert stored.features.payment_method_update.enabled is False
    assert stored.business_profile.headline == "Acme billing"
    assert session.id.startswith("bps_")
    assert session.url == f"{service.url}/sandbox/portal/{session.id}"
    assert (session.customer, session.configuration) == (customer.id, configuration.id)
    assert session.return_url == "https://app.test/account"


async def test_a_portal_session_without_configuration_uses_the_default(gateway: StripeGateway) -> None:
    customer = await gateway.v1.customers.create_async({})
    session_params: Any = {"customer": customer.id, "return_url": "https://app.test/back"}
    before_any = await _invalid(gateway.v1.billing_portal.sessions.create_async(session_params))
    features: Any = {"invoice_history": {"enabled": True}}
    first = await gateway.v1.billing_portal.configurations.create_async({"features": features})
    second = await gateway.v1.billing_portal.configurations.create_async({"features": features})
    session = await gateway.v1.billing_portal.sessions.create_async(session_params)
    defaults = await gateway.v1.billing_portal.configurations.list_async({"is_default": True})
    unknown = await _invalid(
        gateway.v1.billing_portal.sessions.create_async({**session_params, "customer": "cus_nope"})
    )
    assert before_any.http_status == 400 and "customer portal settings" in (before_any.user_message or "")
    assert (first.is_default, second.is_default) == (True, False)
    assert [c.id for c in defaults.data] == [first.id]
    assert session.configuration == first.id
    assert (unknown.http_status, unknown.code, unknown.param) == (400, "resource_missing", "customer")


async def test_a_portal_configuration_update_merges_features(gateway: StripeGateway) -> None:
    configuration = await gateway.v1.billing_portal.configurations.create_async(
        {"features": {"customer_update": {"enabled": True, "allowed_updates": ["email"]}}}
    )
    updated = await gateway.v1.billing_portal.configurations.update_async(
        configuration.id,
        {"features": {"subscription_cancel": {"enabled": True}}, "active": False, "metadata": {"k": "v"}},
    )
    inactive = await gateway.v1.billing_portal.configurations.list_async({"active": False})
    assert updated.features.customer_update.allowed_updates == ["email"]
    assert updated.features.subscription_cancel.enabled is True
    assert (
        updated.active is False and updated.metadata is not None and updated.metadata.to_dict() == {"k": "v"}
    )
    assert [c.id for c in inactive.data] == [configuration.id]


# Events --------------------------------------------------------------------------------------


async def test_changes_are_recorded_as_events(gateway: StripeGateway) -> None:
    product = await _product(gateway, name="Evented")
    price = await _price(gateway, product.id)
    await gateway.v1.prices.update_async(price.id, {"nickname": "renamed"})
    created = await gateway.v1.events.list_async({"type": "product.created", "limit": 100})
    price_events = await gateway.v1.events.list_async({"type": "price.*", "limit": 100})
    either = await gateway.v1.events.list_async({"types": ["price.updated", "product.created"], "limit": 1})
    fetched = await gateway.v1.events.retrieve_async(price_events.data[0].id)
    assert {e.type for e in created.data} == {"product.created"}
    assert product.id in [e.data.object["id"] for e in created.data]
    assert [e.type for e in price_events.data][:2] == ["price.updated", "price.created"]
    assert fetched.data.object["nickname"] == "renamed"
    assert fetched.data.previous_attributes is not None
    assert fetched.data.previous_attributes["nickname"] is None
    assert [e.type for e in either.data] == ["price.updated"] and either.has_more is True
    assert (await _invalid(gateway.v1.events.retrieve_async("evt_nope"))).http_status == 404


# Shapes ---------------------------------------------------------------------------------------


async def test_every_object_has_stripes_shape(gateway: StripeGateway) -> None:
    product = await _product(gateway)
    price = await _price(gateway, product.id, recurring={"interval": "month"})
    meter = await _meter(gateway, "shape_calls")
    customer = await gateway.v1.customers.create_async({})
    meter_event = await gateway.v1.billing.meter_events.create_async(
        {"event_name": "shape_calls", "payload": {"stripe_customer_id": customer.id, "value": "1"}}
    )
    now = int(time.time()) // 60 * 60
    summaries = await gateway.v1.billing.meters.event_summaries.list_async(
        meter.id, {"customer": customer.id, "start_time": now - 60, "end_time": now + 60}
    )
    configuration = await gateway.v1.billing_portal.configurations.create_async(
        {"features": {"invoice_history": {"enabled": True}}}
    )
    session = await gateway.v1.billing_portal.sessions.create_async(
        {"customer": customer.id, "configuration": configuration.id, "return_url": "https://app.test"}
    )
    event = (await gateway.v1.events.list_async({"limit": 1})).data[0]
    objects = {
        "product": product,
        "price": price,
        "billing.meter": meter,
        "billing.meter_event": meter_event,
        "billing.meter_event_summary": summaries.data[0],
        "billing_portal.configuration": configuration,
        "billing_portal.session": session,
        "event": event,
    }
    for object_type, obj in objects.items():
        assert obj.object == object_type
        assert missing_keys(obj, object_type) == [], object_type
