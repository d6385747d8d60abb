"""The benchmark's seeding (bench/seed.py) leaves what `record_usage` would: records and hourly
rollups that agree, on both databases. No timing here: speed is measured by `bench/run`."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from bench.seed import PERIOD_AGE, add_usage
from billing.access import AccessPolicy, load_subscription
from billing.plans import load_catalog
from billing.usage import hour_of, quota_window, usage_summary
from db.engine import Database
from db.models import rollup_table, usage_table
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
