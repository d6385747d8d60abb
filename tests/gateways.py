"""The project's gateway (the real Stripe SDK) pointed at a sandbox, as the tests drive it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from billing.stripe_gateway import GatewayConfig, StripeGateway

SANDBOX_KEY = "sk_test_tests"  # the sandbox takes any test-mode key
# One SDK retry (two requests per call), a 5 s timeout and short backoffs.
SHORT_RETRIES: dict[str, Any] = {
    "max_network_retries": 1,
    "timeout_seconds": 5,
    "rate_limit_base_delay": 0.01,
}


def gateway_config(api_base: str, **config: Any) -> GatewayConfig:
    """The configuration of a gateway on the sandbox answering at `api_base`; `config` sets its
    other fields (retries, timeout, backoff, the key), the defaults being the service's own."""
    return GatewayConfig(**{"api_key": SANDBOX_KEY, "api_base": api_base, **config})


def gateway_at(api_base: str, **config: Any) -> StripeGateway:
    """A gateway on the sandbox answering at `api_base` (a standalone one, `gateway_config`)."""
    return StripeGateway(gateway_config(api_base, **config))


def sandbox_config(service_url: str, **config: Any) -> GatewayConfig:
    """`gateway_config` for the sandbox mounted by the service at `service_url`."""
    return gateway_config(f"{service_url}/sandbox", **config)


def sandbox_gateway(service_url: str, **config: Any) -> StripeGateway:
    """A gateway on the sandbox of the service at `service_url` (`sandbox_config`)."""
    return StripeGateway(sandbox_config(service_url, **config))


@asynccontextmanager
async def open_sandbox_gateway(service_url: str, **config: Any) -> AsyncIterator[StripeGateway]:
    """`sandbox_gateway` for the block, closed after it."""
    gateway = sandbox_gateway(service_url, **config)
    try:
        yield gateway
    finally:
        await gateway.close()
