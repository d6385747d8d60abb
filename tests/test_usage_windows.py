"""Quota windows (monthly, annual, none), their rollover, and window sums from hourly rollups."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from billing.access import AccessPolicy, AccessReason, SubscriptionState, add_months, load_subscription
from billing.plans import load_catalog
from billing.usage import (
    UsageInput,
    Window,
    quota_check,
    quota_window,
    record_usage,
    usage_summary,
    window_usage,
)
from db.engine import Database
from db.enums import BillingInterval, SubscriptionStatus, Tier
from db.models import rollup_table, usage_table
from tests.graphql_support import hs256_token, insert_account, serve_api

CATALOG = load_catalog()
POLICY = AccessPolicy(CATALOG, timedelta(days=7))
STARTER_LIMIT = CATALOG.limit(Tier.STARTER, "api_calls")
assert STARTER_LIMIT is not None


def subscribed(
    interval: BillingInterval, start: datetime, end: datetime | None, **extra: Any
) -> SubscriptionState:
    return SubscriptionState(
        user_id="u",
        status=SubscriptionStatus.ACTIVE,
        tier=Tier.STARTER,
        interval=interval,
        current_period_start=start,
        current_period_end=end,
        **extra,
    )


# The rules, without a database -------------------------------------------------------------------


def test_a_monthly_plan_counts_the_current_period() -> None:
    start = datetime(2026, 3, 14, 9, 30, 12, tzinfo=UTC)
    end = datetime(2026, 4, 14, 9, 30, 12, tzinfo=UTC)
    state = subscribed(BillingInterval.MONTHLY, start, end)
    assert quota_window(state, start) == Window(start, end)
    assert quota_window(state, end - timedelta(seconds=1)) == Window(start, end)


def test_a_monthly_period_not_yet_renewed_in_the_database_rolls_forward() -> None:
    start = datetime(2026, 1, 31, 8, 0, tzinfo=UTC)
    end = datetime(2026, 2, 28, 8, 0, tzinfo=UTC)  # Stripe clamps to the month's last day
    state = subscribed(BillingInterval.MONTHLY, start, end)
    assert quota_window(state, end + timedelta(days=3)) == Window(
        end, datetime(2026, 3, 28, 8, 0, tzinfo=UTC)
    )


def test_an_annual_plan_gets_monthly_windows_anchored_on_the_period_start() -> None:
    anchor = datetime(2026, 1, 31, 10, 0, tzinfo=UTC)
    state = subscribed(BillingInterval.ANNUAL, anchor, add_months(anchor, 12))
    expected = [
        (datetime(2026, 2, 10, tzinfo=UTC), anchor, datetime(2026, 2, 28, 10, tzinfo=UTC)),
        (
            datetime(2026, 2, 28, 10, tzinfo=UTC),
            datetime(2026, 2, 28, 10, tzinfo=UTC),
            datetime(2026, 3, 31, 10, tzinfo=UTC),
        ),
        (
            datetime(2026, 4, 30, 9, 59, tzinfo=UTC),
            datetime(2026, 3, 31, 10, tzinfo=UTC),
            datetime(2026, 4, 30, 10, tzinfo=UTC),
        ),
        (
            datetime(2027, 1, 31, 9, tzinfo=UTC),
            datetime(2026, 12, 31, 10, tzinfo=UTC),
            datetime(2027, 1, 31, 10, tzinfo=UTC),
        ),
    ]
    for now, start, end in expected:
        assert quota_window(state, now) == Window(start, end), now


def test_without_a_subscription_the_window_is_the_calendar_month() -> None:
    never = SubscriptionState(user_id="u")
    assert quota_window(never, datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == Window(
        datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    )


def test_the_limit_is_refused_exactly_when_reached() -> None:
    state = subscribed(
        BillingInterval.MONTHLY, datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
    )
    now = datetime(2026, 3, 5, tzinfo=UTC)
    decision = POLICY.feature_access(state, "api_calls", now)
    assert POLICY.quota_access(decision, "api_calls", STARTER_LIMIT - 1).allowed
    at_limit = POLICY.quota_access(decision, "api_calls", STARTER_LIMIT)
    assert (at_limit.allowed, at_limit.reason) == (False, AccessReason.QUOTA_EXCEEDED)
    assert not POLICY.quota_access(decision, "api_calls", STARTER_LIMIT + 50).allowed
    assert POLICY.quota_access(
        POLICY.feature_access(state, "basic_analytics", now), "basic_analytics", 10**9
    ).allowed


# Rollover against the database, with a fixed clock -----------------------------------------------


async def _record(
    database: Database, user: str, key: str, quantity: int, at: datetime, now: datetime
) -> None:
    await record_usage(
        database=database,
        catalog=CATALOG,
        records=[UsageInput(user, "api_calls", quantity, key, at)],
        now=now,
    )


async def test_a_monthly_window_rolls_over_at_the_period_end(database: Database) -> None:
    p0 = datetime(2026, 5, 10, 14, 25, 30, tzinfo=UTC)
    p1, p2 = add_months(p0, 1), add_months(p0, 2)
    await insert_account(database, "monthly", tier="starter", period_start=p0, current_period_end=p1)
    await _record(database, "monthly", "before-end", 40, p1 - timedelta(seconds=1), p1 - timedelta(minutes=1))
    await _record(database, "monthly", "at-start", 2, p1, p1)
    await _record(database, "monthly", "later", 5, p1 + timedelta(hours=3), p1 + timedelta(hours=3))
    state = await load_subscription(database, "monthly")
    renewed = replace(state, current_period_start=p1, current_period_end=p2)

    old = await usage_summary(database, POLICY, state, "api_calls", p1 - timedelta(minutes=1))
    new = await usage_summary(database, POLICY, renewed, "api_calls", p1 + timedelta(hours=4))
    not_yet_synced = await usage_summary(database, POLICY, state, "api_calls", p1 + timedelta(hours=4))

    assert (old.window, old.used) == (Window(p0, p1), 40)
    assert (new.window, new.used) == (Window(p1, p2), 7)
    assert not_yet_synced.window == Window(p1, p2) and not_yet_synced.used == 7
    assert new.limit == STARTER_LIMIT and new.remaining == STARTER_LIMIT - 7


async def test_an_annual_plan_has_a_monthly_quota_not_a_yearly_one(database: Database) -> None:
    anchor = datetime(2026, 1, 31, 10, 0, tzinfo=UTC)
    feb_28 = datetime(2026, 2, 28, 10, 0, tzinfo=UTC)
    await insert_account(
        database,
        "annual",
        tier="starter",
        interval="annual",
        period_start=anchor,
        current_period_end=add_months(anchor, 12),
    )
    await _record(
        database,
        "annual",
        "first-month",
        STARTER_LIMIT,
        feb_28 - timedelta(hours=1),
        feb_28 - timedelta(hours=1),
    )
    state = await load_subscription(database, "annual")

    used_up = await quota_check(database, POLICY, state, "api_calls", feb_28 - timedelta(minutes=1))
    assert used_up.decision.reason is AccessReason.QUOTA_EXCEEDED
    assert used_up.window == Window(anchor, feb_28)

    await _record(database, "annual", "second-month", 3, feb_28, feb_28 + timedelta(minutes=1))
    fresh = await quota_check(database, POLICY, state, "api_calls", feb_28 + timedelta(minutes=1))
    assert fresh.decision.allowed and fresh.used == 3
    assert fresh.window == Window(feb_28, datetime(2026, 3, 31, 10, 0, tzinfo=UTC))
    summary = await usage_summary(database, POLICY, state, "api_calls", feb_28 + timedelta(days=2))
    assert summary.limit == STARTER_LIMIT and summary.used == 3


# Rollups against raw sums ------------------------------------------------------------------------


async def _raw_sum(database: Database, account_id: int, start: datetime, end: datetime) -> int:
    c = usage_table.c
    async with database.read() as conn:
        found = await conn.execute(
            select(func.coalesce(func.sum(c.quantity), 0)).where(
                c.account_id == account_id,
                c.feature == "api_calls",
                c.recorded_at >= start,
                c.recorded_at < end,
            )
        )
        return int(found.scalar() or 0)


async def test_window_sums_from_rollups_equal_raw_sums_at_every_edge(database: Database) -> None:
    now = datetime(2026, 7, 20, 12, 0, tzinfo=UTC)
    await insert_account(database, "busy", tier="pro", period_start=now - timedelta(days=5))
    rng = random.Random(20260720)
    base = now - timedelta(days=3)
    inputs = []
    for n in range(600):
        at = base + timedelta(seconds=rng.randrange(0, 3 * 86400))
        if n % 10 == 0:  # some exactly on the hour, where off-by-one errors live
            at = at.replace(minute=0, second=0, microsecond=0)
        inputs.append(UsageInput("busy", "api_calls", rng.randint(1, 50), f"k{n}", at))
    for chunk in range(0, len(inputs), 200):
        await record_usage(database=database, catalog=CATALOG, records=inputs[chunk : chunk + 200], now=now)
    state = await load_subscription(database, "busy")
    assert state.account_id is not None

    windows = [
        Window(base, now),  # everything
        Window(base.replace(minute=17, second=5), base.replace(minute=43)),  # inside one hour
        Window(
            base + timedelta(minutes=59, seconds=59), base + timedelta(hours=1, seconds=1)
        ),  # across an hour
        Window(base + timedelta(hours=5), base + timedelta(hours=9)),  # whole hours only
        Window(base + timedelta(hours=5, minutes=1), base + timedelta(hours=5)),  # empty
    ]
    for _ in range(60):
        start = base + timedelta(seconds=rng.randrange(0, 3 * 86400))
        windows.append(Window(start, start + timedelta(seconds=rng.randrange(1, 2 * 86400))))
    async with database.read() as conn:
        for window in windows:
            parts = await window_usage(conn, state.account_id, ["api_calls"], window)
            expected = await _raw_sum(database, state.account_id, window.start, window.end)
            assert sum(quantity for _f, _at, quantity in parts) == expected, window

    async with database.read() as conn:
        rolled = (await conn.execute(select(func.sum(rollup_table.c.quantity)))).scalar()
    assert int(rolled) == sum(record.quantity for record in inputs)


async def test_the_daily_series_adds_up_to_the_window(database: Database) -> None:
    now = datetime(2026, 8, 3, 18, 45, tzinfo=UTC)
    start = datetime(2026, 8, 1, 21, 37, 14, tzinfo=UTC)
    await insert_account(
        database, "charts", tier="starter", period_start=start, current_period_end=add_months(start, 1)
    )
    times = [
        start - timedelta(seconds=1),
        start,
        start + timedelta(minutes=5),
        datetime(2026, 8, 2, 0, 0, tzinfo=UTC),
        now,
    ]
    await record_usage(
        database=database,
        catalog=CATALOG,
        records=[UsageInput("charts", "api_calls", 10 + n, f"c{n}", at) for n, at in enumerate(times)],
        now=now,
    )
    state = await load_subscription(database, "charts")
    summary = await usage_summary(database, POLICY, state, "api_calls", now)

    assert summary.used == 11 + 12 + 13 + 14  # not the record one second before the window
    days = {day.day: day.quantity for day in summary.daily}
    assert days[date(2026, 8, 1)] == 23 and days[date(2026, 8, 2)] == 13 and days[date(2026, 8, 3)] == 14
    assert sum(days.values()) == summary.used
    assert min(days) == date(2026, 8, 1) and max(days) == date(2026, 9, 1)  # every day the window touches


# Through GraphQL ---------------------------------------------------------------------------------

VIEWER = """query($feature: String!) {
  viewer {
    usage(feature: $feature) { feature used limit remaining windowStart windowEnd daily { date quantity } }
    entitlements { feature limit used remaining }
  }
}"""


async def test_viewer_usage_and_entitlements(database: Database) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2, hours=3)
    await insert_account(database, "member", tier="starter", period_start=start)
    await record_usage(
        database=database,
        catalog=CATALOG,
        records=[
            UsageInput("member", "api_calls", 120, "a", start + timedelta(hours=1)),
            UsageInput("member", "api_calls", 30, "b"),
            UsageInput("member", "storage_gb", 6, "c"),
        ],
    )
    async with serve_api(database, usage_reporter=False) as api:
        result = await api.query(VIEWER, {"feature": "api_calls"}, token=hs256_token("member"))
        unknown = await api.query(VIEWER, {"feature": "teleportation"}, token=hs256_token("member"))
        visitor = await api.query(VIEWER, {"feature": "api_calls"}, token=hs256_token("visitor"))

    usage = result["data"]["viewer"]["usage"]
    assert (usage["used"], usage["limit"], usage["remaining"]) == (150, STARTER_LIMIT, STARTER_LIMIT - 150)
    assert datetime.fromisoformat(usage["windowStart"]) == start
    assert datetime.fromisoformat(usage["windowEnd"]) == start + timedelta(days=30)
    assert sum(day["quantity"] for day in usage["daily"]) == 150
    entitlements = {e["feature"]: e for e in result["data"]["viewer"]["entitlements"]}
    assert set(entitlements) == {"api_access", "api_calls", "basic_analytics", "storage_gb"}
    assert entitlements["api_access"] == {
        "feature": "api_access",
        "limit": None,
        "used": 0,
        "remaining": None,
    }
    assert entitlements["storage_gb"] == {"feature": "storage_gb", "limit": 5, "used": 6, "remaining": 0}
    assert unknown["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    never = visitor["data"]["viewer"]
    assert never["entitlements"] == []
    assert (never["usage"]["used"], never["usage"]["limit"], never["usage"]["remaining"]) == (0, 0, 0)
    assert datetime.fromisoformat(never["usage"]["windowStart"]).day == 1


async def test_counts_beyond_32_bits_are_served(database: Database) -> None:
    await insert_account(database, "huge", tier="pro")
    for batch in range(3):
        await record_usage(
            database=database,
            catalog=CATALOG,
            records=[UsageInput("huge", "api_calls", 1_000_000, f"h{batch}-{n}") for n in range(1000)],
        )
    async with serve_api(database, usage_reporter=False) as api:
        result = await api.query(VIEWER, {"feature": "api_calls"}, token=hs256_token("huge"))
    assert result["data"]["viewer"]["usage"]["used"] == 3_000_000_000
    assert result["data"]["viewer"]["usage"]["remaining"] == 0
