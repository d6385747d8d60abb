"""`billing sync`: reconcile every Stripe customer and every linked account with the database."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select

from billing.customer_locks import CustomerLocks
from billing.host_events.events import HostEventConfig
from billing.notifier import Notifier
from billing.stripe_gateway import StripeGateway
from billing.sync import SyncResult, notifications_for, notify_all, sync_customer
from db.engine import Database
from db.models import account_table


@dataclass
class ReconcileReport:
    dry_run: bool
    results: list[SyncResult] = field(default_factory=list)

    @property
    def drifted(self) -> list[SyncResult]:
        return [r for r in self.results if r.changes and not r.unknown_customer]

    @property
    def unknown(self) -> list[SyncResult]:
        return [r for r in self.results if r.unknown_customer and not r.customer_deleted]

    @property
    def multiple_live(self) -> list[SyncResult]:
        return [r for r in self.results if r.multiple_live]

    @property
    def conflicts(self) -> list[SyncResult]:
        return [r for r in self.results if r.conflict]


async def customer_ids(*, database: Database, gateway: StripeGateway) -> list[str]:
    """Every customer in Stripe, then every customer an account names that Stripe no longer lists."""
    page = await gateway.call(
        lambda o: gateway.v1.customers.list_async({"limit": 100}, o), what="list customers"
    )
    ids = [customer.id async for customer in page.auto_paging_iter()]
    async with database.read() as conn:
        linked = (
            await conn.execute(
                select(account_table.c.stripe_customer_id).where(
                    account_table.c.stripe_customer_id.is_not(None)
                )
            )
        ).scalars()
        known = set(ids)
        ids.extend(sorted(str(customer) for customer in linked if customer not in known))
    return ids


async def reconcile(
    *,
    database: Database,
    gateway: StripeGateway,
    notifier: Notifier,
    customers: list[str],
    now: datetime,
    dry_run: bool = False,
    on_customer: Callable[[str], None] | None = None,
    host_events: HostEventConfig | None = None,
    locks: CustomerLocks | None = None,
    operator: str | None = None,
) -> ReconcileReport:
    """Sync each customer (`billing sync`; the admin console's "sync from Stripe" passes the
    service's own `locks` and the `operator`, recorded on the ledger row's cause)."""
    locks = locks or CustomerLocks(database, host_events=host_events)
    report = ReconcileReport(dry_run)
    for customer_id in customers:
        result = await sync_customer(
            database=database,
            gateway=gateway,
            locks=locks,
            customer_id=customer_id,
            now=now,
            dry_run=dry_run,
            operator=operator,
        )
        report.results.append(result)
        if not dry_run:
            await notify_all(notifier, notifications_for(result))
        if on_customer is not None:
            on_customer(customer_id)
    return report
