"""The one function that brings an account in line with Stripe: `sync_customer`.

Stripe is the source of truth. The webhook worker, `confirmCheckoutSession`, `billing sync` and
event replay all call `sync_customer`; nothing else writes subscription state. An event is only
a hint that a customer changed: order and duplicates of events do not matter, because every
sync fetches the customer's current subscriptions and writes what it finds, one customer at a
time (a per-customer lock across processes on PostgreSQL).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

import stripe
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.customer_locks import CustomerLocks
from billing.errors import BillingError
from billing.host_events.events import HostEventConfig, StripeTrigger, write_sync_events
from billing.invoice_records import metered_prices, upsert_invoice
from billing.ledger import (
    BILLING_SYNC,
    SUBSCRIPTIONS_EXPAND,
    Cause,
    effective_at,
    record_change,
)
from billing.notifier import Notification, NotificationKind, Notifier
from billing.owners import owner_columns, owner_key_from_metadata
from billing.realtime import publish_account_change
from billing.stripe_gateway import StripeGateway
from billing.stripe_objects import field as get
from billing.stripe_objects import metadata, object_id
from billing.stripe_state import LIVE_STATUSES, STATE_FIELDS, StripeState, customer_state
from db.engine import Database
from db.enums import SubscriptionStatus
from db.models import account_table

log = logging.getLogger("billing.sync")

# The sync ------------------------------------------------------------------------------------


@dataclass
class SyncResult:
    customer_id: str
    user_id: str | None
    state: StripeState | None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # field -> (before, after)
    created_account: bool = False
    unknown_customer: bool = False
    customer_deleted: bool = False
    conflict: str | None = None
    account_id: int | None = None  # the account row written (None: none, or a dry run's new one)
    host_events: int = 0  # host events written to the outbox with the change
    before: dict[str, Any] | None = None  # the row's STATE_FIELDS before (None: no row yet)
    ledger_rows: int = 0  # billing_ledger rows written with the change (0 or 1)

    @property
    def multiple_live(self) -> bool:
        return self.state is not None and len(self.state.live_subscription_ids) > 1


async def sync_customer(
    *,
    database: Database,
    gateway: StripeGateway,
    locks: CustomerLocks,
    customer_id: str,
    now: datetime,
    user_id_hint: str | None = None,
    invoice_ids: Iterable[str] = (),
    dry_run: bool = False,
    host_events: HostEventConfig | None = None,
    triggers: Sequence[StripeTrigger] = (),
    cause: str = BILLING_SYNC,
    operator: str | None = None,
) -> SyncResult:
    """Fetch the customer's subscriptions (and the named invoices) and write the account row.

    With `host_events`, the events for the host app that the change (and the applied Stripe
    events, `triggers`) make are written to the outbox in the same transaction (default: the
    configuration `locks` carries). A change of the tracked billing state appends its row to the
    ledger in that transaction too, caused by the `triggers`, or else by `cause` (a mutation,
    `billing sync`, a replay), with the `operator` who asked for it (the admin console).
    """
    host_events = host_events or locks.host_events
    async with locks.hold(customer_id):
        customer = await _customer(gateway, customer_id)
        if customer is None:
            return SyncResult(customer_id, None, None, unknown_customer=True)
        if get(customer, "deleted"):
            return await _customer_deleted(
                database, customer_id, now, dry_run, host_events, triggers, _causes(triggers, cause, operator)
            )
        subscriptions = await _subscriptions(gateway, customer_id)
        schedules = await _schedules(gateway, subscriptions)
        invoices = [await _invoice(gateway, invoice_id) for invoice_id in invoice_ids]
        state = customer_state(subscriptions, schedules)
        hint = owner_key_from_metadata(metadata(customer)) or user_id_hint  # userId or orgId
        stale_link = await _stale_link(database, gateway, customer_id, hint, state)
        async with database.write() as conn:
            result = await _write_account(
                conn, database, customer_id, hint, state, now, dry_run, stale_link=stale_link
            )
            if not dry_run and not result.unknown_customer:
                for invoice in invoices:
                    await upsert_invoice(conn, database, invoice, now, metered_prices(subscriptions))
            if host_events is not None and not dry_run and result.conflict is None:
                await _write_host_events(conn, database, host_events, result, triggers, now)
            if not dry_run and result.conflict is None:
                await _write_ledger(conn, result, _causes(triggers, cause, operator), now)
        if result.host_events and host_events is not None:
            host_events.notify_written()
        return result


async def _customer(gateway: StripeGateway, customer_id: str) -> stripe.Customer | None:
    """The customer (maybe a deleted one), or None when Stripe has no such customer."""
    try:
        return await gateway.call(
            lambda o: gateway.v1.customers.retrieve_async(customer_id, None, o), what="retrieve customer"
        )
    except BillingError as exc:
        if exc.extensions.get("stripe_code") != "resource_missing":
            raise
        return None


async def _subscriptions(gateway: StripeGateway, customer_id: str) -> list[stripe.Subscription]:
    page = await gateway.call(
        lambda o: gateway.v1.subscriptions.list_async(
            {"customer": customer_id, "status": "all", "limit": 100, "expand": SUBSCRIPTIONS_EXPAND}, o
        ),
        what="list subscriptions",
    )
    return [subscription async for subscription in page.auto_paging_iter()]


async def _schedules(gateway: StripeGateway, subscriptions: Sequence[Any]) -> dict[str, Any]:
    """The schedules of the live subscriptions that have one, by id, with their phases' prices."""
    ids = sorted(
        {
            schedule_id
            for s in subscriptions
            if get(s, "status") in LIVE_STATUSES and (schedule_id := object_id(get(s, "schedule")))
        }
    )
    schedules: dict[str, Any] = {}
    for schedule_id in ids:
        params: Any = {"expand": ["phases.items.price"]}
        schedules[schedule_id] = await gateway.call(
            partial(gateway.v1.subscription_schedules.retrieve_async, schedule_id, params),
            what="retrieve subscription schedule",
        )
    return schedules


async def _invoice(gateway: StripeGateway, invoice_id: str) -> stripe.Invoice:
    return await gateway.call(
        lambda o: gateway.v1.invoices.retrieve_async(invoice_id, None, o), what="retrieve invoice"
    )


async def _stale_link(
    database: Database, gateway: StripeGateway, customer_id: str, user_id: str | None, state: StripeState
) -> str | None:
    """The other customer the user's account is linked to, when Stripe says it no longer counts:
    it was deleted, or (while this customer is live) it has no live subscription.

    A user linked to customer A may go on as customer B (made in the dashboard, say) after A was
    deleted or its subscription ended in Stripe. If B's events are applied before A's, the row
    still says A is live; judged on that, B would be refused for good, and A's late deletion
    would then leave the user unlinked, B's subscription and invoices nowhere. So when the row
    is linked to another customer and the row alone would refuse this one, ask Stripe about the
    other one (one or two reads, only in that case) before deciding. Outside any transaction.
    """
    if not user_id:
        return None
    async with database.read() as conn:
        mine = (
            await conn.execute(
                select(account_table.c.id).where(account_table.c.stripe_customer_id == customer_id)
            )
        ).first()
        row = (
            await conn.execute(
                select(account_table.c.stripe_customer_id, account_table.c.status).where(
                    account_table.c.user_id == user_id
                )
            )
        ).first()
    if mine is not None or row is None or row.stripe_customer_id in (None, customer_id):
        return None
    live_here = state.status in LIVE_STATUSES
    if live_here and SubscriptionStatus(row.status) not in LIVE_STATUSES:
        return None  # the row's own rule moves the account here
    other: str = row.stripe_customer_id
    found = await _customer(gateway, other)
    if found is None or get(found, "deleted"):
        return other
    if not live_here:
        return None
    live = [s for s in await _subscriptions(gateway, other) if get(s, "status") in LIVE_STATUSES]
    return None if live else other


async def _write_account(
    conn: AsyncConnection,
    database: Database,
    customer_id: str,
    user_id_hint: str | None,
    state: StripeState,
    now: datetime,
    dry_run: bool,
    *,
    stale_link: str | None = None,
) -> SyncResult:
    by_customer = await _locked_row(conn, database, account_table.c.stripe_customer_id == customer_id)
    row = by_customer
    if row is None and user_id_hint:
        row = await _locked_row(conn, database, account_table.c.user_id == user_id_hint)
    if row is None and not user_id_hint:
        return SyncResult(customer_id, None, state, unknown_customer=True)

    # Seats follow a live subscription's quantity; otherwise the count `setSeats` stored is kept.
    seats = state.quantity if state.status in LIVE_STATUSES else getattr(row, "seats", None)
    values = {**state.values(), "seats": seats, "synced_at": now, "updated_at": now}
    if row is None:
        assert user_id_hint is not None
        result = SyncResult(customer_id, user_id_hint, state, created_account=True)
        result.changes = {name: (None, value) for name, value in state.values().items()}
        if not dry_run:
            inserted = await conn.execute(
                _insert(database)
                .values(
                    **owner_columns(user_id_hint), stripe_customer_id=customer_id, created_at=now, **values
                )
                .returning(account_table.c.id)
            )
            result.account_id = inserted.scalar_one()
            await publish_account_change(conn, database, result.account_id)
        return result

    result = SyncResult(customer_id, row.user_id, state, account_id=row.id)
    result.before = {name: getattr(row, name) for name in STATE_FIELDS}
    if row.stripe_customer_id not in (None, customer_id, stale_link):
        # The user already pays through another customer: keep that link unless it has no live
        # subscription and this one does (e.g. the old customer was replaced).
        current_live = SubscriptionStatus(row.status) in LIVE_STATUSES
        if current_live or state.status not in LIVE_STATUSES:
            result.conflict = f"user {row.user_id} is linked to {row.stripe_customer_id}, not {customer_id}"
            log.warning("sync: %s; not relinking", result.conflict)
            return result
    # Once used, a trial stays used (a deleted subscription's history may be gone from lists).
    values["trial_used"] = bool(row.trial_used) or state.trial_used
    result.changes = {
        name: (getattr(row, name), values[name])
        for name in (*STATE_FIELDS, "stripe_customer_id")
        if name in values and getattr(row, name) != values[name]
    }
    if row.stripe_customer_id != customer_id:
        result.changes["stripe_customer_id"] = (row.stripe_customer_id, customer_id)
    if not dry_run:
        await conn.execute(
            update(account_table)
            .where(account_table.c.id == row.id)
            .values(stripe_customer_id=customer_id, **values)
        )
        await publish_account_change(conn, database, row.id)
    return result


async def _customer_deleted(
    database: Database,
    customer_id: str,
    now: datetime,
    dry_run: bool,
    host_events: HostEventConfig | None,
    triggers: Sequence[StripeTrigger],
    causes: Sequence[Cause],
) -> SyncResult:
    """The customer is gone: so are its subscriptions. Unlink it; a new checkout makes a new one."""
    async with database.write() as conn:
        row = await _locked_row(conn, database, account_table.c.stripe_customer_id == customer_id)
        if row is None:
            return SyncResult(customer_id, None, None, unknown_customer=True, customer_deleted=True)
        ended = SubscriptionStatus.CANCELED if row.stripe_subscription_id else SubscriptionStatus.NONE
        values = {
            "stripe_customer_id": None,
            "status": ended.value,
            "cancel_at_period_end": False,
            "stripe_schedule_id": None,
            "pending_tier": None,
            "pending_interval": None,
            "pending_change_at": None,
            "synced_at": now,
            "updated_at": now,
        }
        result = SyncResult(customer_id, row.user_id, None, customer_deleted=True, account_id=row.id)
        result.before = {name: getattr(row, name) for name in STATE_FIELDS}
        result.changes = {
            name: (getattr(row, name), value) for name, value in values.items() if name in STATE_FIELDS
        }
        if not dry_run:
            await conn.execute(update(account_table).where(account_table.c.id == row.id).values(**values))
            await publish_account_change(conn, database, row.id)
            if host_events is not None:
                await _write_host_events(conn, database, host_events, result, triggers, now)
            await _write_ledger(conn, result, causes, now)
    if result.host_events and host_events is not None:
        host_events.notify_written()
    return result


async def _write_host_events(
    conn: AsyncConnection,
    database: Database,
    config: HostEventConfig,
    result: SyncResult,
    triggers: Sequence[StripeTrigger],
    now: datetime,
) -> None:
    """The host events of this change, in its transaction (billing/host_events/events.py)."""
    changed = {name: pair for name, pair in result.changes.items() if pair[0] != pair[1]}
    result.host_events = await write_sync_events(
        conn,
        database,
        config,
        account_id=result.account_id,
        customer_id=result.customer_id,
        changes=changed,
        triggers=triggers,
        now=now,
    )


def _causes(triggers: Sequence[StripeTrigger], cause: str, operator: str | None = None) -> list[Cause]:
    """The Stripe events the sync applies, in the order Stripe made them; else the one `cause`."""
    if not triggers:
        return [Cause(cause, operator=operator)]
    ordered = sorted(triggers, key=lambda trigger: (trigger.created, trigger.event_id))
    return [Cause(trigger.type, trigger.event_id, trigger.created or None) for trigger in ordered]


async def _write_ledger(
    conn: AsyncConnection, result: SyncResult, causes: Sequence[Cause], now: datetime
) -> None:
    """The ledger row of this change, in its transaction (billing/ledger.py)."""
    if result.account_id is None or result.user_id is None:
        return
    state = result.state
    moments = state.moments() if state is not None else {}  # deleted: the event's time
    written = await record_change(
        conn,
        account_id=result.account_id,
        user_id=result.user_id,
        customer_id=None if result.customer_deleted else result.customer_id,
        before=result.before,
        changes=result.changes,
        stripe_values=state.stripe_values() if state is not None else None,
        causes=causes,
        effective=effective_at(causes, result.changes, moments, now),
        now=now,
    )
    result.ledger_rows = int(written)


async def _locked_row(conn: AsyncConnection, database: Database, condition: Any) -> Any:
    query = select(account_table).where(condition)
    if database.is_postgres:
        query = query.with_for_update()
    return (await conn.execute(query)).first()


def _insert(database: Database) -> Any:
    return (postgresql.insert if database.is_postgres else sqlite.insert)(account_table)


def notifications_for(result: SyncResult) -> list[Notification]:
    """Notifications a sync itself reveals (event-specific ones come from the event type)."""
    if result.multiple_live and result.state is not None:
        return [
            Notification(
                NotificationKind.MULTIPLE_LIVE_SUBSCRIPTIONS,
                result.customer_id,
                result.user_id,
                {"subscriptions": list(result.state.live_subscription_ids)},
            )
        ]
    return []


async def notify_all(notifier: Notifier, notifications: Iterable[Notification]) -> None:
    for notification in notifications:
        try:
            await notifier.notify(notification)
        except Exception:  # a broken mailer must not undo a sync
            log.exception("notifier failed for %s", notification.kind)
