"""The whole service in sandbox mode, driven as a user and Stripe would drive it.

`Live` is what the `live` fixture (tests/conftest.py) gives a test: the service on a loopback
port, the project's gateway (the real SDK) on its sandbox, and the shipped catalog synced into
the sandbox. A module that needs the service set up otherwise overrides the `live_options`
fixture; `start_live` starts a second kind in the same module.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import select

from billing.notifier import Notification, NotificationKind, Notifier
from billing.stripe_gateway import StripeGateway
from billing.stripe_objects import stripe_time
from db.engine import Database
from db.models import account_table, quote_table
from tests.billing_flows import control, settle, setup_catalog, subscribe, wait_for_account
from tests.conftest import DbTarget, Service, running_service
from tests.gateways import open_sandbox_gateway
from tests.graphql_support import hs256_token
from tests.stripe_faults import clear_faults, inject

SUBSCRIPTION = """
  status tier interval priceId currentPeriodStart currentPeriodEnd cancelAtPeriodEnd canceledAt
  pendingChange { tier interval effectiveAt }
"""
PREVIEW = """mutation($tier: Tier!, $interval: BillingInterval!) {
  previewPlanChange(tier: $tier, interval: $interval) {
    tier interval immediate effectiveAt currency amountDue nextInvoiceAmount nextInvoiceAt
    lines { description amount proration periodStart periodEnd }
  }
}"""
CHANGE = f"""mutation($tier: Tier!, $interval: BillingInterval!) {{
  changePlan(tier: $tier, interval: $interval) {{ {SUBSCRIPTION} }}
}}"""
VIEWER = f"{{ viewer {{ subscription {{ {SUBSCRIPTION} }} }} }}"
# What the sync writes: a mutation that fails must leave all of it as it was.
STATE_COLUMNS = (
    "stripe_customer_id",
    "stripe_subscription_id",
    "stripe_price_id",
    "tier",
    "interval",
    "status",
    "current_period_start",
    "current_period_end",
    "cancel_at_period_end",
    "canceled_at",
    "stripe_schedule_id",
    "pending_tier",
    "pending_interval",
    "pending_change_at",
)


class Recorder:
    """A notifier that keeps what the service sends."""

    def __init__(self) -> None:
        self.sent: list[Notification] = []

    async def notify(self, notification: Notification) -> None:
        self.sent.append(notification)

    def kinds(self) -> list[NotificationKind]:
        return [n.kind for n in self.sent]

    async def wait_for(self, kind: NotificationKind) -> Notification:
        """Notifications follow events, which arrive in any order: wait a little."""
        for _ in range(400):
            for notification in self.sent:
                if notification.kind is kind:
                    return notification
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {kind} notification; got {self.kinds()}")


@dataclass(frozen=True)
class LiveOptions:
    """How a live service differs from the default one."""

    settings: dict[str, Any] = field(default_factory=dict)  # the service's (billing.settings.Settings)
    sandbox: dict[str, Any] = field(default_factory=dict)  # fields of the sandbox's configuration
    notifier: Notifier | None = None  # None: the service's own
    delivery: str | None = None  # the sandbox's delivery mode, set before the catalog is synced


@dataclass
class Live:
    service: Service
    gateway: StripeGateway
    prices: dict[str, str]  # lookup key -> price id

    async def graphql(
        self,
        user_id: str | None,
        query: str,
        variables: dict[str, Any] | None = None,
        *,
        token: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token or hs256_token(user_id)}"} if (token or user_id) else {}
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.post(
                f"{self.service.url}/graphql",
                json={"query": query, "variables": variables or {}},
                headers=headers,
            )
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    async def preview(self, user_id: str, tier: str, interval: str) -> dict[str, Any]:
        result = await self.graphql(user_id, PREVIEW, {"tier": tier, "interval": interval})
        assert "errors" not in result, result
        preview: dict[str, Any] = result["data"]["previewPlanChange"]
        return preview

    async def change(self, user_id: str, tier: str, interval: str) -> dict[str, Any]:
        result = await self.graphql(user_id, CHANGE, {"tier": tier, "interval": interval})
        assert "errors" not in result, result
        subscription: dict[str, Any] = result["data"]["changePlan"]
        return subscription

    async def viewer(self, user_id: str) -> dict[str, Any]:
        result = await self.graphql(user_id, VIEWER)
        assert "errors" not in result, result
        subscription: dict[str, Any] = result["data"]["viewer"]["subscription"]
        return subscription

    async def subscribe(self, user_id: str, lookup_key: str) -> tuple[str, str]:
        """An active subscription (no trial), synced into the database."""
        tier, interval = lookup_key.split("_")
        ids = await subscribe(self.service, self.gateway, self.prices, user_id, lookup_key, trial_days=None)
        await wait_for_account(self.service.database, user_id, status="active", tier=tier, interval=interval)
        return ids

    async def settle(self) -> None:
        """Every event delivered and applied: nothing else calls Stripe or writes the account now."""
        await settle(self.service.url, self.service.database)

    async def subscription(self, subscription_id: str) -> Any:
        return await self.gateway.v1.subscriptions.retrieve_async(subscription_id)

    async def state(self, user_id: str) -> tuple[Any, ...]:
        async with self.service.database.read() as conn:
            row = (
                await conn.execute(
                    select(*(account_table.c[name] for name in STATE_COLUMNS)).where(
                        account_table.c.user_id == user_id
                    )
                )
            ).one()
        return tuple(row)

    async def quotes(self) -> list[tuple[Any, ...]]:
        async with self.service.database.read() as conn:
            return [tuple(row) for row in (await conn.execute(select(quote_table))).all()]

    async def outage(self, path_prefix: str = "/v1/subscriptions") -> None:
        await inject(self.service, path_prefix=path_prefix, status=500, count=5)

    async def clear_faults(self) -> None:
        await clear_faults(self.service)


@asynccontextmanager
async def start_live(
    database: Database, sandbox_db: DbTarget, options: LiveOptions | None = None
) -> AsyncIterator[Live]:
    """Serve the service over these databases as `options` say, with a gateway on its sandbox and
    the shipped catalog synced into it."""
    options = options or LiveOptions()
    async with running_service(
        database, sandbox_db, notifier=options.notifier, sandbox=options.sandbox, **options.settings
    ) as service:
        if options.delivery is not None:
            await control(service, "delivery", {"mode": options.delivery})
        async with open_sandbox_gateway(service.url) as gateway:
            yield Live(service, gateway, await setup_catalog(gateway))


def item_of(subscription: Any) -> Any:
    """The subscription's first item (the plan's, unless metered prices were added first)."""
    return subscription["items"].data[0]


def iso(ts: int) -> str:
    """A Stripe timestamp as the API writes it."""
    moment = stripe_time(ts)
    assert moment is not None
    return moment.isoformat()
