"""A Stripe stand-in on its own loopback port, reached as Stripe is: a test key and STRIPE_API_BASE.

The service under test runs with `STRIPE_SECRET_KEY=sk_test_...` (not in sandbox mode) and sees
only the URL; the sandbox delivers events to the webhook endpoints registered with it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from starlette.applications import Starlette
from starlette.routing import Mount

from billing.settings import Settings
from billing.stripe_gateway import StripeGateway
from db.engine import Database
from stripe_sandbox.api import SandboxConfig
from stripe_sandbox.app import Sandbox
from stripe_sandbox.store import events, idempotency, objects, state
from tests.conftest import DbTarget, Service, free_port, serve
from tests.gateways import SHORT_RETRIES, gateway_at

TEST_KEY = "sk_test_going_live_tests"


@dataclass
class StripeHost:
    url: str  # the host; the API is at url + "/sandbox"
    sandbox: Sandbox
    gateway: StripeGateway

    @property
    def api_base(self) -> str:
        return f"{self.url}/sandbox"

    def as_service(self, database: Database, sandbox_db: DbTarget) -> Service:
        """For tests/billing_flows.py, whose helpers reach the sandbox's controls through a Service."""
        return Service(url=self.url, app=None, database=database, sandbox_db=sandbox_db)

    def env(self, **more: str) -> dict[str, str]:
        """The environment of a `billing` command that uses this Stripe."""
        return {"STRIPE_SECRET_KEY": TEST_KEY, "STRIPE_API_BASE": self.api_base, **more}

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "stripe_secret_key": TEST_KEY,
            "stripe_api_base": self.api_base,
            "app_url": "http://app.test",
            **overrides,
        }
        return Settings(**values)

    async def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of the sandbox's objects, events, idempotency keys and state."""
        found: dict[str, list[tuple[Any, ...]]] = {}
        async with self.sandbox.store.engine.connect() as conn:
            for table in (objects, events, idempotency, state):
                rows = (await conn.execute(select(table))).all()
                found[table.name] = sorted((tuple(row) for row in rows), key=repr)
        return found


def host_gateway(api_base: str) -> StripeGateway:
    return gateway_at(api_base, api_key=TEST_KEY, **{**SHORT_RETRIES, "timeout_seconds": 10})


@asynccontextmanager
async def stripe_host(
    sandbox_db: DbTarget, *, default_webhook_url: str, deliver: bool = True
) -> AsyncIterator[StripeHost]:
    """The sandbox alone, mounted at /sandbox; with no endpoint registered it delivers to
    `default_webhook_url` (signed with a secret nobody else knows). `deliver=False`: it keeps
    its events (for tests that compare its tables before and after)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sandbox = Sandbox(
        SandboxConfig(
            database_url=sandbox_db.url,
            schema=sandbox_db.schema,
            public_base_url=url,
            webhook_secret="whsec_the_sandbox_default_nobody_knows",
            webhook_url=default_webhook_url,
            deliver_webhooks=deliver,
        )
    )
    sandbox.delivery.base_delay = 0.05
    sandbox.delivery.max_delay = 1.0
    sandbox.delivery.poll_interval = 0.05
    await sandbox.start()
    gateway = host_gateway(f"{url}/sandbox")
    try:
        async with serve(Starlette(routes=[Mount("/sandbox", app=sandbox)]), port):
            yield StripeHost(url=url, sandbox=sandbox, gateway=gateway)
    finally:
        await gateway.close()
        await sandbox.stop()
