"""How long a quota window's usage takes to read, for 10k, 100k and 1M usage records.

    .venv/bin/python -m bench.usage_read                       # SQLite in a temporary directory
    .venv/bin/python -m bench.usage_read --database-url postgresql+asyncpg://postgres@127.0.0.1/bench

The database is migrated, one account gets N `api_calls` records spread over 34 days (so the
current monthly window, which starts at a time that is not on the hour, holds most of them) by
`bench.seed.add_usage` (the records and rollups `bench/run` seeds for scenario 5), and each read
is timed in-process, without HTTP (median of many):

- `usage_summary`: Viewer.usage (rollups per hour + raw edges, with the daily series);
- `quota_check`: what WithinQuota and access(feature) run (the window's total row, one read);
- a plain `SUM(quantity)` over the raw records of the window, for contrast.

Not a test: run it by hand and write the numbers in bench/README.md. On PostgreSQL, give it a
database of its own; it drops and recreates the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select

from bench.seed import PERIOD_AGE, add_usage
from billing.access import AccessPolicy, SubscriptionState, load_subscription
from billing.plans import load_catalog
from billing.usage import Window, quota_check, quota_window, usage_summary
from db.engine import Database
from db.migrate import upgrade_engine
from db.models import account_table, metadata, usage_table

SIZES = (10_000, 100_000, 1_000_000)


async def timed(call: Callable[[], Awaitable[Any]], runs: int) -> float:
    """Median milliseconds of `runs` calls, after two warm-up calls."""
    for _ in range(2):
        await call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


async def measure(
    database: Database,
    policy: AccessPolicy,
    state: SubscriptionState,
    window: Window,
    now: datetime,
    runs: int,
) -> tuple[int, float, float, float]:
    """(records in the window, usage_summary ms, quota_check ms, raw SUM ms)."""
    c = usage_table.c
    in_range = (
        c.account_id == state.account_id,
        c.feature == "api_calls",
        c.recorded_at >= window.start,
        c.recorded_at < window.end,
    )

    async def raw() -> int:
        async with database.read() as conn:
            return int((await conn.execute(select(func.sum(c.quantity)).where(*in_range))).scalar() or 0)

    async with database.read() as conn:
        count = select(func.count()).select_from(usage_table).where(*in_range)
        in_window = int((await conn.execute(count)).scalar() or 0)
    summary = await usage_summary(database, policy, state, "api_calls", now)
    check = await quota_check(database, policy, state, "api_calls", now)
    assert summary.used == check.used == await raw(), "rollups and raw records disagree"
    summary_ms = await timed(lambda: usage_summary(database, policy, state, "api_calls", now), runs)
    check_ms = await timed(lambda: quota_check(database, policy, state, "api_calls", now), runs)
    raw_ms = await timed(raw, max(5, runs // 10))
    return in_window, summary_ms, check_ms, raw_ms


async def reset(database: Database) -> None:
    async with database.engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)
        if database.is_postgres:
            from sqlalchemy import text

            await conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    await upgrade_engine(database.engine)


async def main(url: str | None, runs: int) -> None:
    catalog = load_catalog()
    policy = AccessPolicy(catalog, timedelta(days=7))
    with tempfile.TemporaryDirectory() as tmp:
        database = Database.from_url(url or f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}")
        try:
            await reset(database)
            now = datetime.now(UTC).replace(microsecond=0)
            period_start = now - PERIOD_AGE
            async with database.write() as conn:
                await conn.execute(
                    insert(account_table).values(
                        user_id="bench",
                        stripe_customer_id="cus_bench",
                        tier="pro",
                        interval="monthly",
                        status="active",
                        current_period_start=period_start,
                        current_period_end=period_start + timedelta(days=30),
                        created_at=now,
                        updated_at=now,
                    )
                )
            state = await load_subscription(database, "bench")
            assert state.account_id is not None
            window = quota_window(state, now)
            print(f"backend: {database.engine.dialect.name}; window {window.start} .. {window.end}")
            print(
                f"{'records':>10} {'in window':>10} {'usage_summary':>14} {'quota_check':>12} {'raw SUM':>9}"
            )
            inserted = 0
            for size in SIZES:
                # The records of bench.seed.add_usage, which also sums the rollups again.
                await add_usage(database, state.account_id, inserted, size, now)
                inserted = size
                in_window, summary_ms, check_ms, raw_ms = await measure(
                    database, policy, state, window, now, runs
                )
                timings = f"{summary_ms:>11.2f} ms {check_ms:>9.2f} ms {raw_ms:>6.1f} ms"
                print(f"{size:>10,} {in_window:>10,} {timings}")
        finally:
            await database.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temporary directory")
    parser.add_argument("--runs", type=int, default=200, help="timed calls per measurement")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.database_url, arguments.runs))
