"""The benchmark's seeding (bench/seed.py) leaves what `record_usage` would: records, hourly
rollups and window totals that agree, on both databases. No timing here: speed is measured by
`bench/run`."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from bench.seed import PERIOD_AGE, add_placed_usage, add_usage
from billing.access import AccessPolicy, load_subscription
from billing.plans import load_catalog
from billing.usage import hour_of, quota_window, usage_summary
from db.engine import Database
from db.models import rollup_table, usage_table, usage_total_table
from tests.graphql_support import insert_account


async def test_seeded_usage_has_the_rollups_record_usage_keeps(database: Database) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    await insert_account(database, "seeded", period_start=now - PERIOD_AGE)
    state = await load_subscription(database, "seeded")
    assert state.account_id is not None
    await add_usage(database, state.account_id, 0, 400, now)
    await add_usage(database, state.account_id, 400, 700, now)  # a second range: rollups summed again

    async with database.read() as conn:
        records = (await conn.execute(select(usage_table.c.recorded_at, usage_table.c.quantity))).all()
        rollups = (await conn.execute(select(rollup_table.c.hour, rollup_table.c.quantity))).all()
    assert len(records) == 700
    assert sum(quantity for _, quantity in records) == sum(1 + n % 5 for n in range(700))
    assert all(now - timedelta(days=35) <= at <= now for at, _ in records)
    per_hour: Counter[datetime] = Counter()
    for at, quantity in records:
        per_hour[hour_of(at)] += quantity
    assert Counter({hour_of(hour): quantity for hour, quantity in rollups}) == per_hour

    window = quota_window(state, now)
    in_window = sum(quantity for at, quantity in records if window.start <= at < window.end)
    policy = AccessPolicy(load_catalog(), timedelta(days=7))
    summary = await usage_summary(database, policy, state, "api_calls", now)
    assert 0 < in_window < sum(per_hour.values())  # the window holds most records, not all
    assert summary.used == in_window == sum(day.quantity for day in summary.daily)
    async with database.read() as conn:
        totals = {row.window_start: row.quantity for row in await conn.execute(select(usage_total_table))}
    assert totals[window.start] == in_window  # and the previous window's
    assert sum(totals.values()) == sum(per_hour.values())


async def test_the_placed_usage_falls_where_issue_23_puts_it(database: Database) -> None:
    if not database.is_postgres:
        pytest.skip("add_placed_usage seeds PostgreSQL (the bench's database)")
    now = datetime.now(UTC).replace(microsecond=0)
    await insert_account(database, "placed", period_start=now - PERIOD_AGE)
    state = await load_subscription(database, "placed")
    assert state.account_id is not None
    await add_placed_usage(database, state.account_id, now, total=1_000)
    window = quota_window(state, now)
    async with database.read() as conn:
        records = (await conn.execute(select(usage_table.c.recorded_at, usage_table.c.quantity))).all()
    first_hour = [at for at, _ in records if window.start <= at < hour_of(window.start) + timedelta(hours=1)]
    current_hour = [at for at, _ in records if hour_of(now) <= at < now]
    before = [at for at, _ in records if at < window.start]
    assert len(records) == 1_000 and len(before) == 100
    assert len(first_hour) >= 100 and len(current_hour) >= 100  # and some of the spread ones
    policy = AccessPolicy(load_catalog(), timedelta(days=7))
    summary = await usage_summary(database, policy, state, "api_calls", now)
    in_window = sum(quantity for at, quantity in records if window.start <= at < window.end)
    assert summary.used == in_window == sum(day.quantity for day in summary.daily)
