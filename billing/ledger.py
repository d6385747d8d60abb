"""The billing history ledger: one append-only row per change of an account's billing state.

`sync_customer` (billing/sync.py), the one function that writes an account's state, writes the
row in the transaction of the change: the tracked fields before (None for a new account) and
after, when the change happened at Stripe (`effective_at`), and its causes. A sync that changes
nothing tracked (a duplicate, late or replayed event) writes nothing. Nothing updates or deletes
a row: this module only inserts and reads, and the database refuses UPDATE and DELETE
(triggers of migration 0008).

Tracked: the account's status, tier, price, interval, cancel-at-period-end and pending change
(`ACCOUNT_FIELDS`, compared by the sync itself), and what only Stripe's subscription holds: the
licensed item's quantity, unit amount and currency, and the subscription's discounts
(`STRIPE_FIELDS`, compared with the account's previous row).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import discounts
from billing.stripe_objects import field as get
from billing.stripe_objects import stripe_time
from db.models import ledger_table

ACCOUNT_FIELDS = (
    "status",
    "tier",
    "stripe_price_id",
    "interval",
    "cancel_at_period_end",
    "pending_tier",
    "pending_interval",
    "pending_change_at",
    "stripe_subscription_id",
)
STRIPE_FIELDS = ("quantity", "unit_amount", "currency", "discounts")

# What the sync's subscriptions list call expands: the discounts' terms, the update's invoice.
SUBSCRIPTIONS_EXPAND = [*discounts.EXPAND, "data.latest_invoice"]

# Causes that are not a Stripe event.
MUTATION = "mutation"
BILLING_SYNC = "billing sync"


@dataclass(frozen=True, slots=True)
class Cause:
    """Why a sync ran: a Stripe event (its id, type and `created`), or a mutation, `billing sync`...;
    `operator`: who ran it from the admin console (graph/admin/)."""

    type: str
    id: str | None = None
    created: int | None = None
    operator: str | None = None

    def document(self) -> dict[str, Any]:
        found: dict[str, Any] = {"type": self.type}
        if self.id is not None:
            found["id"] = self.id
        if self.created is not None:
            found["created"] = self.created
        if self.operator is not None:
            found["operator"] = self.operator
        return found


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: int
    account_id: int
    user_id: str
    stripe_customer_id: str | None
    kind: str
    changed: list[str]
    before: dict[str, Any] | None
    after: dict[str, Any]
    causes: list[dict[str, Any]]
    effective_at: datetime
    recorded_at: datetime


def plain(value: Any) -> Any:
    """A tracked value as the ledger's JSON holds it: enums by value, times as ISO 8601 UTC."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple):
        return [plain(item) for item in value]
    return value


ENDED = frozenset({"canceled", "incomplete_expired"})
NOT_STARTED = frozenset({None, "none", "incomplete", *ENDED})
PAYING = frozenset({"active", "past_due"})


def transition_time(
    changes: Mapping[str, tuple[Any, Any]], moments: Mapping[str, datetime | None]
) -> datetime | None:
    """When Stripe's subscription says the change happened, for the changes it dates.

    `moments`: the subscription's `start_date`, `trial_end`, `canceled_at`, `ended_at`,
    `current_period_start` and `updated_by_invoice`. A subscription that starts: its `start_date`
    (its `trial_end` when it is already paying after a trial no sync saw); one that ends:
    `ended_at` (else `canceled_at`); a trial that converts: `trial_end`; a new price with a new
    period (a change at the period end): `current_period_start`; a new price billed at once (an
    upgrade): the `created` of the update's invoice. Others: None.
    """
    status = changes.get("status")
    if status is not None:
        old, new = status
        if new in ENDED:
            return moments.get("ended_at") or moments.get("canceled_at")
        if old in NOT_STARTED or "stripe_subscription_id" in changes:
            started, trial_end = moments.get("start_date"), moments.get("trial_end")
            if new in PAYING and trial_end is not None and started is not None and trial_end > started:
                return trial_end  # its trial came and went before a sync saw it: paying since then
            return started
        if old == "trialing" and new in ("active", "past_due"):
            return moments.get("trial_end")
        return None
    if "stripe_subscription_id" in changes:
        return moments.get("start_date")
    if "stripe_price_id" in changes and "current_period_start" in changes:
        return moments.get("current_period_start")
    if "stripe_price_id" in changes:
        return moments.get("updated_by_invoice")
    return None


def update_invoice_time(subscription: Any) -> datetime | None:
    """When the subscription's latest invoice was made by an update (`billing_reason`
    `subscription_update`: an upgrade billed at once), else None. The sync lists subscriptions
    with `expand[]=data.latest_invoice` (`SUBSCRIPTIONS_EXPAND`)."""
    invoice = get(subscription, "latest_invoice")
    if isinstance(invoice, str) or get(invoice, "billing_reason") != "subscription_update":
        return None
    return stripe_time(get(invoice, "created"))


def effective_at(
    causes: Sequence[Cause],
    changes: Mapping[str, tuple[Any, Any]],
    moments: Mapping[str, datetime | None],
    now: datetime,
) -> datetime:
    """When the change happened at Stripe, never the time it was applied.

    The subscription's own time of the transition when it has one (`transition_time`): a sync
    reads Stripe's current state, which may be newer than every event of its batch (an old
    `trial_will_end` event applied after the trial ended). Otherwise the `created` of the batch's
    latest event (webhooks arrive late and out of order); without events (a mutation, `billing
    sync`), `now`: the sync directly follows the Stripe call that made the change.
    """
    found = transition_time(changes, moments)
    if found is not None:
        return found
    created = [cause.created for cause in causes if cause.created]
    if created:
        return stripe_time(max(created)) or now
    return now


async def last_entry(conn: AsyncConnection, account_id: int) -> LedgerEntry | None:
    query = (
        select(ledger_table)
        .where(ledger_table.c.account_id == account_id)
        .order_by(ledger_table.c.id.desc())
        .limit(1)
    )
    row = (await conn.execute(query)).mappings().first()
    return None if row is None else LedgerEntry(**row)


async def record_change(
    conn: AsyncConnection,
    *,
    account_id: int,
    user_id: str,
    customer_id: str | None,
    before: Mapping[str, Any] | None,
    changes: Mapping[str, tuple[Any, Any]],
    stripe_values: Mapping[str, Any] | None,
    causes: Sequence[Cause],
    effective: datetime,
    now: datetime,
) -> bool:
    """Append the row of one sync's change, inside its transaction; False when nothing tracked changed.

    `before` is the account's tracked fields before the sync (None: the sync created the account),
    `changes` the sync's own before/after comparison, `stripe_values` the `STRIPE_FIELDS` Stripe
    reports now (None: unknown, e.g. the customer was deleted; the previous values are kept).
    """
    previous = await last_entry(conn, account_id)
    changed = [name for name in ACCOUNT_FIELDS if name in changes and changes[name][0] != changes[name][1]]
    kept = {name: (previous.after.get(name) if previous else None) for name in STRIPE_FIELDS}
    now_stripe = {name: plain(value) for name, value in (stripe_values or kept).items()}
    for name in STRIPE_FIELDS:
        # A row written before these fields were tracked (the migration's backfill) holds none,
        # one written before discount terms were, the discounts' ids only: learning them is not
        # a change on its own.
        learned = kept[name] is None or (
            name == "discounts" and _terms_of_the_same(kept[name], now_stripe[name])
        )
        if now_stripe[name] != kept[name] and (not learned or changed or previous is None):
            changed.append(name)
    if not changed:
        return False
    old = None
    if before is not None:
        old = {**{name: plain(before.get(name)) for name in ACCOUNT_FIELDS}, **kept}
    after = {name: plain(before.get(name) if before is not None else None) for name in ACCOUNT_FIELDS}
    after.update({name: plain(new) for name, (_old, new) in changes.items() if name in ACCOUNT_FIELDS})
    after.update(now_stripe)
    await conn.execute(
        insert(ledger_table).values(
            account_id=account_id,
            user_id=user_id,
            stripe_customer_id=customer_id,
            kind="change",
            changed=changed,
            before=old,
            after=after,
            causes=[cause.document() for cause in causes],
            effective_at=effective,
            recorded_at=now,
        )
    )
    return True


def _terms_of_the_same(kept: Any, now: Any) -> bool:
    """`kept` holds bare discount ids and `now` the terms of exactly those discounts."""
    if not isinstance(kept, list) or not isinstance(now, list) or not all(isinstance(d, str) for d in kept):
        return False
    return sorted(kept) == sorted(str(terms.get("id")) for terms in now if isinstance(terms, dict))


async def account_ledger(conn: AsyncConnection, account_id: int, *, limit: int = 200) -> list[LedgerEntry]:
    """An account's rows, oldest first (the latest `limit`)."""
    query = (
        select(ledger_table)
        .where(ledger_table.c.account_id == account_id)
        .order_by(ledger_table.c.id.desc())
        .limit(limit)
    )
    rows = (await conn.execute(query)).mappings().all()
    return [LedgerEntry(**row) for row in reversed(rows)]


async def entries_between(conn: AsyncConnection, start: datetime, end: datetime) -> list[LedgerEntry]:
    """Every row with `start <= effective_at < end`, in order of `effective_at`."""
    query = (
        select(ledger_table)
        .where(ledger_table.c.effective_at >= start, ledger_table.c.effective_at < end)
        .order_by(ledger_table.c.effective_at, ledger_table.c.id)
    )
    return [LedgerEntry(**row) for row in (await conn.execute(query)).mappings().all()]
