"""Previews: reading Stripe's invoice preview, and the quote that makes the change charge what it
showed."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from billing.access import add_months
from billing.plan_changes.live import LiveSubscription, Prices
from billing.plan_changes.model import QUOTE_TTL, ChangeKind, PlanChangePreview, PlanKey, PreviewLine
from billing.plans import Catalog
from billing.stripe_objects import field as get
from billing.stripe_objects import object_id, stripe_time
from db.engine import Database
from db.enums import BillingInterval
from db.models import quote_table

log = logging.getLogger("billing.plan_changes")


# Quotes: the proration date of a preview, kept so the change charges what it showed -------------


async def valid_quote(
    database: Database, live: LiveSubscription, target: PlanKey, now: datetime
) -> int | None:
    """The proration date of an unexpired preview of this change from this very state, if any."""
    q = quote_table.c
    query = select(q.stripe_subscription_id, q.stripe_price_id, q.proration_date, q.expires_at).where(
        and_(q.account_id == live.account.id, q.tier == target[0].value, q.interval == target[1].value)
    )
    async with database.read() as conn:
        row = (await conn.execute(query)).first()
    if row is None or row.expires_at <= now:
        return None
    proration_date = int(row.proration_date.timestamp())
    if (
        row.stripe_subscription_id != live.account.subscription_id
        or row.stripe_price_id != live.price_id
        or not live.period[0] <= proration_date <= live.period[1]
    ):
        return None
    return proration_date


async def save_quote(
    database: Database, live: LiveSubscription, target: PlanKey, proration_date: int, now: datetime
) -> None:
    values = {
        "stripe_subscription_id": live.account.subscription_id,
        "stripe_price_id": live.price_id or "",
        "proration_date": stripe_time(proration_date),
        "expires_at": now + QUOTE_TTL,
        "created_at": now,
    }
    insert = (postgresql.insert if database.is_postgres else sqlite.insert)(quote_table).values(
        account_id=live.account.id, tier=target[0].value, interval=target[1].value, **values
    )
    q = quote_table.c
    async with database.write() as conn:
        await conn.execute(
            delete(quote_table).where(and_(q.account_id == live.account.id, q.expires_at <= now))
        )
        await conn.execute(
            insert.on_conflict_do_update(index_elements=["account_id", "tier", "interval"], set_=values)
        )


async def forget_quotes(database: Database, account_id: int) -> None:
    async with database.write() as conn:
        await conn.execute(delete(quote_table).where(quote_table.c.account_id == account_id))


# Reading previews -------------------------------------------------------------------------------


def proration_time(preview: Any) -> int:
    """The moment Stripe prorated the preview at (Stripe's clock, which may not be ours)."""
    found = get(get(get(preview, "parent"), "subscription_details"), "subscription_proration_date")
    if found:
        return int(found)
    for line in get(get(preview, "lines"), "data") or []:
        if _is_proration(line):
            return int(get(get(line, "period"), "start"))
    return int(get(preview, "created"))


def _is_proration(line: Any) -> bool:
    parent = get(line, "parent")
    for key in ("subscription_item_details", "invoice_item_details"):
        details = get(parent, key)
        if details is not None:
            return bool(get(details, "proration"))
    return bool(get(line, "proration"))  # older API versions


def preview_lines(preview: Any) -> tuple[PreviewLine, ...]:
    """The lines of one of Stripe's invoice previews."""
    return _lines(preview)


def _lines(preview: Any) -> tuple[PreviewLine, ...]:
    return tuple(
        PreviewLine(
            description=str(get(line, "description") or ""),
            amount=int(get(line, "amount") or 0),
            proration=_is_proration(line),
            period_start=stripe_time(get(get(line, "period"), "start")),
            period_end=stripe_time(get(get(line, "period"), "end")),
        )
        for line in get(get(preview, "lines"), "data") or []
    )


def preview_now(
    live: LiveSubscription, target: PlanKey, prices: Prices, preview: Any, proration_date: int
) -> PlanChangePreview:
    currency = str(get(preview, "currency") or get(prices.licensed, "currency") or "usd")
    at = stripe_time(proration_date)
    if live.trialing or get(preview, "billing_reason") == "upcoming":
        # Nothing is billed now (a trial): the preview is the next invoice.
        return PlanChangePreview(
            tier=target[0],
            interval=target[1],
            kind=ChangeKind.NOW,
            effective_at=at,
            currency=currency,
            amount_due=0,
            next_invoice_amount=int(get(preview, "amount_due") or 0),
            next_invoice_at=stripe_time(live.period[1]),
            lines=_lines(preview),
        )
    lines = _lines(preview)
    next_at = stripe_time(live.period[1])
    if live.plan is None or live.plan[1] != target[1]:  # a new billing period starts now
        licensed = object_id(prices.licensed)
        new_period = [
            line
            for raw, line in zip(get(get(preview, "lines"), "data") or [], lines, strict=True)
            if not line.proration and _line_price(raw) == licensed
        ]
        next_at = new_period[0].period_end if new_period else None
    # A credit larger than the charge stays on the customer's balance and pays the next invoice.
    left = min(0, int(get(preview, "total") or 0) + int(get(preview, "starting_balance") or 0))
    amount = int(get(prices.licensed, "unit_amount") or 0)
    return PlanChangePreview(
        tier=target[0],
        interval=target[1],
        kind=ChangeKind.NOW,
        effective_at=at,
        currency=currency,
        amount_due=int(get(preview, "amount_due") or 0),
        next_invoice_amount=max(0, amount + left),
        next_invoice_at=next_at,
        lines=lines,
    )


def _line_price(line: Any) -> str | None:
    details = get(get(line, "pricing"), "price_details")
    return object_id(get(details, "price")) or object_id(get(line, "price"))


def preview_next(
    live: LiveSubscription, target: PlanKey, kind: ChangeKind, preview: Any
) -> PlanChangePreview:
    """Nothing due now: the next invoice (at the new price for a downgrade)."""
    period_end = stripe_time(live.period[1])
    return PlanChangePreview(
        tier=target[0],
        interval=target[1],
        kind=kind,
        effective_at=period_end if kind is ChangeKind.PERIOD_END else stripe_time(get(preview, "created")),
        currency=str(get(preview, "currency") or "usd"),
        amount_due=0,
        next_invoice_amount=int(get(preview, "amount_due") or 0),
        next_invoice_at=period_end,
        lines=_lines(preview),
    )


def next_plan_invoice_is_computed(live: LiveSubscription, target: PlanKey) -> bool:
    """Whether Stripe's preview cannot show the plan's next invoice: a change of interval, or an
    annual plan whose upcoming invoice is the next month's metered usage."""
    return live.plan is not None and (
        live.plan[1] != target[1] or (target[1] is BillingInterval.ANNUAL and live.mixed_periods)
    )


def preview_from_price(
    live: LiveSubscription, target: PlanKey, kind: ChangeKind, prices: Prices, catalog: Catalog, now: datetime
) -> PlanChangePreview:
    """The plan's next invoice at the period end, from the target price (metered usage on top).

    For a downgrade that changes the interval (annual -> monthly) Stripe's subscription preview
    would start the new interval now; the schedule starts it at the period end, with one invoice
    of the new price for the first new period. For an annual plan with monthly metered items
    Stripe's upcoming invoice is the next month's usage, not the plan's renewal.
    """
    start = live.period[1]
    end = int(
        add_months(
            datetime.fromtimestamp(start, UTC), 12 if target[1] is BillingInterval.ANNUAL else 1
        ).timestamp()
    )
    amount = int(get(prices.licensed, "unit_amount") or 0)
    line = PreviewLine(
        description=f"1 \u00d7 {catalog.plan(target[0]).name} ({target[1].value})",
        amount=amount,
        proration=False,
        period_start=stripe_time(start),
        period_end=stripe_time(end),
    )
    return PlanChangePreview(
        tier=target[0],
        interval=target[1],
        kind=kind,
        effective_at=stripe_time(start) if kind is ChangeKind.PERIOD_END else now,
        currency=str(get(prices.licensed, "currency") or catalog.currency),
        amount_due=0,
        next_invoice_amount=amount,
        next_invoice_at=stripe_time(start),
        lines=(line,),
    )
