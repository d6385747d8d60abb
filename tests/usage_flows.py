"""Usage recorded and reported to the sandbox's meters: metered subscribers, usage spread over
past minutes, the report rows and the meter events the sandbox accepted, a clock moved by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from billing.plans import load_catalog
from billing.stripe_gateway import StripeGateway
from billing.usage import UsageInput, record_usage
from db.engine import Database
from db.models import report_table, usage_table
from stripe_sandbox.store import Store
from tests.billing_flows import subscribe, wait_for_account
from tests.conftest import Service

CATALOG = load_catalog()


class Clock:
    """Real time, moved forward on demand (backoffs and leases without waiting)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, **amount: float) -> None:
        self.offset += timedelta(**amount)


async def metered_subscriber(
    service: Service, gateway: StripeGateway, prices: dict[str, str], user_id: str
) -> tuple[str, str]:
    """A paid starter subscription with the metered price as a second item; (customer, subscription)."""
    customer_id, subscription_id = await subscribe(service, gateway, prices, user_id, trial_days=None)
    await gateway.v1.subscriptions.update_async(
        subscription_id, {"items": [{"price": prices["starter_api_calls_metered"]}]}
    )
    await wait_for_account(service.database, user_id, status="active", stripe_customer_id=customer_id)
    return customer_id, subscription_id


async def sandbox_meter_events(service: Service) -> list[dict[str, Any]]:
    """Every meter event the sandbox accepted (Stripe has no list endpoint; this is its store)."""
    store = Store(service.sandbox_db.url, schema=service.sandbox_db.schema)
    try:
        async with store.transaction() as tx:
            return await tx.all("billing.meter_event", lambda _event: True)
    finally:
        await store.dispose()


async def report_rows(database: Database) -> list[Any]:
    async with database.read() as conn:
        return list(await conn.execute(select(report_table).order_by(report_table.c.minute)))


async def unreported_records(database: Database) -> int:
    async with database.read() as conn:
        found = await conn.execute(
            select(func.count()).select_from(usage_table).where(usage_table.c.reported_at.is_(None))
        )
        return int(found.scalar() or 0)


async def spread_usage(database: Database, users: list[str], minutes: int, now: datetime) -> dict[str, int]:
    """Records in `minutes` distinct past minutes per user; returns each user's total."""
    totals: dict[str, int] = {}
    for user in users:
        records = [
            UsageInput(
                user, "api_calls", 10 + minute, f"{user}-{minute}", now - timedelta(minutes=minute + 1)
            )
            for minute in range(minutes)
        ]
        await record_usage(database=database, catalog=CATALOG, records=records, now=now)
        totals[user] = sum(record.quantity for record in records)
    return totals
