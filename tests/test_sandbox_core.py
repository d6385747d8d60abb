"""The sandbox answers the real SDK as Stripe would: validation, 404s, pagination, idempotency."""

from __future__ import annotations

import httpx
import pytest
import stripe

from billing.stripe_gateway import StripeGateway
from tests.conftest import Service


async def test_a_customer_round_trips(stripe_gateway: StripeGateway) -> None:
    created = await stripe_gateway.v1.customers.create_async(
        {"email": "a@example.com", "metadata": {"userId": "u1"}}
    )
    fetched = await stripe_gateway.v1.customers.retrieve_async(created.id)
    assert created.id.startswith("cus_")
    assert fetched.email == "a@example.com"
    assert fetched.metadata.to_dict() == {"userId": "u1"}


async def test_a_misspelled_parameter_is_stripes_parameter_unknown(stripe_gateway: StripeGateway) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await stripe_gateway.v1.customers.create_async({"emial": "a@example.com"})  # type: ignore[typeddict-unknown-key]
    assert caught.value.http_status == 400
    assert caught.value.code == "parameter_unknown"
    assert caught.value.param == "emial"


async def test_a_missing_object_is_resource_missing(stripe_gateway: StripeGateway) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await stripe_gateway.v1.customers.retrieve_async("cus_nope")
    assert caught.value.http_status == 404
    assert caught.value.code == "resource_missing"


async def test_lists_paginate_newest_first(stripe_gateway: StripeGateway) -> None:
    ids = [(await stripe_gateway.v1.customers.create_async({"name": f"c{i}"})).id for i in range(5)]
    first = await stripe_gateway.v1.customers.list_async({"limit": 2})
    second = await stripe_gateway.v1.customers.list_async({"limit": 2, "starting_after": first.data[-1].id})
    last = await stripe_gateway.v1.customers.list_async({"limit": 2, "starting_after": second.data[-1].id})
    seen = [c.id for page in (first, second, last) for c in page.data]
    assert seen == list(reversed(ids))
    assert (first.has_more, second.has_more, last.has_more) == (True, True, False)


async def test_search_by_metadata(stripe_gateway: StripeGateway) -> None:
    await stripe_gateway.v1.customers.create_async({"metadata": {"userId": "u1"}})
    wanted = await stripe_gateway.v1.customers.create_async({"metadata": {"userId": "u2"}})
    found = await stripe_gateway.v1.customers.search_async({"query": "metadata['userId']:'u2'"})
    assert [c.id for c in found.data] == [wanted.id]


async def test_an_idempotency_key_replays_the_first_response(stripe_gateway: StripeGateway) -> None:
    first = await stripe_gateway.v1.customers.create_async({"name": "a"}, {"idempotency_key": "k1"})
    again = await stripe_gateway.v1.customers.create_async({"name": "a"}, {"idempotency_key": "k1"})
    listed = await stripe_gateway.v1.customers.list_async()
    assert again.id == first.id
    assert len(listed.data) == 1


async def test_an_idempotency_key_with_other_parameters_is_refused(stripe_gateway: StripeGateway) -> None:
    await stripe_gateway.v1.customers.create_async({"name": "a"}, {"idempotency_key": "k2"})
    with pytest.raises(stripe.IdempotencyError):
        await stripe_gateway.v1.customers.create_async({"name": "b"}, {"idempotency_key": "k2"})


async def test_a_request_without_a_test_key_is_401(service: Service) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{service.url}/sandbox/v1/customers")
    assert response.status_code == 401


async def test_a_deleted_customer_is_a_retrievable_stub_and_leaves_lists(
    stripe_gateway: StripeGateway,
) -> None:
    customer = await stripe_gateway.v1.customers.create_async({"email": "gone@example.com"})
    deleted = await stripe_gateway.v1.customers.delete_async(customer.id)
    again = await stripe_gateway.v1.customers.retrieve_async(customer.id)
    assert deleted.deleted is True
    assert again["deleted"] is True and again.id == customer.id
    assert (await stripe_gateway.v1.customers.list_async()).data == []
    with pytest.raises(stripe.InvalidRequestError) as caught:
        await stripe_gateway.v1.customers.update_async(customer.id, {"name": "back"})
    assert caught.value.code == "resource_missing"
