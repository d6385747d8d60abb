"""Stripe failing on purpose: the sandbox's fault controls, and a gateway that turns a fault on
at the call it names."""

from __future__ import annotations

from typing import Any

import httpx

from billing.stripe_gateway import StripeGateway
from tests.billing_flows import control
from tests.conftest import Service
from tests.gateways import sandbox_config


async def inject(service: Service, **fault: Any) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{service.url}/sandbox/_control/faults", json=fault)
    assert response.status_code == 200, response.text


async def clear_faults(service: Service) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.delete(f"{service.url}/sandbox/_control/faults")
    assert response.status_code == 200, response.text


class FaultyAt(StripeGateway):
    """The project's gateway, with Stripe failing from the call named `what` on (for `count` requests).

    `fault` adds to or overrides the fault injected (`status`, `after_apply`, `seconds`, ...);
    `config` to the gateway's configuration.
    """

    def __init__(
        self,
        service: Service,
        what: str,
        path_prefix: str,
        count: int,
        *,
        config: dict[str, Any] | None = None,
        **fault: Any,
    ) -> None:
        super().__init__(sandbox_config(service.url, **{"max_network_retries": 1, **(config or {})}))
        self.service, self.what, self.path_prefix, self.count = service, what, path_prefix, count
        self.fault = fault

    async def call(
        self, operation: Any, *, idempotency_key: str | None = None, what: str = "stripe call"
    ) -> Any:
        if what == self.what:
            fault = {"path_prefix": self.path_prefix, "status": 500, "count": self.count, **self.fault}
            await control(self.service, "faults", fault)
        return await super().call(operation, idempotency_key=idempotency_key, what=what)
