"""Revenue metrics computed from the billing ledger (docs/metrics.md defines each one).

MRR of one account's state: the licensed item's unit amount times its quantity, in the smallest
currency unit, an annual price divided by 12, while the status is `active` or `past_due` (a
trial, `unpaid`, `paused`, `incomplete` and `canceled` count nothing). Discounts are subtracted
when the ledger holds their terms (`percent_off` / `amount_off`) until their `end` (a repeating
coupon), when MRR steps back up (an expansion); tax is never included (prices are net). A
state written before amounts were tracked (the migration's `initial` rows) is valued at the
catalog's price of its tier and interval.

Movements, from each `change` row's before and after MRR, bucketed by its `effective_at`:
new (0 -> more, never paid before), reactivation (0 -> more, paid before), expansion (up),
contraction (down, still above 0), churned (down to 0). `initial` rows set the starting state
and are no movement.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from fractions import Fraction
from typing import Any

from sqlalchemy import select

from billing.discounts import discount_ends, discounted
from billing.errors import BillingError, ErrorCode
from billing.ledger import LedgerEntry
from billing.plans import Catalog
from db.engine import Database
from db.enums import BillingInterval, Tier
from db.models import ledger_table

MRR_STATUSES = frozenset({"active", "past_due"})
MAX_BUCKETS = 400
MOVEMENTS = ("new", "expansion", "contraction", "churned", "reactivation")


class MetricsInterval(StrEnum):
    DAY = "day"
    WEEK = "week"  # ISO weeks, from Monday 00:00 UTC
    MONTH = "month"


@dataclass
class Bucket:
    start: datetime
    end: datetime
    mrr: int = 0  # at the bucket's end
    movements: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MOVEMENTS, 0))

    @property
    def net_new(self) -> int:
        return sum(self.movements.values())


@dataclass
class Counts:
    """Events of the range (docs/metrics.md): trials, churned logos, failed and recovered payments."""

    trials_started: int = 0  # -> trialing
    trials_converted: int = 0  # trialing -> active / past_due
    trials_lapsed: int = 0  # trialing -> anything else but trialing
    churned_subscribers: int = 0  # paying -> 0 MRR
    payments_failed: int = 0  # active / trialing -> past_due
    payments_recovered: int = 0  # past_due -> active
    recovered_mrr: int = 0  # the MRR of the recovered ones


@dataclass
class RevenueMetrics:
    start: datetime
    end: datetime
    mrr: int  # at `end`
    subscribers: dict[tuple[str, str], int]  # (status, tier) -> accounts, at `end`
    buckets: list[Bucket]
    mrr_at_start: int = 0
    paying_at_start: int = 0  # accounts with MRR at `start`
    counts: Counts = field(default_factory=Counts)

    @property
    def arr(self) -> int:
        return self.mrr * 12

    def total(self, movement: str) -> int:
        return sum(bucket.movements[movement] for bucket in self.buckets)

    @property
    def trial_conversion_rate(self) -> float | None:
        """Converted / ended trials of the range (converted + lapsed); None without any."""
        ended = self.counts.trials_converted + self.counts.trials_lapsed
        return None if ended == 0 else self.counts.trials_converted / ended

    @property
    def logo_churn_rate(self) -> float | None:
        """Churned subscribers / paying subscribers at the start; None without any."""
        return None if self.paying_at_start == 0 else self.counts.churned_subscribers / self.paying_at_start

    @property
    def revenue_churn_rate(self) -> float | None:
        """Net MRR churn: (churned + contraction - expansion - reactivation) / MRR at the start."""
        if self.mrr_at_start == 0:
            return None
        lost = -(self.total("churned") + self.total("contraction"))
        won = self.total("expansion") + self.total("reactivation")
        return (lost - won) / self.mrr_at_start


def mrr_of(
    state: Mapping[str, Any] | None, catalog: Catalog | None = None, at: datetime | None = None
) -> Fraction:
    """The monthly recurring revenue of one account's ledger state at `at`, in cents (exact).

    `at`: the moment, for the discounts that end (None: every discount the state holds applies).
    """
    if not state or state.get("status") not in MRR_STATUSES:
        return Fraction(0)
    amount = state.get("unit_amount")
    if amount is None:
        amount = _catalog_amount(state, catalog)
    gross = Fraction(int(amount)) * int(state.get("quantity") or 1)
    net = discounted(gross, state.get("discounts") or [], state.get("currency"), at)
    return net / 12 if state.get("interval") == BillingInterval.ANNUAL.value else net


def _catalog_amount(state: Mapping[str, Any], catalog: Catalog | None) -> int:
    if catalog is None:
        return 0
    try:
        return catalog.price(Tier(str(state.get("tier"))), BillingInterval(str(state.get("interval")))).amount
    except (KeyError, ValueError):
        return 0


def cents(value: Fraction) -> int:
    """Exact cents rounded half up, once, at the end of a sum."""
    return int((value + Fraction(1, 2)) // 1)


def bucket_start(moment: datetime, interval: MetricsInterval) -> datetime:
    day = moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if interval is MetricsInterval.WEEK:
        return day - timedelta(days=day.weekday())
    if interval is MetricsInterval.MONTH:
        return day.replace(day=1)
    return day


def _next(start: datetime, interval: MetricsInterval) -> datetime:
    if interval is MetricsInterval.DAY:
        return start + timedelta(days=1)
    if interval is MetricsInterval.WEEK:
        return start + timedelta(days=7)
    return (start + timedelta(days=32)).replace(day=1)


def _buckets(start: datetime, end: datetime, interval: MetricsInterval) -> list[Bucket]:
    found: list[Bucket] = []
    at = bucket_start(start, interval)
    while at < end:
        following = _next(at, interval)
        found.append(Bucket(start=max(at, start), end=min(following, end)))
        if len(found) > MAX_BUCKETS:
            raise BillingError(
                f"at most {MAX_BUCKETS} buckets: shorten the range or use a longer interval",
                code=ErrorCode.BAD_USER_INPUT,
                field="interval",
            )
        at = following
    return found


def compute_metrics(
    entries: Sequence[LedgerEntry],
    start: datetime,
    end: datetime,
    interval: MetricsInterval = MetricsInterval.DAY,
    catalog: Catalog | None = None,
) -> RevenueMetrics:
    """The metrics of `[start, end)` from every ledger row effective before `end`, in order."""
    if start.tzinfo is None or end.tzinfo is None or start >= end:
        raise BillingError(
            "`from` must be before `to` (both with a time zone)", code=ErrorCode.BAD_USER_INPUT
        )
    buckets = _buckets(start, end, interval)
    state: dict[int, Mapping[str, Any]] = {}
    current: dict[int, Fraction] = {}  # each account's MRR now, as of the last step
    paid_before: set[int] = set()
    counts = Counts()
    mrr_at_start, paying_at_start = 0, 0
    timeline = _Timeline(sorted(entries, key=lambda entry: (entry.effective_at, entry.id)))
    for bucket in [Bucket(start=datetime.min.replace(tzinfo=UTC), end=start), *buckets]:
        for at, account_id, entry in timeline.steps(state, bucket.end):
            old = current.get(account_id, Fraction(0))
            after = entry.after if entry is not None else state[account_id]
            new = mrr_of(after, catalog, at)
            kind = _movement(old, new, account_id in paid_before)
            if bucket.end > start and (entry is None or entry.kind == "change"):
                if kind is not None:
                    bucket.movements[kind] += cents(new) - cents(old)
                if entry is not None:
                    _count(counts, state.get(account_id), entry.after, kind, new)
            state[account_id] = after
            current[account_id] = new
            if new > 0:
                paid_before.add(account_id)
        bucket.mrr = cents(sum(current.values(), Fraction(0)))
        if bucket.end == start:
            mrr_at_start = bucket.mrr
            paying_at_start = sum(1 for value in current.values() if value > 0)
    subscribers: dict[tuple[str, str], int] = {}
    for after in state.values():
        status = str(after.get("status"))
        if status != "none":
            key = (status, str(after.get("tier")))
            subscribers[key] = subscribers.get(key, 0) + 1
    mrr = buckets[-1].mrr if buckets else 0
    return RevenueMetrics(
        start=start,
        end=end,
        mrr=mrr,
        subscribers=subscribers,
        buckets=buckets,
        mrr_at_start=mrr_at_start,
        paying_at_start=paying_at_start,
        counts=counts,
    )


class _Timeline:
    """The steps of the metrics, in time order: each ledger row, and each moment a discount of an
    account's state ends (MRR steps back up: ChartMogul's and Baremetrics' expansion)."""

    def __init__(self, ordered: Sequence[LedgerEntry]) -> None:
        self.ordered = ordered
        self.index = 0
        self.ends: list[tuple[datetime, int]] = []  # a heap of (end, account)

    def steps(
        self, state: Mapping[int, Mapping[str, Any]], before: datetime
    ) -> Iterator[tuple[datetime, int, LedgerEntry | None]]:
        """(moment, account, its row, or None when only a discount ends) effective before
        `before`; a discount's end comes before a row of the same moment."""
        while True:
            entry = self.ordered[self.index] if self.index < len(self.ordered) else None
            if (
                self.ends
                and self.ends[0][0] < before
                and (entry is None or self.ends[0][0] <= entry.effective_at)
            ):
                at, account_id = heapq.heappop(self.ends)
                if account_id in state:
                    yield at, account_id, None
                continue
            if entry is None or entry.effective_at >= before:
                return
            self.index += 1
            yield entry.effective_at, entry.account_id, entry
            for ending in discount_ends(entry.after.get("discounts") or []):
                if ending > entry.effective_at:
                    heapq.heappush(self.ends, (ending, entry.account_id))


def _count(
    counts: Counts,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any],
    kind: str | None,
    new: Fraction,
) -> None:
    old_status = None if before is None else before.get("status")
    status = after.get("status")
    if status == old_status:
        return
    if status == "trialing":
        counts.trials_started += 1
    elif old_status == "trialing":
        if status in MRR_STATUSES:
            counts.trials_converted += 1
        else:
            counts.trials_lapsed += 1
    if kind == "churned":
        counts.churned_subscribers += 1
    if status == "past_due" and old_status in ("active", "trialing"):
        counts.payments_failed += 1
    if old_status == "past_due" and status == "active":
        counts.payments_recovered += 1
        counts.recovered_mrr += cents(new)


def _movement(old: Fraction, new: Fraction, paid_before: bool) -> str | None:
    if old == new:
        return None
    if old == 0:
        return "reactivation" if paid_before else "new"
    if new == 0:
        return "churned"
    return "expansion" if new > old else "contraction"


async def revenue_metrics(
    database: Database,
    start: datetime,
    end: datetime,
    interval: MetricsInterval = MetricsInterval.DAY,
    catalog: Catalog | None = None,
) -> RevenueMetrics:
    """`compute_metrics` over the ledger rows effective before `end` (read in one query)."""
    query = (
        select(ledger_table)
        .where(ledger_table.c.effective_at < end)
        .order_by(ledger_table.c.effective_at, ledger_table.c.id)
    )
    async with database.read() as conn:
        rows = (await conn.execute(query)).mappings().all()
    return compute_metrics([LedgerEntry(**row) for row in rows], start, end, interval, catalog)
