"""The gateway maps Stripe's failures to stable domain codes and retries with the same key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from billing.errors import BillingError, ErrorCode
from billing.stripe_gateway import GatewayConfig, StripeGateway, idempotency_key
from tests.conftest import Service
from tests.gateways import open_sandbox_gateway


async def inject(service: Service, **fault: Any) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{service.url}/sandbox/_control/faults", json=fault)
    assert response.status_code == 200, response.text


@pytest.fixture
async def quick_gateway(service: Service) -> AsyncIterator[StripeGateway]:
    """A gateway with a short timeout, so the timeout faults stay fast."""
    async with open_sandbox_gateway(
        service.url, max_network_retries=1, timeout_seconds=0.5, rate_limit_base_delay=0.01
    ) as gateway:
        yield gateway


async def create_customer(gateway: StripeGateway, key: str = "customer-1") -> str:
    customer = await gateway.call(
        lambda o: gateway.v1.customers.create_async({"metadata": {"userId": "u1"}}, o),
        idempotency_key=idempotency_key("test.customer", key),
    )
    return customer.id


async def customer_count(gateway: StripeGateway) -> int:
    return len((await gateway.v1.customers.list_async({"limit": 100})).data)


async def test_a_5xx_is_retried_with_the_same_key_and_succeeds(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    await inject(service, path_prefix="/v1/customers", status=500, count=1)
    await create_customer(stripe_gateway)
    assert await customer_count(stripe_gateway) == 1


async def test_persistent_5xx_is_provider_unavailable(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    await inject(service, path_prefix="/v1/customers", status=500, count=5)
    with pytest.raises(BillingError) as caught:
        await create_customer(stripe_gateway)
    assert caught.value.code is ErrorCode.BILLING_PROVIDER_UNAVAILABLE


async def test_429_backs_off_and_retries(service: Service, stripe_gateway: StripeGateway) -> None:
    await inject(service, path_prefix="/v1/customers", status=429, count=2)
    await create_customer(stripe_gateway)
    assert await customer_count(stripe_gateway) == 1


async def test_429_after_the_backoff_is_provider_unavailable(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    await inject(service, path_prefix="/v1/customers", status=429, count=20)
    with pytest.raises(BillingError) as caught:
        await create_customer(stripe_gateway)
    assert caught.value.code is ErrorCode.BILLING_PROVIDER_UNAVAILABLE


async def test_a_declined_card_is_card_declined(service: Service, stripe_gateway: StripeGateway) -> None:
    await inject(service, path_prefix="/v1/customers", status=402, code="card_declined", count=1)
    with pytest.raises(BillingError) as caught:
        await create_customer(stripe_gateway)
    assert caught.value.code is ErrorCode.CARD_DECLINED


async def test_a_timeout_is_provider_unavailable(service: Service, quick_gateway: StripeGateway) -> None:
    await inject(service, path_prefix="/v1/customers", status="timeout", seconds=2, count=2)
    with pytest.raises(BillingError) as caught:
        await create_customer(quick_gateway)
    assert caught.value.code is ErrorCode.BILLING_PROVIDER_UNAVAILABLE


async def test_a_reset_connection_is_retried(service: Service, stripe_gateway: StripeGateway) -> None:
    await inject(service, path_prefix="/v1/customers", status="reset", count=1)
    await create_customer(stripe_gateway)
    assert await customer_count(stripe_gateway) == 1


async def test_a_lost_response_after_the_change_does_not_duplicate(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    await inject(service, path_prefix="/v1/customers", status="reset", after_apply=True, count=1)
    customer_id = await create_customer(stripe_gateway)
    assert await customer_count(stripe_gateway) == 1
    assert (await stripe_gateway.v1.customers.retrieve_async(customer_id)).id == customer_id


async def test_a_lost_response_then_a_later_call_with_the_same_key_replays(
    service: Service, stripe_gateway: StripeGateway
) -> None:
    await inject(service, path_prefix="/v1/customers", status=500, after_apply=True, count=2)
    with pytest.raises(BillingError):
        await create_customer(stripe_gateway)  # applied at Stripe, both answers lost
    again = await create_customer(stripe_gateway)  # e.g. the user clicks again
    assert await customer_count(stripe_gateway) == 1
    assert again.startswith("cus_")


async def test_our_own_bad_request_is_invalid_request(stripe_gateway: StripeGateway) -> None:
    with pytest.raises(BillingError) as caught:
        await stripe_gateway.call(
            lambda o: stripe_gateway.v1.customers.retrieve_async("cus_missing", None, o)
        )
    assert caught.value.code is ErrorCode.INVALID_REQUEST


def test_deterministic_keys_differ_by_part() -> None:
    assert idempotency_key("customer", "u1") == idempotency_key("customer", "u1")
    assert idempotency_key("customer", "u1") != idempotency_key("customer", "u2")
    assert idempotency_key("customer", "u1") != idempotency_key("checkout", "u1")


def test_the_gateway_configuration_never_shows_its_key() -> None:
    config = GatewayConfig(api_key="sk_test_do_not_print_me", api_base="http://127.0.0.1:9")
    assert "do_not_print_me" not in repr(config)
    assert "do_not_print_me" not in str(StripeGateway(config).config)
