"""The running window totals that quota reads read (billing/usage/window_totals.py): equal to the
raw records of their window wherever the records fall (the window's first partial hour, the
current hour, late records in this or an earlier window), unchanged by duplicates, exact under
concurrent recordings, and rebuilt exactly for a window without a row (a new period, or totals
dropped by migration 0009)."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, update

from billing.access import AccessPolicy, SubscriptionState, load_subscription
from billing.plans import load_catalog
from billing.usage import UsageInput, Window, hour_of, quota_check, quota_window, record_usage, usage_summary
from db.engine import Database
from db.enums import Tier
from db.models import account_table, usage_table, usage_total_table
from tests.graphql_support import hs256_token, insert_account, serve_api

CATALOG = load_catalog()
POLICY = AccessPolicy(CATALOG, timedelta(days=7))
keys = (f"key-{n}" for n in itertools.count())


def period_start(now: datetime) -> datetime:
    """Two days ago at a time that is not on the hour: both edges of the window are partial."""
    return hour_of(now - timedelta(days=2)) + timedelta(minutes=17, seconds=23)


async def record(database: Database, *items: tuple[int, datetime | None], user: str = "u") -> None:
    await record_usage(
        database=database,
        catalog=CATALOG,
        records=[UsageInput(user, "api_calls", quantity, next(keys), at) for quantity, at in items],
    )


async def raw_sum(database: Database, state: SubscriptionState, window: Window) -> int:
    u = usage_table.c
    async with database.read() as conn:
        total = await conn.scalar(
            select(func.coalesce(func.sum(u.quantity), 0)).where(
                u.account_id == state.account_id,
                u.feature == "api_calls",
                u.recorded_at >= window.start,
                u.recorded_at < window.end,
            )
        )
    return int(total or 0)


async def total_row(database: Database, window: Window) -> int | None:
    t = usage_total_table.c
    async with database.read() as conn:
        found = await conn.scalar(
            select(t.quantity).where(t.window_start == window.start, t.window_end == window.end)
        )
    return None if found is None else int(found)


async def used(database: Database, state: SubscriptionState, now: datetime) -> int:
    summary = await usage_summary(database, POLICY, state, "api_calls", now, with_daily=False)
    check = await quota_check(database, POLICY, state, "api_calls", now)
    assert check.used == summary.used
    return summary.used


async def test_records_anywhere_in_the_window_and_late_ones_are_in_their_windows_total(
    database: Database,
) -> None:
    now = datetime.now(UTC)
    start = period_start(now)
    await insert_account(database, "u", period_start=start)
    state = await load_subscription(database, "u")
    window = quota_window(state, now)
    assert window.start == start
    previous = quota_window(state, start - timedelta(seconds=1))
    assert previous.end == start
    first_hour = [(2, start + timedelta(minutes=minute)) for minute in range(0, 43, 3)]  # before :00
    await record(database, *first_hour[:5])
    for item in first_hour[5:]:
        await record(database, item)  # single records: PostgreSQL's one-statement path
    await record(database, (3, None), (4, now - timedelta(minutes=1)))  # the current hour
    await record(database, (5, None))
    await record(database, (7, now - timedelta(hours=30)), (11, now - timedelta(days=1, minutes=5)))  # late
    await record(database, (13, start - timedelta(minutes=1)))  # late, into the previous window
    await record(database, (17, start - timedelta(days=3)), (19, start))  # both windows in one batch

    expected = await raw_sum(database, state, window)
    assert expected == 2 * len(first_hour) + 3 + 4 + 5 + 7 + 11 + 19
    assert await total_row(database, window) == expected
    assert await total_row(database, previous) == await raw_sum(database, state, previous) == 13 + 17
    assert await used(database, state, now) == expected
    summary = await usage_summary(database, POLICY, state, "api_calls", now)
    assert sum(day.quantity for day in summary.daily) == expected  # the series, from the rollups

    # The read is the row: a (test-only) change to it is what the quota sees.
    async with database.write() as conn:
        await conn.execute(update(usage_total_table).values(quantity=usage_total_table.c.quantity + 1000))
    assert await used(database, state, now) == expected + 1000


async def test_a_duplicate_idempotency_key_adds_nothing(database: Database) -> None:
    now = datetime.now(UTC)
    await insert_account(database, "u", period_start=period_start(now))
    state = await load_subscription(database, "u")
    once = UsageInput("u", "api_calls", 5, "same", now - timedelta(minutes=2))
    for _ in range(3):
        await record_usage(database=database, catalog=CATALOG, records=[once])
    batch = [UsageInput("u", "api_calls", 7, "other"), UsageInput("u", "api_calls", 7, "other"), once]
    await record_usage(database=database, catalog=CATALOG, records=batch)
    await record_usage(database=database, catalog=CATALOG, records=batch)
    window = quota_window(state, now)
    assert await total_row(database, window) == await raw_sum(database, state, window) == 12
    assert await used(database, state, now) == 12


async def test_concurrent_records_into_a_new_window_sum_to_the_raw_records(database: Database) -> None:
    now = datetime.now(UTC)
    start = period_start(now)
    await insert_account(database, "u", period_start=start)
    state = await load_subscription(database, "u")
    window = quota_window(state, now)
    singles = [record(database, (n % 5 + 1, start + timedelta(minutes=n % 40))) for n in range(40)]
    singles += [record(database, (n % 3 + 1, None)) for n in range(20)]
    batches = [
        record(database, *[(2, start + timedelta(minutes=b)), (3, None), (4, now - timedelta(hours=b + 1))])
        for b in range(6)
    ]
    duplicates = [
        record_usage(database=database, catalog=CATALOG, records=[UsageInput("u", "api_calls", 9, "dup")])
        for _ in range(6)
    ]
    await asyncio.gather(*singles, *batches, *duplicates)
    expected = await raw_sum(database, state, window)
    assert expected == sum(n % 5 + 1 for n in range(40)) + sum(n % 3 + 1 for n in range(20)) + 6 * 9 + 9
    assert await total_row(database, window) == expected
    assert await used(database, state, now) == expected


async def test_a_window_without_a_row_is_read_exactly_and_its_next_record_creates_it(
    database: Database,
) -> None:
    now = datetime.now(UTC)
    await insert_account(database, "u", period_start=period_start(now))
    state = await load_subscription(database, "u")
    window = quota_window(state, now)
    await record(database, (4, window.start), (6, now - timedelta(hours=5)), (8, None))
    async with database.write() as conn:  # as migration 0009 leaves it
        await conn.execute(delete(usage_total_table))
    assert await used(database, state, now) == 18  # summed from rollups and edges
    await record(database, (1, now - timedelta(days=1)))
    assert await total_row(database, window) == await raw_sum(database, state, window) == 19
    assert await used(database, state, now) == 19


async def test_a_new_period_opens_a_new_window_counting_its_records_exactly(database: Database) -> None:
    now = datetime.now(UTC)
    await insert_account(database, "u", period_start=period_start(now))
    old = await load_subscription(database, "u")
    await record(database, (10, now - timedelta(hours=3)), (20, now - timedelta(minutes=30)))
    new_start = now - timedelta(hours=1, minutes=7)  # a plan change: the period restarts
    async with database.write() as conn:
        await conn.execute(
            update(account_table)
            .where(account_table.c.user_id == "u")
            .values(current_period_start=new_start, current_period_end=new_start + timedelta(days=30))
        )
    new = await load_subscription(database, "u")
    window = quota_window(new, now)
    assert window.start == new_start and quota_window(old, now) != window
    assert await used(database, new, now) == 20  # recorded under the old period, in this window
    await record(database, (5, None))
    assert await total_row(database, window) == await raw_sum(database, new, window) == 25
    assert await used(database, new, now) == 25


async def test_viewer_usage_reads_the_total_and_the_daily_series_only_when_asked(database: Database) -> None:
    now = datetime.now(UTC)
    start = period_start(now)
    await insert_account(database, "u", period_start=start)
    await record(database, (40, start + timedelta(minutes=1)), (2, None), (9, start - timedelta(hours=1)))
    quota = '{ viewer { usage(feature: "api_calls") { used remaining } } }'
    series = '{ viewer { usage(feature: "api_calls") { used daily { date quantity } } } }'
    fragment = (
        '{ viewer { usage(feature: "api_calls") { used ... on UsageSummary { daily { date quantity } } } } }'
    )
    async with serve_api(database, usage_reporter=False) as api:
        token = hs256_token("u")
        answers = [
            (await api.query(query, token=token))["data"]["viewer"]["usage"]
            for query in (quota, series, fragment)
        ]
    assert [answer["used"] for answer in answers] == [42, 42, 42]
    assert answers[0]["remaining"] == CATALOG.limit(Tier.PRO, "api_calls") - 42  # type: ignore[operator]
    for answer in answers[1:]:
        assert sum(day["quantity"] for day in answer["daily"]) == 42
        assert answer["daily"][0]["date"] == start.date().isoformat()
