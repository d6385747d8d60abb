"""`usage.threshold`: a record crossing 80% or 100% of a feature's quota writes one event per
window each, from a running total updated in the recording's transaction, also when concurrent
recordings race across the threshold."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from billing.host_events.events import HostEventConfig
from billing.plans import load_catalog
from billing.usage import UsageInput, record_usage
from db.engine import Database
from db.models import account_table, host_event_table, usage_total_table
from tests.graphql_support import SERVICE_KEY, Api, insert_account, serve_api

CATALOG = load_catalog()
LIMIT = 10_000  # the starter plan's api_calls per month (plans.toml)
CONFIG = HostEventConfig()


async def thresholds(database: Database) -> list[dict[str, Any]]:
    async with database.read() as conn:
        rows = await conn.execute(
            select(host_event_table.c.payload)
            .where(host_event_table.c.type == "usage.threshold")
            .order_by(host_event_table.c.id)
        )
        payloads = [row.payload for row in rows]
    for payload in payloads:  # the same document from the one-statement path and the batch path
        assert set(payload) == {"type", "timestamp", "data"} and payload["type"] == "usage.threshold"
        assert datetime.fromisoformat(payload["timestamp"]).tzinfo is not None
        assert set(payload["data"]) == {
            "userId",
            "feature",
            "percent",
            "limit",
            "used",
            "windowStart",
            "windowEnd",
        }
    return [payload["data"] for payload in payloads]


counter = iter(range(10**9))


async def use(
    database: Database, quantity: int, *, user: str = "m", config: Any = CONFIG, at: datetime | None = None
) -> None:
    await record_usage(
        database=database,
        catalog=CATALOG,
        records=[UsageInput(user, "api_calls", quantity, f"k-{next(counter)}", at)],
        host_events=config,
    )


async def test_crossing_80_and_100_percent_writes_one_event_each(database: Database) -> None:
    await insert_account(database, "m", tier="starter")
    await use(database, 7_999)
    assert await thresholds(database) == []
    await use(database, 1)  # 8,000: exactly 80%
    await use(database, 1_000)
    await use(database, 999)  # 9,999
    assert [t["percent"] for t in await thresholds(database)] == [80]
    await use(database, 5)  # past 100%
    await use(database, 5_000)  # far past: nothing more this window
    events = await thresholds(database)
    assert [(t["percent"], t["used"], t["limit"]) for t in events] == [
        (80, 8_000, LIMIT),
        (100, 10_004, LIMIT),
    ]
    assert events[0]["userId"] == "m" and events[0]["feature"] == "api_calls"
    assert datetime.fromisoformat(events[0]["windowStart"]) < datetime.now(UTC)
    async with database.read() as conn:
        [total] = list(await conn.execute(select(usage_total_table)))
    assert total.quantity == 7_999 + 1 + 1_000 + 999 + 5 + 5_000


async def test_one_record_across_both_thresholds_writes_both_in_order(database: Database) -> None:
    await insert_account(database, "m", tier="starter")
    await use(database, 12_000)
    assert [t["percent"] for t in await thresholds(database)] == [80, 100]


async def test_a_new_quota_window_crosses_again(database: Database) -> None:
    start = datetime.now(UTC) - timedelta(days=40)
    await insert_account(database, "m", tier="starter", period_start=start)  # ended: rolls monthly
    await use(database, 9_000, at=datetime.now(UTC) - timedelta(hours=2))  # before the new period
    async with database.write() as conn:
        await conn.execute(
            update(account_table)
            .where(account_table.c.user_id == "m")
            .values(
                current_period_start=datetime.now(UTC) - timedelta(hours=1),
                current_period_end=datetime.now(UTC) + timedelta(days=29),
            )
        )
    await use(database, 9_000)
    events = await thresholds(database)
    assert [t["percent"] for t in events] == [80, 80]
    assert events[0]["windowStart"] != events[1]["windowStart"]


async def test_concurrent_recordings_racing_across_the_threshold_write_it_once(database: Database) -> None:
    await insert_account(database, "m", tier="starter")
    await use(database, 7_990)
    await asyncio.gather(*(use(database, 1) for _ in range(25)))
    await asyncio.gather(*(use(database, 100) for _ in range(25)))  # 7,990 + 25 + 2,500 > 10,000
    assert [t["percent"] for t in await thresholds(database)] == [80, 100]
    async with database.read() as conn:
        total = (await conn.execute(select(func.sum(usage_total_table.c.quantity)))).scalar_one()
    assert total == 7_990 + 25 + 2_500


async def test_without_host_events_the_total_is_kept_and_no_event_written(database: Database) -> None:
    await insert_account(database, "m", tier="starter")
    await use(database, 9_000, config=None)
    async with database.read() as conn:
        assert [row.quantity for row in await conn.execute(select(usage_total_table))] == [9_000]
    assert await thresholds(database) == []


async def test_a_filter_without_usage_threshold_writes_none(database: Database) -> None:
    await insert_account(database, "m", tier="starter")
    await use(database, 9_000, config=HostEventConfig(types=frozenset({"payment.failed"})))
    assert await thresholds(database) == []


@pytest.fixture
async def api(database: Database) -> AsyncIterator[Api]:
    async with serve_api(
        database,
        service_api_key=SERVICE_KEY,
        usage_reporter=False,
        host_webhook_url="http://127.0.0.1:9/hooks",
        host_events_worker=False,
    ) as served:
        yield served


async def test_record_usage_over_graphql_writes_the_threshold_event(database: Database, api: Api) -> None:
    await insert_account(database, "m", tier="starter")
    mutation = "mutation($input: RecordUsageInput!) { recordUsage(input: $input) { id } }"
    value = {"userId": "m", "feature": "api_calls", "quantity": 8_500, "idempotencyKey": "g-1"}
    result = await api.query(mutation, {"input": value}, token=SERVICE_KEY)
    assert "errors" not in result, result
    assert [t["percent"] for t in await thresholds(database)] == [80]


async def test_a_batch_and_single_records_share_the_total(database: Database) -> None:
    await insert_account(database, "m", tier="starter")
    await record_usage(
        database=database,
        catalog=CATALOG,
        records=[UsageInput("m", "api_calls", 4_000, "b-1"), UsageInput("m", "api_calls", 3_000, "b-2")],
        host_events=CONFIG,
    )
    await use(database, 1_000)  # 8,000 through the single-record path
    await use(database, 1_000, config=CONFIG)
    await record_usage(
        database=database,
        catalog=CATALOG,
        records=[UsageInput("m", "api_calls", 1_000, "b-3")],
        host_events=CONFIG,
    )
    assert [(t["percent"], t["used"]) for t in await thresholds(database)] == [(80, 8_000), (100, 10_000)]
