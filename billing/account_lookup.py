"""An operator's look at one account: found by user id, email or Stripe customer id, with its
ledger and the recent Stripe events of its customer and their outcome."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select

from billing.access import SubscriptionState, account_state_select
from billing.errors import BillingError, ErrorCode
from billing.ledger import LedgerEntry, account_ledger
from db.engine import Database
from db.models import account_table, event_table

MAX_EVENTS = 100


@dataclass(frozen=True, slots=True)
class AccountEvent:
    id: str
    type: str
    created: datetime
    received_at: datetime
    status: str  # pending, processing, processed, ignored, failed
    attempts: int
    error: str | None


@dataclass(frozen=True, slots=True)
class AccountFound:
    id: int
    state: SubscriptionState
    stripe_customer_id: str | None
    ledger: list[LedgerEntry]


async def find_account(
    database: Database,
    *,
    user_id: str | None = None,
    email: str | None = None,
    stripe_customer_id: str | None = None,
    ledger_limit: int = 200,
) -> AccountFound | None:
    """The account named by exactly one of the keys (an email matches case-insensitively)."""
    given = [key for key in (user_id, email, stripe_customer_id) if key is not None]
    if len(given) != 1:
        raise BillingError(
            "give exactly one of userId, email and stripeCustomerId", code=ErrorCode.BAD_USER_INPUT
        )
    c = account_table.c
    if user_id is not None:
        condition = c.user_id == user_id
    elif email is not None:
        condition = c.email.ilike(
            email.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_"), escape="\\"
        )
    else:
        condition = c.stripe_customer_id == stripe_customer_id
    query = account_state_select(condition).add_columns(c.stripe_customer_id).order_by(c.id).limit(1)
    async with database.read() as conn:
        row: Any = (await conn.execute(query)).mappings().first()
        if row is None:
            return None
        ledger = await account_ledger(conn, row["id"], limit=ledger_limit)
    return AccountFound(
        id=row["id"],
        state=SubscriptionState.from_row(row),
        stripe_customer_id=row["stripe_customer_id"],
        ledger=ledger,
    )


async def customer_events(database: Database, customer_id: str, *, first: int = 20) -> list[AccountEvent]:
    """The customer's latest Stripe events in the inbox (newest first) with their outcome.

    Matched on the event object's `customer` (or its `id`, for `customer.*` events).
    """
    if not 1 <= first <= MAX_EVENTS:
        raise BillingError(f"first must be between 1 and {MAX_EVENTS}", code=ErrorCode.BAD_USER_INPUT)
    obj = event_table.c.payload["data"]["object"]
    query = (
        select(event_table)
        .where(or_(obj["customer"].as_string() == customer_id, obj["id"].as_string() == customer_id))
        .order_by(event_table.c.stripe_created.desc(), event_table.c.id)
        .limit(first)
    )
    async with database.read() as conn:
        rows = (await conn.execute(query)).mappings().all()
    return [
        AccountEvent(
            id=row["id"],
            type=row["type"],
            created=row["stripe_created"],
            received_at=row["received_at"],
            status=row["status"],
            attempts=row["attempts"],
            error=row["last_error"],
        )
        for row in rows
    ]
