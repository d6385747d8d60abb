"""The sandbox's webhook endpoints, as Stripe documents them, and delivery to each of them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import stripe

from db.engine import Database
from tests.conftest import DbTarget
from tests.hooked import Hooked, created_for, hooked_service
from tests.stripe_shapes import missing_keys, stripe_fixture
from tests.webhook_receiver import WebhookReceiver, run_receiver

EVENTS: list[str] = ["customer.created", "customer.updated"]


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[WebhookReceiver, WebhookReceiver, WebhookReceiver]]:
    """The service's own route (the default), and two endpoints to register."""
    async with run_receiver() as own, run_receiver() as first, run_receiver() as second:
        yield own, first, second


@pytest.fixture
async def hooked(
    database: Database,
    sandbox_db: DbTarget,
    receivers: tuple[WebhookReceiver, WebhookReceiver, WebhookReceiver],
) -> AsyncIterator[Hooked]:
    async with hooked_service(database, sandbox_db, receivers[0]) as running:
        yield running


async def test_create_returns_the_secret_once_and_the_shape_is_stripes(hooked: Hooked) -> None:
    v1 = hooked.gateway.v1
    created = await v1.webhook_endpoints.create_async(
        {
            "url": "https://example.com/hook",
            "enabled_events": ["customer.created"],
            "api_version": "2026-10-28.endive",
            "metadata": {"managed_by": "tests"},
        }
    )
    assert created.secret is not None and created.secret.startswith("whsec_")
    assert created.status == "enabled"
    assert created.api_version == "2026-10-28.endive"
    assert missing_keys(created, "webhook_endpoint") == []
    assert set(created.to_dict()) == set(stripe_fixture("webhook_endpoint")) | {"secret"}

    fetched = await v1.webhook_endpoints.retrieve_async(created.id)
    listed = await v1.webhook_endpoints.list_async({"limit": 10})
    assert "secret" not in fetched.to_dict()
    assert [item.id for item in listed.data] == [created.id]
    assert "secret" not in listed.data[0].to_dict()

    updated = await v1.webhook_endpoints.update_async(
        created.id, {"disabled": True, "enabled_events": ["*"], "url": "https://example.com/other"}
    )
    assert (updated.status, updated.enabled_events, updated.url) == (
        "disabled",
        ["*"],
        "https://example.com/other",
    )
    assert updated.api_version == "2026-10-28.endive"  # cannot be changed
    assert "secret" not in updated.to_dict()

    deleted = await v1.webhook_endpoints.delete_async(created.id)
    assert deleted.deleted is True
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await v1.webhook_endpoints.retrieve_async(created.id)
    assert missing.value.code == "resource_missing"


@pytest.mark.parametrize(
    "events",
    [["customer.created", "not.an.event"], [], ["*", "customer.created"]],
    ids=["unknown", "none", "star-and-more"],
)
async def test_enabled_events_must_be_stripes_event_names(hooked: Hooked, events: list[str]) -> None:
    with pytest.raises(stripe.InvalidRequestError) as refused:
        await hooked.gateway.v1.webhook_endpoints.create_async(
            {"url": "https://example.com/hook", "enabled_events": events}  # type: ignore[typeddict-item]
        )
    assert refused.value.param is not None and refused.value.param.startswith("enabled_events")
    assert (await hooked.gateway.v1.webhook_endpoints.list_async()).data == []


async def test_every_enabled_endpoint_gets_the_events_it_wants_signed_with_its_own_secret(
    hooked: Hooked, receivers: tuple[WebhookReceiver, WebhookReceiver, WebhookReceiver]
) -> None:
    own, first, second = receivers
    v1 = hooked.gateway.v1
    one = await v1.webhook_endpoints.create_async({"url": first.url, "enabled_events": ["*"]})
    two = await v1.webhook_endpoints.create_async({"url": second.url, "enabled_events": ["customer.created"]})
    assert one.secret and two.secret and one.secret != two.secret

    customer = await v1.customers.create_async({"email": "a@example.com"})
    await v1.customers.update_async(customer.id, {"name": "A"})
    await hooked.control("POST", "/_control/delivery/flush", {"timeout": 10})
    await first.settle(quiet=0.3)

    assert sorted(d.event["type"] for d in first.deliveries) == ["customer.created", "customer.updated"]
    assert [d.event["type"] for d in second.deliveries] == ["customer.created"]
    assert own.deliveries == []  # endpoints are registered: the default route gets nothing
    for delivery in first.deliveries:
        stripe.Webhook.construct_event(delivery.body, delivery.signature, one.secret)
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.Webhook.construct_event(delivery.body, delivery.signature, two.secret)
    [created] = created_for(second, customer.id)
    stripe.Webhook.construct_event(created.body, created.signature, two.secret)

    await v1.webhook_endpoints.update_async(two.id, {"disabled": True})
    later = await v1.customers.create_async({"email": "b@example.com"})
    await hooked.control("POST", "/_control/delivery/flush", {"timeout": 10})
    await first.settle(quiet=0.3)
    assert len(created_for(first, later.id)) == 1
    assert created_for(second, later.id) == []  # disabled


async def test_a_retry_goes_only_to_the_endpoint_that_failed(
    hooked: Hooked, receivers: tuple[WebhookReceiver, WebhookReceiver, WebhookReceiver]
) -> None:
    _own, first, second = receivers
    v1 = hooked.gateway.v1
    await v1.webhook_endpoints.create_async({"url": first.url, "enabled_events": ["customer.created"]})
    await v1.webhook_endpoints.create_async({"url": second.url, "enabled_events": ["customer.created"]})
    answers = iter([500])

    async def flaky(_delivery: object) -> int:
        return next(answers, 200)

    second.respond = flaky
    customer = await v1.customers.create_async({"email": "c@example.com"})
    drained = await hooked.control("POST", "/_control/delivery/flush", {"timeout": 10})
    await first.settle(quiet=0.3)

    assert drained["pending"] == 0 and drained["failed"] == 0
    assert len(created_for(first, customer.id)) == 1
    assert [d.status for d in created_for(second, customer.id)] == [500, 200]


async def test_with_every_endpoint_deleted_delivery_goes_back_to_the_service(
    hooked: Hooked, receivers: tuple[WebhookReceiver, WebhookReceiver, WebhookReceiver]
) -> None:
    own, first, _second = receivers
    v1 = hooked.gateway.v1
    registered = await v1.webhook_endpoints.create_async({"url": first.url, "enabled_events": EVENTS})
    await v1.webhook_endpoints.delete_async(registered.id)
    customer = await v1.customers.create_async({"email": "d@example.com"})
    await hooked.control("POST", "/_control/delivery/flush", {"timeout": 10})
    await own.settle(quiet=0.3)
    assert len(created_for(own, customer.id)) == 1
    assert first.deliveries == []
