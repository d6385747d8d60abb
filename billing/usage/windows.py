"""Quota windows, a window's usage, entitlements and the quota check.

A window's usage is its running total, one row (`usage_window_total`, billing/usage/
window_totals.py); a window without one (no record since totals began) is summed exactly: the
`usage_rollup` rows of the whole hours inside it plus the raw records in the partial hours at its
edges (windows start at the subscription period's start time, rarely on the hour). The daily
series is always read from the rollups and edges, per UTC day.

Quota windows (limits in the plans file are per month):

- monthly plan: the subscription's current period, [current_period_start, current_period_end);
- annual plan: monthly windows anchored on the period start (a subscriber who started on the
  31st gets windows starting on the 31st, the 28th/29th/30th in shorter months, each computed
  from the anchor so the day never drifts): a year does not get one month's quota;
- no subscription (no period known): the calendar month, UTC.

When the stored period has ended (a webhook not yet applied) the windows roll forward monthly
from the period end, so a window always contains `now`.

The quota check (`quota_check`, the `WithinQuota` permission, `access(feature)`) refuses once the
window's usage has reached the limit: exactly at the limit, use is refused. Recording itself
never refuses over quota (the use has happened; it must be billed), so with C requests admitted
concurrently just under the limit, each recording at most q, usage ends at most `limit - 1 + C*q`
(idempotency keys rule out double counting; that overshoot is the bound).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    String,
    bindparam,
    cast,
    func,
    select,
    type_coerce,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.access import (
    AccessDecision,
    AccessPolicy,
    SubscriptionState,
    add_months,
    check_feature_name,
    months_since,
)
from billing.errors import BillingError, ErrorCode
from billing.plans import Catalog
from billing.usage.window_totals import HOUR, RANGES, exact_window_sum, hour_of, sum_ranges, total_of
from db.engine import Database
from db.enums import BillingInterval
from db.models import rollup_table, usage_table, usage_total_table
from db.types import UTCDateTime


@dataclass(frozen=True, slots=True)
class Window:
    """[start, end): the quota window usage is counted in."""

    start: datetime
    end: datetime


def monthly_window(anchor: datetime, now: datetime) -> Window:
    """The month-long window, counted from `anchor`, that contains `now`."""
    months = months_since(anchor, now)
    return Window(add_months(anchor, months), add_months(anchor, months + 1))


def calendar_month(now: datetime) -> Window:
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return Window(start, add_months(start, 1))


def quota_window(state: SubscriptionState, now: datetime) -> Window:
    """The window the plans file's monthly limits apply to right now (rules in the module doc)."""
    start, end = state.current_period_start, state.current_period_end
    if start is None:
        return calendar_month(now)
    if state.interval is BillingInterval.ANNUAL:
        return monthly_window(start, now)
    if end is not None and start <= now < end:
        return Window(start, end)
    return monthly_window(end if end is not None and now >= end else start, now)


# Window sums ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Plan:
    """Which hours come from rollups, and which edge ranges from raw records."""

    hours: tuple[datetime, datetime] | None
    edges: tuple[tuple[datetime, datetime], ...]


def _split(window: Window) -> _Plan:
    first_whole = hour_of(window.start)
    if first_whole < window.start:
        first_whole += HOUR
    last_whole = hour_of(window.end)  # the start of the hour the window ends in
    if first_whole > last_whole:  # start and end inside one hour
        return _Plan(None, ((window.start, window.end),))
    edges = tuple((lo, hi) for lo, hi in ((window.start, first_whole), (last_whole, window.end)) if lo < hi)
    return _Plan((first_whole, last_whole) if first_whole < last_whole else None, edges)


def _utc_day(conn: AsyncConnection, column: Any) -> Any:
    """The UTC midnight starting the day of a UTC time column."""
    if conn.dialect.name == "postgresql":
        return func.date_trunc("day", column, "UTC")
    return func.strftime("%Y-%m-%d 00:00:00.000000", column)  # SQLAlchemy's SQLite datetime format


async def window_usage(
    conn: AsyncConnection,
    account_id: int,
    features: Sequence[str],
    window: Window,
    *,
    by_day: bool = False,
) -> list[tuple[str, datetime, int]]:
    """(feature, time, quantity) parts of the window's usage, in one statement.

    Whole hours come from `usage_rollup` (summed per UTC day with `by_day`, at the day's
    midnight, else one sum per feature at the first hour; summed in the database, so at most
    one row per day comes back, not the window's ~720 hours);
    the partial hours at the edges are exact sums of raw records. Every part is an index range
    bounded by time, whatever the number of records.
    """
    if not features:
        return []
    plan = _split(window)
    parts = []
    r, u = rollup_table.c, usage_table.c
    if plan.hours is not None:
        where = (
            r.account_id == account_id,
            r.feature.in_(features),
            r.hour >= plan.hours[0],
            r.hour < plan.hours[1],
        )
        if by_day:
            day = type_coerce(_utc_day(conn, r.hour), UTCDateTime())
            parts.append(
                select(r.feature, day.label("at"), cast(func.sum(r.quantity), BigInteger).label("quantity"))
                .where(*where)
                .group_by(r.feature, day)
            )
        else:
            parts.append(
                select(
                    r.feature,
                    func.min(r.hour).label("at"),
                    cast(func.sum(r.quantity), BigInteger).label("quantity"),
                )
                .where(*where)
                .group_by(r.feature)
            )
    for lo, hi in plan.edges:
        parts.append(
            select(
                u.feature,
                func.min(u.recorded_at).label("at"),
                cast(func.sum(u.quantity), BigInteger).label("quantity"),
            )
            .where(
                u.account_id == account_id, u.feature.in_(features), u.recorded_at >= lo, u.recorded_at < hi
            )
            .group_by(u.feature)
        )
    statement = parts[0] if len(parts) == 1 else union_all(*parts)
    rows = await conn.execute(statement)
    return [(row.feature, row.at, int(row.quantity)) for row in rows if row.quantity]


@functools.cache
def _used_statement(features: int) -> Any:
    """The read of `used_in_window` for that many features, built once: building the expression
    on each call cost more CPU than the rest of a quota check (bench/RESULTS.md, issue 23)."""
    account = bindparam("account_id", type_=usage_total_table.c.account_id.type)
    bound = {name: bindparam(name, type_=UTCDateTime()) for name in ("window_start", "window_end", *RANGES)}
    return select(
        *(
            func.coalesce(
                total_of(account, feature, bound["window_start"], bound["window_end"]),
                exact_window_sum(account, feature, bound),
            ).label(f"used_{n}")
            for n, feature in enumerate(bindparam(f"feature_{n}", type_=String) for n in range(features))
        )
    )


async def used_in_window(
    database: Database, account_id: int | None, features: Sequence[str], window: Window
) -> dict[str, int]:
    """feature -> usage in the window (0 for features without any), in one statement: each
    feature's total row, or the window's exact sum when it has none (evaluated only then)."""
    if account_id is None or not features:
        return dict.fromkeys(features, 0)
    parameters: dict[str, Any] = {
        "account_id": account_id,
        "window_start": window.start,
        "window_end": window.end,
        **sum_ranges(window.start, window.end),
        **{f"feature_{n}": feature for n, feature in enumerate(features)},
    }
    row = await database.first(_used_statement(len(features)), parameters)  # asyncpg's, with FAST_PATHS
    assert row is not None  # a select without FROM: always one row
    return {feature: int(row[f"used_{n}"]) for n, feature in enumerate(features)}


# Summaries, entitlements and the quota check -------------------------------------------------


@dataclass(frozen=True, slots=True)
class DailyUsage:
    day: date  # UTC
    quantity: int


@dataclass(frozen=True, slots=True)
class UsageSummary:
    feature: str
    used: int
    limit: int | None  # None: unlimited; 0 when the plan does not include the feature
    window: Window
    daily: tuple[DailyUsage, ...]  # every UTC day the window touches, zeros included

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(self.limit - self.used, 0)


@dataclass(frozen=True, slots=True)
class Entitlement:
    feature: str
    limit: int | None  # None: unlimited
    used: int

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(self.limit - self.used, 0)


def check_known_feature(catalog: Catalog, feature: str) -> None:
    check_feature_name(feature)
    if feature not in catalog.all_features:
        raise BillingError(
            f"unknown feature {feature!r}: no plan has it", code=ErrorCode.BAD_USER_INPUT, field="feature"
        )


def feature_limit(policy: AccessPolicy, state: SubscriptionState, feature: str, now: datetime) -> int | None:
    """The effective tier's monthly limit: None if unlimited, 0 if its plan lacks the feature."""
    tier = policy.effective_tier(state, now)
    if not policy.catalog.has_feature(tier, feature):
        return 0
    return policy.catalog.limit(tier, feature)


async def usage_summary(
    database: Database,
    policy: AccessPolicy,
    state: SubscriptionState,
    feature: str,
    now: datetime,
    *,
    with_daily: bool = True,
) -> UsageSummary:
    """The feature's usage in the current quota window, one statement: with the daily series for
    charts, `used` is its sum; without (`with_daily` false: `daily` is empty, `daily_usage` reads
    it), the window's total."""
    check_known_feature(policy.catalog, feature)
    window = quota_window(state, now)
    if with_daily:
        daily = await daily_usage(database, state.account_id, feature, window)
        used = sum(day.quantity for day in daily)
    else:
        daily, used = (), (await used_in_window(database, state.account_id, [feature], window))[feature]
    return UsageSummary(
        feature=feature,
        used=used,
        limit=feature_limit(policy, state, feature, now),
        window=window,
        daily=daily,
    )


async def daily_usage(
    database: Database, account_id: int | None, feature: str, window: Window
) -> tuple[DailyUsage, ...]:
    """Every UTC day the window touches, zeros included, from the rollups and the edges' records."""
    days: dict[date, int] = {}
    day = window.start.date()
    while datetime(day.year, day.month, day.day, tzinfo=UTC) < window.end:
        days[day] = 0
        day += timedelta(days=1)
    if account_id is not None:
        async with database.read() as conn:
            for _feature, at, quantity in await window_usage(
                conn, account_id, [feature], window, by_day=True
            ):
                days[at.astimezone(UTC).date()] += quantity
    return tuple(DailyUsage(day, quantity) for day, quantity in days.items())


async def entitlements(
    database: Database, policy: AccessPolicy, state: SubscriptionState, now: datetime
) -> list[Entitlement]:
    """Every feature of the effective tier's plan with its limit and this window's usage."""
    tier = policy.effective_tier(state, now)
    plan = policy.catalog.plans.get(tier)
    if plan is None:
        return []
    features = sorted(plan.features)
    used = await used_in_window(database, state.account_id, features, quota_window(state, now))
    return [Entitlement(feature, plan.limits.get(feature), used[feature]) for feature in features]


@dataclass(frozen=True, slots=True)
class QuotaCheck:
    decision: AccessDecision
    limit: int | None
    used: int | None  # None when not read (no limit, or access refused before the quota)
    window: Window


async def quota_check(
    database: Database, policy: AccessPolicy, state: SubscriptionState, feature: str, now: datetime
) -> QuotaCheck:
    """Feature access plus the quota: QUOTA_EXCEEDED once the window's usage reached the limit.

    Reads usage only for a feature the plan limits (one statement), never otherwise.
    """
    decision = policy.feature_access(state, feature, now)
    window = quota_window(state, now)
    limit = policy.catalog.limit(decision.effective_tier, feature)
    if not decision.allowed or limit is None:
        return QuotaCheck(decision, limit, None, window)
    used = (await used_in_window(database, state.account_id, [feature], window))[feature]
    return QuotaCheck(policy.quota_access(decision, feature, used), limit, used, window)
