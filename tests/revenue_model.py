"""An independent model of the revenue metrics, from the sandbox's own Stripe objects read with the
SDK (never from the service's database): each subscription's MRR over time from its invoices'
lines, ChartMogul's way (a line's amount net of its discounts over its service period, an annual
one divided by 12; a prorated upgrade's line at the new price's full amount; cut at `ended_at`).
The service computes the same numbers from its ledger; tests/test_metrics_population.py compares.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

from billing.stripe_gateway import StripeGateway

KINDS = ("new", "expansion", "contraction", "churned", "reactivation")


def half_up(value: Fraction) -> int:
    return int((value + Fraction(1, 2)) // 1)


def at(ts: int | None) -> datetime:
    assert ts is not None
    return datetime.fromtimestamp(int(ts), tz=UTC)


@dataclass
class Segment:
    start: datetime
    end: datetime
    mrr: Fraction
    order: tuple[int, int]  # (invoice created, line index): a later line wins where they overlap


@dataclass
class Timeline:
    """One account's subscription: its MRR segments and when it ended."""

    user: str
    segments: list[Segment] = field(default_factory=list)
    ended_at: datetime | None = None

    def mrr(self, moment: datetime) -> Fraction:
        if self.ended_at is not None and moment >= self.ended_at:
            return Fraction(0)
        covering = [s for s in self.segments if s.start <= moment < s.end]
        return max(covering, key=lambda s: s.order).mrr if covering else Fraction(0)

    def moments(self) -> set[datetime]:
        found = {s.start for s in self.segments} | {s.end for s in self.segments}
        if self.ended_at is not None:
            found.add(self.ended_at)
        return found


async def timelines(
    gateway: StripeGateway, subscriptions: dict[str, str], metered: set[str]
) -> dict[str, Timeline]:
    """user -> the MRR timeline of their subscription (`subscriptions`: user -> subscription id)."""
    prices: dict[str, Any] = {}
    found: dict[str, Timeline] = {}
    for user, subscription_id in subscriptions.items():
        subscription = await gateway.v1.subscriptions.retrieve_async(subscription_id)
        timeline = Timeline(
            user, ended_at=None if subscription.ended_at is None else at(subscription.ended_at)
        )
        invoices = await gateway.v1.invoices.list_async({"subscription": subscription_id, "limit": 100})
        for invoice in invoices.data:
            if invoice.status == "void":
                continue
            for index, line in enumerate(invoice.lines.data):
                price_id = str(line.pricing.price_details.price)  # type: ignore[union-attr]
                if price_id in metered:
                    continue
                if price_id not in prices:
                    prices[price_id] = await gateway.v1.prices.retrieve_async(price_id)
                price = prices[price_id]
                months = 12 if price.recurring.interval == "year" else 1
                proration = _is_proration(line)
                if proration:
                    if line.amount <= 0:
                        continue  # the credit for the unused time of the old price
                    amount = Fraction(price.unit_amount * (line.quantity or 1))
                else:
                    amount = Fraction(line.amount - sum(d.amount for d in line.discount_amounts or []))
                timeline.segments.append(
                    Segment(
                        at(line.period.start), at(line.period.end), amount / months, (invoice.created, index)
                    )
                )
        found[user] = timeline
    return found


def _is_proration(line: Any) -> bool:
    parent = line.parent
    details = None if parent is None else parent.invoice_item_details or parent.subscription_item_details
    return bool(details is not None and details.proration)


@dataclass
class Expected:
    mrr: int
    mrr_at_start: int
    days: dict[str, Counter[str]]  # day -> movement -> cents
    mrr_by_day: dict[str, int]  # day -> MRR at the day's end
    churned: int


def expected_metrics(found: dict[str, Timeline], start: datetime, end: datetime) -> Expected:
    """The movements per day of every change of any account's MRR in [start, end), rounded as the
    service rounds (each account's MRR to a cent, half up, before and after)."""
    days: dict[str, Counter[str]] = {}
    churned = 0
    for timeline in found.values():
        paid_before = False
        previous = Fraction(0)
        for moment in sorted(m for m in timeline.moments() if m < end):
            value = timeline.mrr(moment)
            if value == previous:
                continue
            if moment >= start:
                if previous == 0:
                    kind = "reactivation" if paid_before else "new"
                elif value == 0:
                    kind = "churned"
                    churned += 1
                else:
                    kind = "expansion" if value > previous else "contraction"
                days.setdefault(moment.strftime("%Y-%m-%d"), Counter())[kind] += half_up(value) - half_up(
                    previous
                )
            paid_before = paid_before or value > 0
            previous = value
    by_day: dict[str, int] = {}
    day = start.replace(hour=0, minute=0, second=0, microsecond=0)
    while day < end:
        close = min(day + timedelta(days=1), end) - timedelta(microseconds=1)
        by_day[day.strftime("%Y-%m-%d")] = half_up(sum((t.mrr(close) for t in found.values()), Fraction(0)))
        day += timedelta(days=1)
    last = end - timedelta(microseconds=1)
    return Expected(
        mrr=half_up(sum((t.mrr(last) for t in found.values()), Fraction(0))),
        mrr_at_start=half_up(
            sum((t.mrr(start - timedelta(microseconds=1)) for t in found.values()), Fraction(0))
        ),
        days={day: moves for day, moves in days.items() if any(moves.values())},
        mrr_by_day=by_day,
        churned=churned,
    )


@dataclass
class InvoiceFigures:
    failed: int = 0
    failed_amount: int = 0
    recovered: int = 0
    recovered_amount: int = 0
    metered: int = 0


async def invoice_figures(
    gateway: StripeGateway, customers: list[str], metered: set[str], start: datetime, end: datetime
) -> InvoiceFigures:
    """From the sandbox's invoices: payments that failed (an attempt did not pay) among those
    finalized in the range, those paid since, and the metered lines of the billed ones."""
    figures = InvoiceFigures()
    for customer in customers:
        for invoice in (await gateway.v1.invoices.list_async({"customer": customer, "limit": 100})).data:
            finalized = invoice.status_transitions.finalized_at
            if finalized is None or not start <= at(finalized) < end:
                continue
            attempts = invoice.attempt_count or 0
            if (invoice.status == "paid" and attempts >= 2) or (invoice.status != "paid" and attempts >= 1):
                figures.failed += 1
                figures.failed_amount += invoice.amount_due
                paid_at = invoice.status_transitions.paid_at
                if invoice.status == "paid" and paid_at is not None and at(paid_at) < end:
                    figures.recovered += 1
                    figures.recovered_amount += invoice.amount_paid
            if invoice.status in ("open", "paid", "uncollectible"):
                for line in invoice.lines.data:
                    if str(line.pricing.price_details.price) in metered:  # type: ignore[union-attr]
                        figures.metered += line.amount - sum(d.amount for d in line.discount_amounts or [])
    return figures
