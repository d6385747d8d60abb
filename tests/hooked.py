"""The service with its sandbox delivering to a test receiver (`hooked_service`), for the
sandbox's delivery tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import httpx
from sqlalchemy import select

from billing.stripe_gateway import StripeGateway
from db.engine import Database
from stripe_sandbox.app import Sandbox
from stripe_sandbox.store import events
from tests.conftest import DbTarget, free_port, serve, service_settings
from tests.gateways import sandbox_gateway
from tests.webhook_receiver import Delivery, WebhookReceiver

SECRET = "whsec_delivery_tests_0123456789abcdef"
THIRTY_DAYS = 30 * 24 * 3600


@dataclass
class Hooked:
    """The service with its sandbox delivering to a test receiver."""

    url: str
    sandbox: Sandbox
    receiver: WebhookReceiver
    gateway: StripeGateway

    async def control(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.request(method, f"{self.url}/sandbox{path}", json=body)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def outbox(self) -> list[dict[str, Any]]:
        async with self.sandbox.store.engine.connect() as conn:
            rows = await conn.execute(select(events).order_by(events.c.seq))
            return [dict(row._mapping) for row in rows]


def new_gateway(url: str) -> StripeGateway:
    return sandbox_gateway(url, max_network_retries=0, timeout_seconds=5, rate_limit_base_delay=0.01)


@asynccontextmanager
async def hooked_service(
    database: Database, sandbox_db: DbTarget, receiver: WebhookReceiver, **config: Any
) -> AsyncIterator[Hooked]:
    """Like conftest's `service`, with delivery pointed at `receiver` and short retry delays."""
    from graph.app import create_app, sandbox_config

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = service_settings(url, stripe_webhook_secret=SECRET)
    sandbox = replace(
        sandbox_config(settings),
        database_url=sandbox_db.url,
        schema=sandbox_db.schema,
        webhook_url=receiver.url,
        **config,
    )
    app = create_app(settings, database=database, sandbox=sandbox)
    running: Sandbox = app.state.sandbox
    running.delivery.base_delay = 0.01
    running.delivery.poll_interval = 0.05
    async with serve(app, port):
        gateway = new_gateway(url)
        try:
            yield Hooked(url=url, sandbox=running, receiver=receiver, gateway=gateway)
        finally:
            await gateway.close()


def created_for(receiver: WebhookReceiver, customer_id: str) -> list[Delivery]:
    return [d for d in receiver.of_type("customer.created") if d.event["data"]["object"]["id"] == customer_id]


def customer_of(delivery: Delivery) -> str:
    return str(delivery.event["data"]["object"]["id"])
