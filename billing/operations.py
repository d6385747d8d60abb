"""What needs an operator's eye (the admin console, graph/admin/): Stripe events that failed or
wait in the inbox, trials that end soon, and past-due accounts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from db.engine import Database
from db.enums import EventStatus, SubscriptionStatus
from db.models import account_table, event_table

STUCK_STATUSES = (EventStatus.FAILED.value, EventStatus.PENDING.value, EventStatus.PROCESSING.value)


@dataclass(frozen=True, slots=True)
class InboxEvent:
    id: str
    type: str
    status: str
    attempts: int
    error: str | None
    created: datetime
    received_at: datetime
    next_attempt_at: datetime | None
    customer_id: str | None


@dataclass(frozen=True, slots=True)
class AccountBrief:
    user_id: str
    email: str | None
    stripe_customer_id: str | None
    tier: str
    status: str
    trial_end: datetime | None
    current_period_end: datetime | None


def _inbox_select() -> Any:
    e = event_table.c
    customer = e.payload["data"]["object"]["customer"].as_string()
    return select(
        e.id,
        e.type,
        e.status,
        e.attempts,
        e.last_error,
        e.stripe_created,
        e.received_at,
        e.next_attempt_at,
        customer.label("customer"),
    )


def _inbox_event(row: Any) -> InboxEvent:
    return InboxEvent(
        id=row.id,
        type=row.type,
        status=row.status,
        attempts=row.attempts,
        error=row.last_error,
        created=row.stripe_created,
        received_at=row.received_at,
        next_attempt_at=row.next_attempt_at,
        customer_id=row.customer,
    )


async def stuck_events(database: Database, *, limit: int = 100) -> list[InboxEvent]:
    """Failed events first, then those waiting (pending or being processed), oldest first."""
    e = event_table.c
    query = (
        _inbox_select()
        .where(e.status.in_(STUCK_STATUSES))
        .order_by((e.status != EventStatus.FAILED.value), e.received_at, e.id)
        .limit(limit)
    )
    async with database.read() as conn:
        rows = (await conn.execute(query)).all()
    return [_inbox_event(row) for row in rows]


async def inbox_event(database: Database, event_id: str) -> InboxEvent | None:
    async with database.read() as conn:
        row = (await conn.execute(_inbox_select().where(event_table.c.id == event_id))).first()
    return None if row is None else _inbox_event(row)


async def _accounts(database: Database, condition: object, limit: int) -> list[AccountBrief]:
    a = account_table.c
    query = (
        select(a.user_id, a.email, a.stripe_customer_id, a.tier, a.status, a.trial_end, a.current_period_end)
        .where(condition)  # type: ignore[arg-type]
        .order_by(a.trial_end, a.current_period_end, a.id)
        .limit(limit)
    )
    async with database.read() as conn:
        rows = (await conn.execute(query)).all()
    return [AccountBrief(*row) for row in rows]


async def trials_ending(
    database: Database, *, now: datetime, within: timedelta = timedelta(days=7), limit: int = 100
) -> list[AccountBrief]:
    """Trialing accounts whose trial ends in `[now, now + within)`, soonest first."""
    a = account_table.c
    condition = (
        (a.status == SubscriptionStatus.TRIALING.value) & (a.trial_end >= now) & (a.trial_end < now + within)
    )
    return await _accounts(database, condition, limit)


async def past_due_accounts(database: Database, *, limit: int = 100) -> list[AccountBrief]:
    a = account_table.c
    return await _accounts(database, a.status == SubscriptionStatus.PAST_DUE.value, limit)
