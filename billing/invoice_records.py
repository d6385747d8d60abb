"""The invoices the sync keeps (`upsert_invoice`, in the sync's transaction), and the revenue
metrics computed from them (docs/metrics.md): failed and recovered payments, and the metered
part, which is never in MRR.

The sync stores, per invoice (migration 0010): `attempt_count`, `finalized_at` (a charge-
automatically invoice's first payment attempt), `paid_at`, the metered lines' amount and the
discounts' amount. A payment **failed** when an attempt did not pay the invoice: it is paid after
two attempts or more, or attempted and not paid. It is **recovered** when such an invoice is paid.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.stripe_objects import field as get
from billing.stripe_objects import invoice_subscription_id, object_id, stripe_time
from db.engine import Database
from db.models import invoice_table

BILLED = ("open", "paid", "uncollectible")  # finalized and not voided


def metered_prices(subscriptions: Iterable[Any]) -> frozenset[str]:
    """The ids of the metered prices on any of these subscriptions' items."""
    return frozenset(
        price_id
        for subscription in subscriptions
        for item in get(get(subscription, "items"), "data") or []
        if get(get(get(item, "price"), "recurring"), "usage_type") == "metered"
        and (price_id := object_id(get(item, "price")))
    )


def revenue_values(invoice: Any, metered: frozenset[str]) -> dict[str, Any]:
    """The invoice's columns for the revenue metrics. A line is metered when its price is one of
    `metered`; its amount counts net of its discounts."""
    metered_amount = 0
    for line in get(get(invoice, "lines"), "data") or []:
        price = object_id(get(get(get(line, "pricing"), "price_details"), "price"))
        if price in metered:
            off = sum(int(get(found, "amount") or 0) for found in get(line, "discount_amounts") or [])
            metered_amount += int(get(line, "amount") or 0) - off
    transitions = get(invoice, "status_transitions")
    return {
        "attempt_count": int(get(invoice, "attempt_count") or 0),
        "finalized_at": stripe_time(get(transitions, "finalized_at")),
        "paid_at": stripe_time(get(transitions, "paid_at")),
        "metered_amount": metered_amount,
        "discount_amount": sum(
            int(get(found, "amount") or 0) for found in get(invoice, "total_discount_amounts") or []
        ),
    }


async def upsert_invoice(
    conn: AsyncConnection, database: Database, invoice: Any, now: datetime, metered: frozenset[str]
) -> None:
    values = {
        "stripe_customer_id": object_id(get(invoice, "customer")),
        "stripe_subscription_id": invoice_subscription_id(invoice),
        "number": get(invoice, "number"),
        "status": get(invoice, "status") or "draft",
        "billing_reason": get(invoice, "billing_reason"),
        "currency": get(invoice, "currency"),
        "amount_due": int(get(invoice, "amount_due") or 0),
        "amount_paid": int(get(invoice, "amount_paid") or 0),
        "amount_remaining": int(get(invoice, "amount_remaining") or 0),
        "total": int(get(invoice, "total") or 0),
        "hosted_invoice_url": get(invoice, "hosted_invoice_url"),
        "invoice_pdf": get(invoice, "invoice_pdf"),
        "period_start": stripe_time(get(invoice, "period_start")),
        "period_end": stripe_time(get(invoice, "period_end")),
        "created": stripe_time(get(invoice, "created")),
        "synced_at": now,
        **revenue_values(invoice, metered),
    }
    insert = (postgresql.insert if database.is_postgres else sqlite.insert)(invoice_table)
    statement = insert.values(id=get(invoice, "id"), **values)
    await conn.execute(statement.on_conflict_do_update(index_elements=["id"], set_=values))


@dataclass(frozen=True, slots=True)
class InvoiceRevenue:
    """Of the range: payments that failed (invoices, amount due), those recovered (paid since,
    by the range's end; amount paid), and the metered lines of the invoices finalized in it."""

    failed_invoices: int = 0
    failed_amount: int = 0
    recovered_invoices: int = 0
    recovered_amount: int = 0
    metered_revenue: int = 0


async def invoice_revenue(database: Database, start: datetime, end: datetime) -> InvoiceRevenue:
    invoice = invoice_table.c
    in_range = and_(invoice.finalized_at >= start, invoice.finalized_at < end)
    failed = or_(
        and_(invoice.status == "paid", invoice.attempt_count >= 2),
        and_(invoice.status != "paid", invoice.attempt_count >= 1),
    )
    async with database.read() as conn:
        failures = (
            await conn.execute(
                select(invoice.status, invoice.amount_due, invoice.amount_paid, invoice.paid_at).where(
                    in_range, failed
                )
            )
        ).all()
        metered = (
            await conn.execute(select(invoice.metered_amount).where(in_range, invoice.status.in_(BILLED)))
        ).all()
    recovered = [
        row for row in failures if row.status == "paid" and row.paid_at is not None and row.paid_at < end
    ]
    return InvoiceRevenue(
        failed_invoices=len(failures),
        failed_amount=sum(int(row.amount_due) for row in failures),
        recovered_invoices=len(recovered),
        recovered_amount=sum(int(row.amount_paid) for row in recovered),
        metered_revenue=sum(int(row.metered_amount) for row in metered),
    )
